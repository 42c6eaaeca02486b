"""Property-based fuzzing of the receiver socket: thousands of malformed, oversized and hostile messages (bad JSON,
wrong types in every field of every message, bad base64, NaN/inf audio, odd-length and garbage binary, huge and
deeply nested frames, hostile uids) over a handful of connections to one real server process. Every text message
gets its one reply, every error event carries a code, no merely invalid message closes a connection, no uid writes
outside --save_data, and the server still answers a normal session, typed and spoken, during and afterwards."""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import websockets
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from client import ExtendedClient, with_key
from conftest import ROOT, fixture
from fakes import FakeChatAPI
from test_faults import answer, ask, assert_answered, start, turn_over

ROUNDS = 300  # hypothesis examples: one batch of messages on one connection each
CHECK_EVERY = 40  # rounds between two checks that a normal session is answered
# Messages on a connection without a session. Its first uid may be refused (close code 1008); a closing handshake
# started with more than 16 messages unread (websockets' max_queue) waits out the 10 s close timeout.
FRESH_BATCH = 12
OWN = "\x00own uid"  # stands for the uid of the connection a message is sent on
PROBE = json.dumps({"type": "keepalive"})  # valid on any connection: ignored, answered with the placeholder
REPLIES = ({"placeholder": ""}, {"return_info": "VAD detected"})
SAFE_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}-[0-9a-f]{8}/turn\d{5}(_input|_answer)?\.(json|wav)")
HOSTILE_UIDS = ["../escape", "../../escape", "a/b", "/tmp/abs", "..", ".", ".hidden", "x" * 65, "nul\x00byte",
                "back\\slash", "sp ace", "ümlaut", "", "\ud800", "ok-uid_1.2", "CON", "-"]


def server_limits() -> tuple:
    """(flags, largest frame) for this server: small limits where it has the flags, else the WebSocket default."""
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "serve_test_models.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    if "--max_message_kb" not in help_text:
        return [], 2**20
    return ["--max_message_kb", "64", "--max_audio_ms_per_message", "1000", "--max_text_chars", "500",
            "--max_messages_per_s", "100000"], 64 * 1024


LIMIT_FLAGS, FRAME_LIMIT = server_limits()


# ---- what the protocol (docs/protocol.md) says must be refused on a session's connection ----

def valid_audio(b64) -> bool:
    """base64 of float32 PCM, all finite."""
    if not isinstance(b64, str):
        return False
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) % 4 == 0 and bool(np.all(np.isfinite(np.frombuffer(raw, "<f4"))))


def must_fail(obj, own: str) -> bool:
    """A JSON value that any version of the protocol answers with an error event (a lower bound: a stricter
    server may refuse more)."""
    if not isinstance(obj, dict):
        return True
    if "uid" in obj and obj["uid"] != own:
        return True
    kind = obj.get("type")
    if kind == "audio_input":
        return not valid_audio(obj.get("audio"))
    if kind == "user_input":
        return not isinstance(obj.get("text"), str) or not obj["text"].strip()
    if kind == "playback":
        played = obj.get("played_ms")
        return not isinstance(obj.get("turn"), int) or (played is not None and not isinstance(played, (int, float)))
    return False


def text_must_fail(text: str, own: str) -> bool:
    try:
        return must_fail(json.loads(text), own)
    except (ValueError, RecursionError):
        return True


# ---- strategies: message specs, expanded into frames when sent (big frames are never built by hypothesis) ----

def f32_b64(values) -> str:
    return base64.b64encode(np.array(values, "<f4").tobytes()).decode()


scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
any_json = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=6)
uids = st.just(OWN) | st.sampled_from(HOSTILE_UIDS) | st.text(max_size=70) | any_json
audio_values = st.one_of(
    st.lists(st.floats(-1, 1, width=32), max_size=1024).map(f32_b64),  # valid, quiet or loud
    st.lists(st.floats(width=32), max_size=64).map(lambda v: f32_b64(v + [math.nan])),
    st.sampled_from([math.inf, -math.inf]).map(lambda x: f32_b64([0.0, x])),
    st.binary(min_size=1, max_size=63).filter(lambda b: len(b) % 4).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=40), st.text(alphabet="ABCD+/= \n", max_size=20), any_json)
texts = st.one_of(any_json, st.just(""), st.text(alphabet=" \t\n\r", max_size=5), st.text(max_size=30), st.just("new topic"),
                  st.just("hi \ud800 there"))
fields = {"uid": uids, "audio": audio_values, "is_playing": st.sampled_from(["true", "false"]) | any_json, "text": texts,
          "turn": any_json | st.integers(-5, 2**40), "played_ms": any_json | st.floats(), "playing": any_json}
objects = st.one_of(
    st.fixed_dictionaries({"type": st.just("audio_input")}, optional={k: fields[k] for k in ("uid", "audio", "is_playing")}),
    st.fixed_dictionaries({"type": st.just("user_input")}, optional={k: fields[k] for k in ("uid", "text", "is_playing")}),
    st.fixed_dictionaries({"type": st.just("playback")},
                          optional={k: fields[k] for k in ("uid", "turn", "played_ms", "playing", "is_playing")}),
    st.fixed_dictionaries({}, optional={"type": any_json | st.text(max_size=12), **fields}),
    any_json)
raw_texts = st.one_of(
    st.text(max_size=60),
    objects.map(lambda o: json.dumps(o)[:-1]),  # cut short
    st.sampled_from(['{"type": "user_input",}', "{'type': 'user_input'}", "", " ", "null", "[]", '"uid"', "NaN",
                     '{"uid": NaN}', '{"type": "playback", "turn": 1e999}', '{"type": "x", "type": 1}', "\ufeff{}",
                     '{"type": "user_input", "text": "\\ud800"}', '{"__proto__": {"type": "user_input"}}']))
specials = st.one_of(
    st.tuples(st.just("nested"), st.integers(10, FRAME_LIMIT // 2 - 16), st.sampled_from(["[", '{"a":'])),
    st.tuples(st.just("big_int"), st.integers(4000, 30000)),
    st.tuples(st.just("long_text"), st.integers(400, 4000)),
    st.tuples(st.just("long_uid"), st.integers(60, 5000)),
    st.tuples(st.just("big"), st.floats(0.3, 0.95), st.sampled_from(["pad", "audio", "binary"])))
messages = st.one_of(
    objects.map(lambda o: ("json", o)), objects.map(lambda o: ("json", o)), raw_texts.map(lambda t: ("raw", t)),
    st.binary(max_size=2048).map(lambda b: ("binary", b)),
    st.lists(st.integers(-32768, 32767), max_size=2048).map(lambda v: ("binary", np.array(v, "<i2").tobytes())),
    specials)
first_messages = st.one_of(
    st.fixed_dictionaries({"uid": uids, "type": st.just("user_input"), "text": st.just("hello")}).map(lambda o: ("json", o)),
    messages)


def build(spec, own: str) -> tuple:
    """(frame, whether the protocol makes it an error on a session's connection)."""
    kind = spec[0]
    if kind == "json":
        obj = spec[1]
        if isinstance(obj, dict) and obj.get("uid") == OWN:
            obj = {**obj, "uid": own}
        frame = json.dumps(obj)
        return frame, must_fail(obj, own)
    if kind == "raw":
        return spec[1], text_must_fail(spec[1], own)
    if kind == "binary":
        return spec[1], len(spec[1]) % 2 == 1
    if kind == "nested":
        opener = spec[2]
        depth = min(spec[1], (FRAME_LIMIT - 64) // (len(opener) + 1))  # under the frame limit
        closer = "]" if opener == "[" else "}"
        frame = opener * depth + ("1" if opener != "[" else "") + closer * depth
        return frame, text_must_fail(frame, own)
    if kind == "big_int":
        return '{"type": "playback", "turn": ' + "9" * spec[1] + "}", True
    if kind == "long_text":
        return json.dumps({"type": "user_input", "text": "la " * (spec[1] // 3)}), False
    if kind == "long_uid":
        return json.dumps({"type": "user_input", "uid": "u" * spec[1], "text": "hi"}), True
    size = int(spec[1] * FRAME_LIMIT) - 64  # "big": large, under the frame limit
    if spec[2] == "binary":
        return bytes(size - size % 2), False
    if spec[2] == "audio":  # base64 zeros: silence, maybe more per message than a server allows
        return json.dumps({"type": "audio_input", "audio": "A" * (size - size % 4)}), False
    return json.dumps({"type": "keepalive", "pad": "x" * size}), False


def oversize(extra: int, binary: bool):
    return bytes(FRAME_LIMIT + extra) if binary else json.dumps({"type": "keepalive", "pad": "x" * (FRAME_LIMIT + extra)})


# ---- connections ----

class Connection:
    """A receiver connection, and for a session its extended sender socket, with everything they said."""

    def __init__(self, srv, uid: str | None):
        self.srv, self.uid = srv, uid
        self.replies: list = []
        self.events: list = []
        self.changed = asyncio.Event()

    async def open(self) -> Connection:
        query = f"/?uid={self.uid}" if self.uid else ""
        self.recv = await connect(self.srv.recv_url + query, max_size=None)
        self.sockets = [(self.recv, self.replies)]
        if self.uid:  # the receiver's ready event carries the key its sender presents
            key = json.loads(await self.recv.recv())["session_key"]
            self.send = await connect(self.srv.send_url + query, max_size=None, subprotocols=with_key(None, key))
            self.sockets.append((self.send, self.events))
        self.tasks = [asyncio.create_task(self._collect(ws, into)) for ws, into in self.sockets]
        return self

    async def _collect(self, ws, into: list) -> None:
        try:
            async for msg in ws:
                if isinstance(msg, str):
                    into.append(json.loads(msg))
                    self.changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.changed.set()

    @property
    def closed(self) -> bool:
        return self.tasks[0].done()

    def errors(self) -> list:
        return [e for e in self.events if e.get("event") == "error"]

    async def until(self, predicate, timeout: float = 10.0) -> bool:
        async def wait():
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        try:
            await asyncio.wait_for(wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        for ws, _ in self.sockets:
            await ws.close()
        await asyncio.gather(*self.tasks)


class Fuzzer:
    """The clients' event loop in a thread of its own, so connections live across hypothesis examples."""

    def __init__(self, srv):
        self.srv, self.rounds, self.messages = srv, 0, 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sessions = [self.run(self.new_session()) for _ in range(3)]

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def close_all():
            await asyncio.gather(*(c.close() for c in self.sessions))
        self.run(close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def new_session(self) -> Connection:
        conn = await Connection(self.srv, f"fuzz-{uuid.uuid4().hex[:12]}").open()
        await conn.until(lambda: any(e.get("event") == "ready" for e in conn.events))
        return conn

    async def round(self, specs: list, slot: int, end_with_oversize: bool) -> None:
        fresh = slot >= len(self.sessions)
        conn = await Connection(self.srv, None).open() if fresh else self.sessions[slot]
        own = conn.uid or "no uid on this connection"
        frames = [build(spec, own) for spec in specs]
        if end_with_oversize:
            frames.append((oversize(len(specs) * 97 + 1, len(specs) % 2 == 1), False))
        replies, errors = len(conn.replies), len(conn.errors())
        texts = must = 0
        try:
            for i, (frame, bad) in enumerate(frames):
                await conn.recv.send(frame)
                self.messages += 1
                if end_with_oversize and i == len(frames) - 1:
                    break
                texts += isinstance(frame, str)
                must += bad
            if not end_with_oversize:
                await conn.recv.send(PROBE)
                texts += 1
        except websockets.ConnectionClosed:
            pass
        await conn.until(lambda: len(conn.replies) >= replies + texts or conn.closed)
        assert all(r in REPLIES for r in conn.replies), conn.replies[replies:]
        if end_with_oversize:
            await conn.until(lambda: conn.closed)
        if conn.closed:  # only an oversized frame, or a first message with a uid the server refuses, may close it
            code, reason = conn.recv.close_code, conn.recv.close_reason or ""
            assert (end_with_oversize and code == 1009) or (fresh and code == 1008 and "uid" in reason), \
                (code, reason, log_excerpt(self.srv))
        else:  # every text message was answered
            assert len(conn.replies) >= replies + texts, (texts, conn.replies[replies:], log_excerpt(self.srv))
        if not fresh and not conn.closed:  # every message the protocol refuses got an error event, each with a code
            await conn.until(lambda: len(conn.errors()) >= errors + must, timeout=5)
            new = conn.errors()[errors:]
            assert len(new) >= must, (must, new)
            for e in new:
                assert isinstance(e["code"], str) and re.fullmatch(r"[a-z][a-z_]*", e["code"]), e
                assert isinstance(e["message"], str) and e["message"], e
                assert e["turn"] is None or isinstance(e["turn"], int), e
        assert self.srv.alive(), self.srv.log()[-3000:]
        if fresh:
            await conn.close()
        elif conn.closed:
            await conn.close()
            self.sessions[slot] = await self.new_session()
        self.rounds += 1
        if self.rounds % CHECK_EVERY == 0:
            await typed_turn(self.srv, f"check number {self.rounds}")


def log_excerpt(srv) -> str:
    """The server log from its first traceback, else its end."""
    log = srv.log()
    start = log.find("Traceback")
    return log[max(0, start - 1000):start + 4000] if start >= 0 else log[-4000:]


def answered(conn: Connection, question: str) -> bool:
    """The connection's session got the end of an answer that names `question`."""
    turns = {e["turn"] for e in conn.events if e.get("event") == "answer" and e["text"].startswith(f"About {question}")}
    return any(e.get("event") == "answer" and e["end"] and e["turn"] in turns for e in conn.events)


async def typed_turn(srv, question: str) -> ExtendedClient:
    async with ExtendedClient(srv.recv_url, srv.send_url) as c:
        await ask(c, question, 1)
    assert_answered(c, 1, question)
    return c


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    outside = tmp_path_factory.mktemp("fuzz")
    with FakeChatAPI(answer=answer, first_token_delay_s=0.05, token_delay_s=0.005) as chat:
        srv = start(chat, "--playback_lead_ms", "0", "--max_sessions", "64", "--save_data", str(outside / "data"),
                    *LIMIT_FLAGS)
        yield srv, outside
        srv.stop()


def test_hostile_messages_leave_the_server_serving(fuzz_server):
    srv, outside = fuzz_server
    fuzzer = Fuzzer(srv)
    try:
        @settings(max_examples=ROUNDS, deadline=None, database=None,
                  phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
        @given(batch=st.lists(messages, min_size=20, max_size=60), slot=st.integers(0, len(fuzzer.sessions)),
               first=first_messages, end_with_oversize=st.integers(0, 9).map(lambda n: n == 0))
        def one_round(batch, slot, first, end_with_oversize):
            fresh = slot == len(fuzzer.sessions)
            fuzzer.run(fuzzer.round([first, *batch[:FRESH_BATCH - 1]] if fresh else batch, slot, end_with_oversize))

        one_round()
        # A fuzzed session itself still answers.
        survivor = fuzzer.sessions[0]
        fuzzer.run(survivor.recv.send(json.dumps({"type": "user_input", "uid": survivor.uid, "text": "still with me"})))
        assert fuzzer.run(survivor.until(lambda: answered(survivor, "still with me"))), survivor.events[-10:]
    finally:
        fuzzer.stop()
    assert fuzzer.messages >= 2000, (fuzzer.rounds, fuzzer.messages)

    async def normal_sessions():
        async with ExtendedClient(srv.recv_url, srv.send_url) as typing, \
                ExtendedClient(srv.recv_url, srv.send_url) as speaking:
            await asyncio.gather(ask(typing, "what happened", 1),
                                 speaking.stream_wav(fixture("en_question.wav")), turn_over(speaking, 1, timeout=30))
        return typing, speaking

    typing, speaking = asyncio.run(normal_sessions())
    assert_answered(typing, 1, "what happened")
    assert_answered(speaking, 1, "heard 3.")
    assert srv.alive() and "Traceback" not in srv.log(), srv.log()[-5000:]
    # No uid wrote a file outside --save_data, and every file lies in a session folder named by the server.
    assert os.listdir(outside) == ["data"]
    saved = [os.path.relpath(os.path.join(folder, name), outside / "data")
             for folder, _, names in os.walk(outside / "data") for name in names]
    assert saved and all(SAFE_NAME.fullmatch(name) for name in saved), [n for n in saved if not SAFE_NAME.fullmatch(n)]


def test_text_that_is_not_unicode_gets_an_error_and_the_session_goes_on(fuzz_server):
    """JSON can escape a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 text holds. Typed text with one, followed
    at once by a normal question (which cuts its turn off and has it saved): an error with a code for the first, the
    connection stays open, the second is answered, and nothing in the server raises."""
    srv, _ = fuzz_server
    start_line = len(srv.lines)

    async def scenario():
        async with ExtendedClient(srv.recv_url, srv.send_url) as c:
            await c.wait_for(lambda r: r.kind == "ready")
            await c.recv.send(json.dumps({"type": "user_input", "uid": c.uid, "text": "hi \ud800 there"}))
            await c.send_text("and now")
            try:
                second = await c.wait_for(lambda r: r.kind == "answer" and r.data["text"].startswith("About and now"), 10)
                await turn_over(c, second.data["turn"])
            except TimeoutError:
                second = None
            return c, second, c.recv.close_code

    c, second, close_code = asyncio.run(scenario())
    log = "".join(srv.lines[start_line:])
    assert close_code is None and second is not None, (close_code, log[-3000:])
    assert [e.data["code"] for e in c.events("error")] in (["bad_text"], ["llm_failed"]), c.events("error")
    assert_answered(c, second.data["turn"], "and now")
    assert "Traceback" not in log, log




def test_a_connection_refused_for_its_uid_closes_promptly_though_more_messages_came(fuzz_server):
    """A client without a session names a uid the server refuses and, before it hears back, sends more: the server
    closes the connection with 1008 and a reason, and the close completes in seconds, not after a timeout."""
    srv, _ = fuzz_server

    async def scenario():
        conn = await Connection(srv, None).open()
        t0 = time.monotonic()
        with contextlib.suppress(websockets.ConnectionClosed):
            await conn.recv.send(json.dumps({"type": "user_input", "uid": "../not a uid", "text": "hello"}))
            for _ in range(40):  # more than the 16 messages a connection buffers before it stops reading
                await conn.recv.send(PROBE)
        await conn.until(lambda: conn.closed, timeout=15)
        closed_s = time.monotonic() - t0
        await conn.close()
        return conn.recv.close_code, conn.recv.close_reason, closed_s

    code, reason, closed_s = asyncio.run(scenario())
    assert code == 1008 and "uid" in reason, (code, reason)
    assert closed_s < 4, f"the refused connection took {closed_s:.1f} s to close"
