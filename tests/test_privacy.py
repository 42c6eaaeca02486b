"""Hostile and careless clients beside a victim, over real sockets to the real server: each test asserts what the
victim notices (its answer arrives whole and on time, nobody else hears it) and what the attacker gets (nothing, or
a close with the documented code), and that connections return to their baseline."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import websockets
from websockets.asyncio.client import connect

from client import ExtendedClient, LegacyClient, with_key
from conftest import ROOT, start_server
from server_process import ServerProcess
from test_security import refusal  # a close before anything else

from s2s_server_pipeline import uid_tag


def run(coro):
    return asyncio.run(coro)


def as_client(address: str) -> dict:
    """connect() arguments of a client at `address`: the test's 127.0.0.1 is a trusted proxy, and X-Forwarded-For
    names the client behind it, as nginx would."""
    return {"additional_headers": {"X-Forwarded-For": address}}


async def closed_with(ws, timeout: float = 10.0) -> websockets.frames.Close:
    """Read until the server closes; its close frame."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return closed.value.rcvd


async def typed_answer(client, text: str, timeout: float = 20.0) -> float:
    """Ask by text; seconds until the first audio of the answer arrived (its whole answer must arrive)."""
    sent = time.monotonic()
    await client.send_text(text)
    if isinstance(client, LegacyClient):
        first = await client.wait_for(lambda r: r.t > sent and r.kind == "legacy" and r.data["answer_text"], timeout)
        await client.wait_for(lambda r: r.t > sent and r.kind == "legacy" and r.data["end_flag"], timeout)
    else:
        first = await client.wait_for(lambda r: r.t > sent and r.kind == "audio", timeout)
        await client.wait_for(lambda r: r.t > sent and r.kind == "answer" and r.data["end"], timeout)
    return first.t - sent


async def listen(ws, into: list) -> None:
    """Everything a socket receives, into `into`, until it closes."""
    try:
        async for message in ws:
            into.append(message)
    except websockets.ConnectionClosed:
        pass


@pytest.fixture(scope="module")
def server(chat_api, tmp_path_factory):
    page = tmp_path_factory.mktemp("page")
    (page / "index.html").write_text("<h1>voice agent</h1>")
    srv = start_server(chat_api, "--legacy_clients", "allow", "--resume_s", "5", "--max_sessions", "8", "--client_dir", str(page),
                       "--max_pending_connections", "128")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


# ---- 1. a session is reachable only by the client that opened it ----

def test_a_sender_needs_the_session_key_and_learns_nothing_without_it(server):
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as victim:
            assert len(victim.key) >= 32 and victim.ready["resumed"] is False
            attempts = [f"{server.send_url}/?uid={victim.uid}",  # the victim's uid, no key
                        f"{server.send_url}/?uid={victim.uid}&key=wrong-key-0123456789",
                        f"{server.send_url}/?uid=no-such-uid&key={victim.key}",  # the key with another uid
                        f"{server.send_url}/?uid=no-such-uid"]
            closes = [await refusal(url) for url in attempts]
            closes.append(await refusal(f"{server.send_url}/?uid={victim.uid}", subprotocols=with_key(None, "guess")))
            # A uid-less (legacy) sender, open through the whole answer, hears nothing of an extended session.
            async with connect(server.send_url) as eavesdropper:
                overheard: list = []
                task = asyncio.create_task(listen(eavesdropper, overheard))
                await typed_answer(victim, "my secret question")
                await asyncio.sleep(0.3)
                task.cancel()
            return closes, overheard, victim

    closes, overheard, victim = run(scenario())
    assert {(c.code, c.reason) for c in closes} == {(4404, "unknown session or wrong session key")}
    assert overheard == []
    assert "my secret question" in "".join(a.data["text"] for a in victim.events("answer"))


def test_a_session_without_its_sender_is_heard_by_nobody(server):
    """The victim's sender has dropped (or it only uses the receiver): its answer goes nowhere, not to a uid-less
    sender."""
    async def scenario():
        victim = ExtendedClient(server.recv_url, server.send_url)
        async with victim:
            await victim.send.close()
            async with connect(server.send_url) as eavesdropper:
                overheard: list = []
                task = asyncio.create_task(listen(eavesdropper, overheard))
                await victim.send_text("nobody may hear this")
                await asyncio.to_thread(server.wait_for_log, f"turn session={uid_tag(victim.uid)} turn=1")
                await asyncio.sleep(0.3)
                task.cancel()
            return overheard

    assert run(scenario()) == []


def test_a_receiver_without_the_key_cannot_speak_into_a_session_and_the_owner_comes_back(server, chat_api):
    async def scenario():
        victim = ExtendedClient(server.recv_url, server.send_url)
        async with victim:
            await typed_answer(victim, "first question of the victim")
            await victim.recv.close()  # the victim's receiver drops; its sender stays open
            # Anyone may open a receiver with the victim's uid, but gets a session of its own: the victim hears none of it.
            attacker = ExtendedClient(server.recv_url, server.send_url, uid=victim.uid)
            async with attacker:
                assert attacker.key != victim.key
                await typed_answer(attacker, "injected words")
            wrong = await refusal(f"{server.recv_url}/?uid={victim.uid}", subprotocols=with_key(None, "x" * 32))
            # The victim comes back with its key: the same session, its own history, its sender still open.
            back = await connect(f"{server.recv_url}/?uid={victim.uid}", subprotocols=with_key(None, victim.key))
            ready = json.loads(await back.recv())
            victim.recv = back
            await typed_answer(victim, "second question of the victim")
            await back.close()
            return victim, ready, wrong

    victim, ready, wrong = run(scenario())
    assert ready == {"event": "ready", "uid": victim.uid, "protocol": 3, "sample_rate": 16000,
                     "session_key": victim.key, "resumed": True}
    assert (wrong.code, wrong.reason) == (4404, "unknown session or wrong session key")
    texts = "".join(a.data["text"] for a in victim.events("answer"))
    assert "injected words" not in texts and "second question of the victim" in texts
    assert [a.data["turn"] for a in victim.events("answer") if a.data["end"]] == [1, 2]  # the turns go on
    request = next(r for r in reversed(chat_api.chat_requests()) if "second question" in r["messages"][-1]["content"])
    history = [m["content"] for m in request["messages"]]
    assert "first question of the victim" in history and "injected words" not in history


def test_a_second_receiver_with_the_key_takes_over_and_the_old_one_is_told(server):
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as owner:
            other_tab = await connect(f"{server.recv_url}/?uid={owner.uid}", subprotocols=with_key(None, owner.key))
            ready = json.loads(await other_tab.recv())
            await asyncio.wait([owner.readers[1]], timeout=5)  # the owner's reader of its receiver socket ends
            close = (owner.recv.close_code, owner.recv.close_reason)
            await other_tab.close()
            return ready, close

    ready, close = run(scenario())
    assert ready["resumed"] is True
    assert close == (4409, "replaced by a newer connection to this session")


def test_legacy_clients_hear_only_legacy_sessions(server):
    """CleanS2S's client works unchanged, and neither kind of client hears the other kind's answers."""
    async def scenario():
        async with LegacyClient(server.recv_url, server.send_url) as legacy, \
                ExtendedClient(server.recv_url, server.send_url) as extended:
            await typed_answer(legacy, "legacy question")
            await typed_answer(extended, "extended question")
            await asyncio.sleep(0.3)
            return legacy, extended

    legacy, extended = run(scenario())
    legacy_text = "".join(r.data["answer_text"] for r in legacy.received if r.kind == "legacy")
    assert "legacy question" in legacy_text
    assert all(r.data["uid"] == legacy.uid for r in legacy.received)  # nothing of the extended session
    assert "legacy question" not in json.dumps([r.data for r in extended.received])


def test_legacy_clients_are_refused_where_they_would_be_exposed(chat_api):
    srv = start_server(chat_api, "--recv_host", "0.0.0.0", "--send_host", "0.0.0.0")
    try:
        async def scenario():
            closes = [await refusal(f"ws://127.0.0.1:{srv.recv_port}"), await refusal(f"ws://127.0.0.1:{srv.send_port}")]
            async with ExtendedClient(f"ws://127.0.0.1:{srv.recv_port}", f"ws://127.0.0.1:{srv.send_port}") as c:
                await typed_answer(c, "extended clients still work")
            return closes

        closes = run(scenario())
    finally:
        srv.stop()
    for close in closes:
        assert close.code == 4426 and close.reason.startswith("legacy clients are not allowed here")
    assert "(legacy clients refused)" in srv.log()


def test_the_log_names_sessions_by_a_hash_of_the_uid(server):
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url, uid="uid-that-must-not-be-logged") as c:
            await typed_answer(c, "hello")

    run(scenario())
    assert "uid-that-must-not-be-logged" not in server.log()
    assert f"session {uid_tag('uid-that-must-not-be-logged')} opened" in server.log()


# ---- 2. a client that does not read costs only itself ----

def stuck_socket(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection whose owner will read nothing: a small receive buffer, so the server feels it at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def established(pid: int, port: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


@pytest.fixture(scope="module")
def slow_server(chat_api):
    srv = start_server(chat_api, "--legacy_clients", "allow", "--tts", "fixed", "--playback_lead_ms", "0",
                       "--send_timeout_s", "2", "--send_buffer_kb", "256")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def test_a_sender_that_never_reads_is_closed_and_delays_no_one(slow_server, long_answers):
    """The worst case of old: a uid-less sender that never reads hears every legacy session. Now it is closed (4429)
    once its unsent answers pass --send_buffer_kb or wait --send_timeout_s, and the victims' answers are not held up."""
    srv = slow_server

    async def scenario():
        baseline = established(srv.proc.pid, srv.send_port)
        async with LegacyClient(srv.recv_url, srv.send_url) as alone:
            unhindered = await typed_answer(alone, "before the attack")
        # max_queue=1: the library stops reading the socket after one message, as a client that never reads would
        stuck = await connect(srv.send_url, sock=stuck_socket(srv.send_port), max_queue=1)
        async with LegacyClient(srv.recv_url, srv.send_url) as legacy, \
                ExtendedClient(srv.recv_url, srv.send_url) as extended:
            delays = await asyncio.gather(typed_answer(legacy, "legacy victim"), typed_answer(extended, "extended victim"))
            await asyncio.to_thread(srv.wait_for_log, "too slow", 15)
            closed_at = time.monotonic()
            while established(srv.proc.pid, srv.send_port) > baseline + 2:  # the victims' two senders stay
                assert time.monotonic() < closed_at + 5, "the server still holds the slow client's connection"
                await asyncio.sleep(0.1)
            dropped_s = time.monotonic() - closed_at
        stuck.transport.abort()
        return unhindered, delays, dropped_s

    unhindered, delays, dropped_s = run(scenario())
    assert max(delays) < unhindered + 1.0, (unhindered, delays)  # the first audio came as it did without the attacker
    assert dropped_s < 3.0  # the connection itself is gone (2 s for its close, then dropped), not only marked closed
    srv.wait_for_log("closed a slow client")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.recv_port}/metrics", timeout=5).read().decode()
    assert 's2s_connections_closed_total{code="4429"} 1.0' in metrics.splitlines()  # operators see it too


# ---- 3. compressed frames ----

def test_compression_is_not_negotiated_and_a_compressed_frame_is_refused(server):
    async def scenario():
        async with connect(f"{server.recv_url}/?uid=zipper", compression="deflate") as ws:
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
            ready = json.loads(await ws.recv())
            # A masked text frame with RSV1 set (a compressed message) that the server never agreed to.
            ws.transport.write(bytes([0xC1, 0x80 | 4]) + b"\0\0\0\0" + b"\x4b\x04\x00\x00")
            close = await closed_with(ws, 5)
            return extensions, ready, close

    extensions, ready, close = run(scenario())
    assert extensions is None and ready["event"] == "ready"
    assert close.code == 1002


# ---- 4. one client cannot lock everyone out ----

@pytest.fixture(scope="module")
def small_server(chat_api):
    srv = ServerProcess("--asr", "fixed", "--llm", "openai", "--lm_model_url", chat_api.url, "--lm_model_name", "m",
                        "--legacy_clients", "allow", "--max_sessions", "3", "--max_connections_per_client", "4",
                        "--idle_timeout_s", "2", "--resume_s", "30", env={"LLM_API_KEY": "test-key"})
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def test_one_address_cannot_take_every_connection_and_idle_senders_are_closed(small_server):
    srv = small_server

    async def scenario():
        attacker = as_client("203.0.113.9")
        held = [await connect(srv.send_url, **attacker) for _ in range(4)]  # uid-less senders, no session behind them
        over = await refusal(srv.send_url, **attacker)
        async with ExtendedClient(srv.recv_url, srv.send_url, **as_client("198.51.100.2")) as victim:
            await typed_answer(victim, "room for me")
        idle = [await closed_with(ws, 6) for ws in held]
        return over, idle

    over, idle = run(scenario())
    assert over.code == 1013 and "too many connections from your address" in over.reason
    assert {(c.code, c.reason) for c in idle} == {(4408, "idle: no session of this client for 2 s")}


def test_sessions_left_behind_give_way_to_new_clients(small_server):
    """Receivers that close leave their sessions waiting --resume_s for their clients; a new client still gets in."""
    srv = small_server

    async def scenario():
        for i in range(3):  # fill every session slot, then leave
            async with ExtendedClient(srv.recv_url, srv.send_url, **as_client(f"192.0.2.{i + 1}")):
                pass
        async with ExtendedClient(srv.recv_url, srv.send_url, **as_client("198.51.100.3")) as newcomer:
            return await typed_answer(newcomer, "a slot for me")

    assert run(scenario()) < 2.0


def test_saying_playing_once_does_not_keep_a_silent_session_open(small_server):
    """After an answer, one report that the client is playing it counts for that answer only: a little past the end
    of its audio the session is idle again, and closed as such (--idle_timeout_s 2)."""
    srv = small_server

    async def scenario():
        async with ExtendedClient(srv.recv_url, srv.send_url, **as_client("203.0.113.10")) as c:
            await typed_answer(c, "one answer")
            audio_s = sum(len(a.pcm) for a in c.events("audio")) / 2 / 16000
            await c.recv.send(json.dumps({"type": "playback", "turn": 1, "playing": True}))
            started = time.monotonic()
            await asyncio.wait([c.readers[1]], timeout=30)
            return c.recv.close_code, time.monotonic() - started, audio_s

    code, waited, audio_s = run(scenario())
    assert code == 4408 and waited < audio_s + 5 + 2 * 2 + 1, (waited, audio_s)


# ---- 6, 8. handshakes and bad requests ----

def test_a_flood_of_slow_handshakes_is_bounded_and_logged_once(server):
    """Connections that send half a request and wait, 200 from the loopback (a trusted proxy, not limited per
    address) and 60 from another address: at most 16 of one address and 128 in all are held, the ones waiting longest
    are dropped; a newcomer gets its session and answer as usual; the log gets a line or two."""
    fds = psutil.Process(server.proc.pid).num_fds

    async def scenario():
        lines_before, fds_before = len(server.lines), fds()
        slow = []
        for source, count in (("127.0.0.1", 200), ("127.0.0.2", 60)):
            for _ in range(count):
                sock = socket.socket()
                sock.bind((source, 0))
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.recv_port))
                sock.send(b"GET /?uid=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
                slow.append((source, sock))
        await asyncio.sleep(0.3)
        async with ExtendedClient(server.recv_url, server.send_url) as victim:
            delay = await typed_answer(victim, "through the flood")
        held = [source for source, sock in slow if still_open(sock)]
        for _, sock in slow:
            sock.close()
        deadline = time.monotonic() + 5
        while fds() > fds_before + 2 and time.monotonic() < deadline:  # the server lets go of every one
            await asyncio.sleep(0.1)
        return held, delay, server.lines[lines_before:], fds() - fds_before

    held, delay, lines, fds_left = run(scenario())
    assert fds_left <= 2, fds_left
    assert held.count("127.0.0.2") == 16 and len(held) <= 128, (held.count("127.0.0.2"), len(held))
    assert delay < 2.0
    flood_lines = [line for line in lines if "opening handshakes" in line]
    assert 1 <= len(flood_lines) <= 2, flood_lines


def still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read, not closed
    except OSError:
        return False


def http_get(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data


def test_bad_requests_get_400_and_refusals_are_logged_once_per_cause(server, tmp_path):
    lines_before = len(server.lines)
    for path in (b"/%00", b"/a%00b.html", b"/%ff%fe"):
        assert http_get(server.recv_port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 4")
    two_hosts = (b"GET /?uid=h HTTP/1.1\r\nHost: a\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    for port in (server.recv_port, server.send_port):
        assert http_get(port, two_hosts).startswith(b"HTTP/1.1 400")

    async def burst():
        return [await refusal(f"{server.send_url}/?uid=nobody-{i}") for i in range(40)]

    assert {c.code for c in run(burst())} == {4404}
    lines = server.lines[lines_before:]
    assert not [line for line in lines if "ERROR" in line or "Traceback" in line], lines
    assert len([line for line in lines if "refused a connection" in line]) <= 2, lines
    assert len(lines) < 20, lines


# ---- 7. --save_data loses nothing ----

def test_a_later_session_with_the_same_uid_overwrites_nothing(chat_api, tmp_path):
    (tmp_path / "old-crash").mkdir()
    (tmp_path / "old-crash" / "turn00001.json.tmp").write_bytes(b"half a file")  # left by a crash
    srv = start_server(chat_api, "--save_data", str(tmp_path))
    try:
        async def scenario():
            for question in ("first visit", "second visit"):
                async with ExtendedClient(srv.recv_url, srv.send_url, uid="returning-user") as c:
                    await typed_answer(c, question)
                    await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == 1)

        run(scenario())
    finally:
        srv.stop()
    records = sorted(tmp_path.glob(f"*-{uid_tag('returning-user')}-*/turn00001.json"))
    questions = sorted(json.loads(p.read_text())["question"] for p in records)
    assert questions == ["first visit", "second visit"]
    assert not list(tmp_path.rglob("*.tmp"))


RECORDER_SCRIPT = """
import resource, signal, sys, types
import numpy as np
sys.path.insert(0, {root!r})
import s2s_server_pipeline as s2s
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
recorder = s2s.TurnRecorder({dir!r}, {budget}, s2s.LogLimiter())
session = types.SimpleNamespace(uid="u", tag="0123abcd", save_dir=None)
for turn, seconds in enumerate({lengths}, 1):
    heard = np.zeros(int(seconds * 16000), np.float32)
    recorder.save_turn(session, s2s.Turn(turn, spoken=True, heard_audio=heard, state=s2s.TurnState.SENT), again=False)
recorder.close()
"""


def run_recorder(tmp_path, budget: float, lengths: list) -> str:
    script = RECORDER_SCRIPT.format(root=ROOT, dir=str(tmp_path), budget=budget, lengths=lengths)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_failed_write_leaves_no_temp_file_and_later_saves_go_on(tmp_path):
    log = run_recorder(tmp_path, 0, [1.0, 5.0, 1.0])  # 32 KB, 160 KB (past the 100 KB a file may have), 32 KB
    saved = sorted(p.name for p in tmp_path.rglob("*.wav"))
    assert saved == ["turn00001_input.wav", "turn00003_input.wav"], saved
    assert "could not save" in log and "turn00002_input.wav" in log


def test_saving_stops_at_its_budget_with_one_warning(tmp_path):
    log = run_recorder(tmp_path, 70_000, [1.0, 1.0, 1.0, 1.0])  # 32 KB each: two fit in 70 KB
    saved = sorted(p.name for p in tmp_path.rglob("*.wav"))
    assert saved == ["turn00001_input.wav", "turn00002_input.wav"], saved
    assert log.count("--save_data_max_mb") == 1, log
