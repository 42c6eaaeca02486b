"""The browser client (frontend_nextjs/) in headless Chromium against the real server, which serves the
built page itself (--client_dir). A fake microphone (a WAV file) asks a question, then cuts into the
answer; then the test types, starts a new topic and drops the connection, and the page resumes its session.
With a server that wants a token (--auth_token), the page takes it from its URL, or is refused and stops until
the token is set in its settings. Against a stand-in server that names its sources, the page links them. It
checks what the page shows, what it plays and what it sends, through test hooks on the page's audio output and
sockets (tests/browser/audio_tap.js); tests/browser/voice_page.mjs drives the page.

Needs Node.js, Chromium (CHROMIUM_PATH, default /usr/bin/chromium) and the built client with its
devDependencies: scripts/setup.sh --dev installs all three."""
from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import soundfile as sf
import soxr
from websockets.asyncio.server import serve

from client import load_wav, voiced_span
from conftest import ROOT, fixture, short_voice, start_server

import s2s_server_pipeline as s2s

CLIENT = os.path.join(ROOT, "frontend_nextjs")
BUILT = os.path.join(CLIENT, "out")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
MIC_RATE = 48000  # Chromium's fake capture device runs at 48 kHz; a file at that rate needs no conversion

AUDIBLE = 0.01  # peak level of a render quantum that counts as sound (-40 dBFS)
SILENCE_AFTER_QUESTION_S = 3.0  # the answer starts and plays for a while before the user cuts in


def missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (the browser client needs Node.js 20.9+; scripts/setup.sh then builds it)"
    if not os.path.isfile(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (scripts/setup.sh --dev installs it; or set CHROMIUM_PATH)"
    if not os.path.isfile(os.path.join(BUILT, "index.html")):
        return "the client is not built (scripts/setup.sh builds it: cd frontend_nextjs && npm ci && npm run build)"
    if not os.path.isdir(os.path.join(CLIENT, "node_modules", "playwright-core")):
        return "playwright-core is not installed (cd frontend_nextjs && npm ci)"
    return None


MISSING = missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def silence(s: float) -> np.ndarray:
    return np.zeros(int(s * 16000), np.float32)


def write_mic(path: str, *parts: np.ndarray) -> None:
    """16 kHz mono parts, one after the other, as a 48 kHz stereo file for Chromium's fake microphone."""
    mono = soxr.resample(np.concatenate(parts), 16000, MIC_RATE)
    sf.write(path, np.stack([mono, mono], axis=1), MIC_RATE, subtype="PCM_16")


def write_mic_wav(path: str) -> None:
    """Silence, the question, a pause while the answer plays, the interruption, silence."""
    write_mic(path, silence(1.0), load_wav(fixture("en_question.wav")), silence(SILENCE_AFTER_QUESTION_S),
              load_wav(fixture("en_interrupt.wav")), silence(6.0))


def silent_mic(tmp_path, screenshot_name: str) -> tuple:
    """A second of silence, which Chromium's fake microphone plays in a loop (the page always has audio to
    send), and where the scenario's screenshot goes."""
    mic_wav = str(tmp_path / "silence.wav")
    sf.write(mic_wav, np.zeros((MIC_RATE, 2), np.float32), MIC_RATE, subtype="PCM_16")
    os.makedirs(ARTIFACTS, exist_ok=True)
    return mic_wav, os.path.join(ARTIFACTS, screenshot_name)


def run_page(scenario: str, url: str, mic_wav: str, screenshot: str, *extra: str) -> dict:
    """Runs one scenario of tests/browser/voice_page.mjs; returns what it reported."""
    proc = subprocess.run(["node", os.path.join(ROOT, "tests", "browser", "voice_page.mjs"), scenario, url, mic_wav,
                           screenshot, *extra], capture_output=True, text=True, timeout=120)
    try:
        page = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"the browser script failed:\n{proc.stderr}\n{proc.stdout[-2000:]}") from None
    page["log"] = proc.stderr
    return page


def summary(page: dict) -> str:
    """What the page showed and heard, for failure messages (without the per-quantum levels)."""
    return json.dumps({k: v for k, v in page.items() if k not in ("quanta", "audio")}, indent=1)[-6000:]


def check_ran(page: dict, server_log: str = "") -> None:
    """The scenario ran to its end, with no error in the page (nor in the server)."""
    assert "failure" not in page, summary(page) + "\nserver log:\n" + server_log[-3000:]
    assert not page["pageErrors"] and not [m for m in page["console"] if m.startswith("error")], page["console"]
    assert "Traceback" not in server_log, server_log


def receiver_readies(page: dict) -> list:
    """The receiver socket's `ready` events, one per connection made: only they carry the session key."""
    return [e for e in page["events"] if e["event"] == "ready" and "session_key" in e]


def offered(sockets: list, send_port: int, token: str = "") -> list:
    """Which socket each one was and the session key it offered (None: none). On the way, checks that each offers
    "s2s", then the key and the token (if any) as subprotocols, or nothing when it has neither, and that no socket
    URL carries a secret."""
    found = []
    for socket in sockets:
        protocols = list(socket["protocols"])
        if token:
            assert protocols[-1:] == [f"s2s.token.{token}"], socket
            protocols.pop()
        key = protocols.pop()[len("s2s.key."):] if protocols[-1:] and protocols[-1].startswith("s2s.key.") else None
        assert protocols == (["s2s"] if key or token else []), socket
        assert "token" not in socket["url"] and "key" not in socket["url"], socket
        assert key is None or (re.fullmatch(r"[A-Za-z0-9_-]{16,}", key) and key not in socket["url"]), socket
        found.append(("sender" if urlparse(socket["url"]).port == send_port else "receiver", key))
    return found


def sound_between(quanta: np.ndarray, start: float, end: float) -> np.ndarray:
    """Start times of the audible render quanta in [start, end) on the audio clock."""
    times, peaks = quanta[:, 0], quanta[:, 1]
    return times[(times >= start) & (times < end) & (peaks > AUDIBLE)]


def test_talk_listen_and_cut_in(chat_api, long_answers, tmp_path, capsys):
    os.makedirs(ARTIFACTS, exist_ok=True)
    mic_wav, screenshot = str(tmp_path / "mic.wav"), os.path.join(ARTIFACTS, "browser.png")
    write_mic_wav(mic_wav)
    srv = start_server(chat_api, "--client_dir", BUILT)
    try:
        page = run_page("talk", f"http://127.0.0.1:{srv.recv_port}/", mic_wav, screenshot)
    finally:
        srv.stop()
    with capsys.disabled():
        print(f"\nbrowser test screenshot: {screenshot}")
    check_ran(page, srv.log())

    # What the page shows: the transcripts of both utterances, and both answers.
    first, second = page["spoken"][:2]
    heard = re.fullmatch(r"heard (\d+\.\d) seconds", first["user"])
    # The question (3.1 s of speech) reached the server whole, resampled to 16 kHz by the page.
    assert heard and 2.8 <= float(heard[1]) <= 4.0, first
    assert first["answer"].startswith(f"About {first['user']}:"), first
    # Latency, as the server measured it and as the page did (your voice stopped → the answer played).
    latency = re.search(r"interrupted(\d+) ms voice-to-voice(\d+) ms in this browser", first["meta"])
    assert latency and 300 < int(latency[1]) < 3000 and 300 < int(latency[2]) < 3000, first
    assert re.fullmatch(r"heard \d+\.\d seconds", second["user"]), second
    assert second["answer"].startswith(f"About {second['user']}:"), second

    # What it plays, on the audio clock (seconds).
    quanta = np.array(page["quanta"])
    quantum_s = 128 / page["sampleRate"]
    events = page["events"]
    interrupt = next(e for e in events if e["event"] == "interrupt")
    assert interrupt["turn"] == 1
    # The answer paused as soon as the server heard the voice (then, its words being no backchannel, was cut off):
    # it must stop playing at the pause.
    cut = next(e for e in events if e["event"] in ("pause", "interrupt"))
    assert cut["turn"] == 1 and not [e for e in events if e["event"] == "resume"]
    turn1 = [a for a in page["audio"] if a["turn"] == 1]
    first_frame = turn1[0]["t"]
    onset = sound_between(quanta, first_frame - quantum_s, first_frame + 1.0)
    assert len(onset), "the answer's first audio did not play"
    assert onset[0] - first_frame < 0.25, onset[0] - first_frame  # it starts playing as soon as it arrives
    assert len(sound_between(quanta, cut["t"] - 1.0, cut["t"])), "nothing was playing when the answer paused"
    # It plays until the pause, then stops at once (turn 2's answer comes seconds later).
    played = sound_between(quanta, first_frame - quantum_s, cut["t"] + 0.5)
    stop = played[-1] + quantum_s
    played_s = stop - played[0]
    stop_latency_ms = (stop - cut["t"]) * 1000
    sent_s = sum(a["samples"] for a in turn1) / 16000
    with capsys.disabled():
        print(f"browser test: the answer played {played_s:.2f} s of the {sent_s:.2f} s received, "
              f"and stopped {stop_latency_ms:.0f} ms after the {cut['event']} arrived")
    assert stop_latency_ms < 100, stop_latency_ms
    assert played_s <= sent_s + quantum_s, (played_s, sent_s)
    # The page reported what it played, and that it stopped, so the server's history keeps only that. The
    # player counts the samples it played: had it run dry between chunks (a gap), it would count fewer
    # than the time from the answer's first sound to its last. (Turn numbers never restart: the page resumes
    # its session after the dropped connection below.)
    reports = [m for m in page["sent"] if m.get("type") == "playback" and m["turn"] == 1]
    assert reports and reports[-1]["playing"] is False, reports[-3:]
    # At least what was heard, at most what could play until the pause came (the sound may have ended earlier, in
    # a gap between words: then what was heard is shorter than what played).
    reported_s = reports[-1]["played_ms"] / 1000
    assert played_s - 0.1 < reported_s < cut["t"] + quantum_s - played[0] + 0.1, (reports[-1], played_s, cut["t"] - played[0])
    # The page greys what never played of the cut answer (paced audio leaves little of it: often nothing), and what
    # it does not grey is what the server's history keeps.
    request = next(r["messages"] for r in chat_api.chat_requests() if len(r["messages"]) > 2)
    kept = request[2]["content"][:-len(s2s.INTERRUPTED_MARK)]
    assert kept and first["answer"] == kept + first["unheard"], (first, kept)

    # The next turn's answer plays too.
    turn2 = [a for a in page["audio"] if a["turn"] == 2]
    assert len(sound_between(quanta, turn2[0]["t"] - quantum_s, turn2[0]["t"] + 1.0)), "the next answer did not play"

    # Typed text is answered like speech (and cuts off the answer still playing).
    typed = page["typed"][-1]
    assert typed["user"] == "what is two plus two" and typed["answer"].startswith("About what is two plus two:"), typed
    assert any(e["event"] == "interrupt" and e["turn"] == 2 for e in events)
    # "New topic" cleared the view, and the server forgot the old topic.
    assert page["afterNewTopic"] == [], page["afterNewTopic"]
    assert [(x["user"], x["answer"].split(":")[0]) for x in page["newTopic"]] == [("hello again", "About hello again")]
    new_topic_request = next(request["messages"] for request in chat_api.chat_requests()
                             if request["messages"][-1]["content"] == "hello again")
    assert [m["role"] for m in new_topic_request] == ["system", "user"], new_topic_request
    # After the connection dropped, the page came back by itself, under the same uid, to the same session...
    ready = receiver_readies(page)
    key = ready[0]["session_key"]
    assert [(e["session_key"], e["resumed"]) for e in ready] == [(key, False), (key, True)], ready
    assert len({e["uid"] for e in events if e["event"] == "ready"}) == 1
    # ...with the key the server gave it, which opened the sender socket, in a subprotocol and never in a URL.
    assert offered(page["sockets"], srv.send_port) == [("receiver", None), ("sender", key), ("receiver", key),
                                                       ("sender", key)], page["sockets"]
    # The conversation went on: still on screen, the turns counting on, and the agent remembers it.
    before, after = page["newTopic"], page["reconnected"]
    assert [(x["turn"], x["user"]) for x in after[:-1]] == [(x["turn"], x["user"]) for x in before], (before, after)
    assert after[-1]["turn"] == before[-1]["turn"] + 1, (before, after)
    assert after[-1]["answer"].startswith("About are you back:"), after
    resumed_request = next(request["messages"] for request in chat_api.chat_requests()
                           if request["messages"][-1]["content"] == "are you back")
    assert {"role": "user", "content": "hello again"} in resumed_request, resumed_request
    assert not [n for n in page["notices"] if "new conversation" in n], page["notices"]


# ---- a server that wants a token ----

TOKEN = "s3cret-Token_1.~"  # every character a token may have
REFUSED = "unauthorized: missing or wrong token"  # the server's reason, which the page shows
IDLE_TIMEOUT_S = 3  # the server closes a receiver that sends nothing this long


@pytest.fixture(scope="module")
def token_server(chat_api):
    srv = start_server(chat_api, "--client_dir", BUILT, "--auth_token", TOKEN, "--idle_timeout_s", str(IDLE_TIMEOUT_S))
    yield srv
    srv.stop()


def test_a_backchannel_pauses_the_page_and_it_plays_on_losing_nothing(chat_api, long_answers, tmp_path):
    """"mm" over the answer: the page stops playing at the pause, stays silent, and plays on at the resume from
    where it stopped, to the answer's end: it plays all it received, no more (nothing lost, nothing twice)."""
    mic_wav, screenshot = str(tmp_path / "mic.wav"), os.path.join(ARTIFACTS, "browser-backchannel.png")
    write_mic(mic_wav, silence(1.0), load_wav(fixture("en_question.wav")), silence(SILENCE_AFTER_QUESTION_S), short_voice(),
              silence(20.0))
    srv = start_server(chat_api, "--client_dir", BUILT, "--asr_short_s", "1.2", "--asr_short_words", "Mm.")
    try:
        page = run_page("backchannel", f"http://127.0.0.1:{srv.recv_port}/", mic_wav, screenshot)
    finally:
        srv.stop()
    check_ran(page, srv.log())
    events = page["events"]
    (pause,) = [e for e in events if e["event"] == "pause"]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert pause["turn"] == resume["turn"] == 1 and resume["heard"] == "Mm."
    assert not [e for e in events if e["event"] == "interrupt"]
    quanta, quantum_s = np.array(page["quanta"]), 128 / page["sampleRate"]
    assert len(sound_between(quanta, pause["t"] - 1.0, pause["t"])), "nothing was playing when the answer paused"
    held = sound_between(quanta, pause["t"] + 0.1, resume["t"])  # (a fade and the page's clock: 0.1 s)
    assert len(held) == 0, f"{len(held) * quantum_s:.2f} s played while paused"
    assert len(sound_between(quanta, resume["t"], resume["t"] + 1.0)), "it did not play on after the resume"
    received_ms = sum(a["samples"] for a in page["audio"] if a["turn"] == 1) / 16
    played_ms = [m for m in page["sent"] if m.get("type") == "playback" and m["turn"] == 1][-1]["played_ms"]
    assert abs(played_ms - received_ms) < 20, (played_ms, received_ms)  # all it received, each frame once
    (exchange,) = page["spoken"]
    assert "went on after “Mm.”" in exchange["meta"] and "interrupted" not in exchange["meta"], exchange


def test_words_after_a_pause_carry_the_question_on_in_one_exchange(chat_api, tmp_path):
    """Half a question, a pause long enough to end the turn (its answer starts), then the rest over that answer: the
    page shows one exchange, the whole question and the answer to it; the cut answer to the half is gone, as it is
    from the server's history."""
    mic_wav, screenshot = str(tmp_path / "mic.wav"), os.path.join(ARTIFACTS, "browser-spoken-on.png")
    question, rest = load_wav(fixture("en_question.wav")), load_wav(fixture("en_interrupt.wav"))
    write_mic(mic_wav, silence(1.0), question[:voiced_span(question)[1]], silence(0.9), rest[voiced_span(rest)[0]:],
              silence(8.0))
    srv = start_server(chat_api, "--client_dir", BUILT)
    try:
        page = run_page("spokenOn", f"http://127.0.0.1:{srv.recv_port}/", mic_wav, screenshot)
    finally:
        srv.stop()
    check_ran(page, srv.log())
    first, then = ([e["text"] for e in page["events"] if e["event"] == "transcript" and e["final"] and e["turn"] == n]
                   for n in (1, 2))
    assert [e["continues"] for e in page["events"] if e["event"] == "transcript" and e["turn"] == 2] == [1]
    assert [e["turn"] for e in page["events"] if e["event"] == "interrupt"] == [1]  # its answer had begun
    (exchange,) = page["spoken"]
    assert exchange["turn"] == 2 and exchange["user"] == f"{first[0]} {then[0]}", exchange
    assert exchange["answer"].startswith(f"About {first[0]} {then[0]}:"), exchange  # the LLM was asked the whole
    assert "one question across a pause" in exchange["meta"] and "interrupted" not in exchange["meta"], exchange


def test_token_from_the_page_url(token_server, tmp_path):
    mic_wav, screenshot = silent_mic(tmp_path, "browser_token.png")
    base = f"http://127.0.0.1:{token_server.recv_port}/"
    page = run_page("token", f"{base}?token={TOKEN}", mic_wav, screenshot)
    check_ran(page, token_server.log())

    # It connected and a typed message was answered.
    assert page["answered"][-1]["answer"].startswith("About what is the weather:"), page["answered"]
    # The token left the address bar at once (nothing to bookmark or share), and the tab kept it: after a
    # reload, without the token in the URL, the page connects and talks again.
    assert page["pageUrl"] == base and page["reloadedUrl"] == base, (page["pageUrl"], page["reloadedUrl"])
    assert page["afterReload"][-1]["answer"].startswith("About still there:"), page["afterReload"]
    # It went to the server in a subprotocol, not in a socket URL (which proxies log), and not to the console;
    # so did the session key, to the sender socket. The page's second life (the reload) is a new session.
    before, after = (offered(page[name], token_server.send_port, TOKEN) for name in ("socketsBeforeReload", "sockets"))
    assert [name for name, _ in before] == [name for name, _ in after] == ["receiver", "sender"], (before, after)
    assert before[0][1] is None and after[0][1] is None and before[1][1] != after[1][1], (before, after)
    assert after[1][1] == receiver_readies(page)[0]["session_key"], (after, page["events"])
    assert not [m for m in page["console"] if TOKEN in m], page["console"]
    assert REFUSED not in token_server.log()

    # A message longer than the server's --max_text_chars: a short notice, and the message marked failed.
    assert "That message is too long for the server: send a shorter one." in page["tooLong"]["notices"], page["tooLong"]
    too_long = page["tooLong"]["exchanges"][-1]
    assert too_long["user"].startswith("xxx") and too_long["answer"] == "" and "failed" in too_long["meta"], too_long


def test_wrong_token_stops_until_set_in_settings(token_server, tmp_path):
    mic_wav, screenshot = silent_mic(tmp_path, "browser_refused.png")
    refused_before = token_server.log().count(REFUSED)
    page = run_page("refused", f"http://127.0.0.1:{token_server.recv_port}/?token=wrong-token-123", mic_wav,
                    screenshot, TOKEN)
    check_ran(page, token_server.log())

    # Refused: the page says why, with the server's reason, and where to fix it...
    assert "The server refused the token: set the right one in Settings." in page["refusal"], page["refusal"]
    assert REFUSED in page["refusal"] and "Connection refused" in page["statusWhenRefused"], page["statusWhenRefused"]
    # ...and does not try again by itself: one socket, one refused connection on the server.
    assert not page["triedAgain"] and page["socketsWhileRefused"] == 1, page["sockets"]
    assert token_server.log().count(REFUSED) - refused_before == 1, token_server.log()[-3000:]
    # The token typed in the settings panel (a password field, not shown) connects it, and it talks.
    assert page["tokenFieldType"] == "password"
    assert page["refusalsAfterSave"] == 0
    assert page["answered"][-1]["answer"].startswith("About let me in:"), page["answered"]
    assert not [m for m in page["console"] if "wrong-token-123" in m or TOKEN in m], page["console"]

    # Muted, the page sent nothing; the server closed the idle receiver and the page came back quietly: no
    # refusal, no notice, the conversation still on screen, the same session id.
    assert any(c["code"] == 4408 for c in page["closes"]), page["closes"]
    idle = page["afterIdle"]
    assert idle["refusals"] == 0 and idle["notices"] == [], idle
    assert idle["exchanges"] and idle["exchanges"][-1]["answer"].startswith("About let me in:"), idle
    assert len({e["uid"] for e in page["events"] if e["event"] == "ready"}) == 1
    # It came back to the same session, with its key.
    first, *later = receiver_readies(page)
    assert later and all(e["resumed"] and e["session_key"] == first["session_key"] for e in later), (first, later)


# ---- sources, from a stand-in server ----

SOURCES_BEFORE = [  # sent before the answer
    {"title": "Solar panel – Wikipedia", "url": "https://en.wikipedia.org/wiki/Solar_panel"},
    {"title": "<img src=x onerror=alert(1)>Installer's manual", "url": "docs/manual.pdf"},
    {"title": "Click me", "url": "javascript:alert(1)"},
]
SOURCES_DURING = [  # sent while it streams: one already given, and more than fit
    {"title": "Solar panel (again)", "url": "https://en.wikipedia.org/wiki/Solar_panel"},
    {"title": "Panel prices", "url": "http://example.org/prices"},
    {"title": "", "url": "https://example.org/fifth"},
    {"title": "Sixth", "url": "https://example.org/sixth"},
]


class SourcesServer:
    """Both sockets of the extended protocol (version 2), as a server that looks things up before it answers
    speaks them: `ready` with a session key on the receiver socket, then on the sender socket that presents the
    key; for each typed question, a `sources` event before the answer and another while it streams (with a
    source already given, markup in a title, a document path, a script URL, and more sources than the page
    shows). It records what the receiver socket gets."""

    def __init__(self):
        self.received: list = []  # the receiver's JSON messages
        self.audio_frames = 0
        self.keys: dict = {}  # session key -> uid
        self.senders: dict = {}  # uid -> sender socket
        self.turns = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.serve(started),), daemon=True)
        self.thread.start()
        assert started.wait(10), "the stand-in server did not start"

    async def serve(self, started: threading.Event) -> None:
        self.stopped = asyncio.Event()
        pick = self.select_subprotocol
        async with (serve(self.receiver, "127.0.0.1", 0, select_subprotocol=pick) as recv,
                    serve(self.sender, "127.0.0.1", 0, select_subprotocol=pick) as send):
            self.recv_port, self.send_port = (s.sockets[0].getsockname()[1] for s in (recv, send))
            started.set()
            await self.stopped.wait()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(10)

    @staticmethod
    def select_subprotocol(ws, offered: list):
        """A browser drops a connection whose server selects none of the subprotocols it offered."""
        return "s2s" if "s2s" in offered else None

    @staticmethod
    def uid(ws) -> str:
        return parse_qs(urlparse(ws.request.path).query)["uid"][0]

    @staticmethod
    def key(ws) -> str:
        offered = [p.strip() for h in ws.request.headers.get_all("Sec-WebSocket-Protocol") for p in h.split(",")]
        return next((p[len("s2s.key."):] for p in offered if p.startswith("s2s.key.")), "")

    async def sender(self, ws) -> None:
        if self.keys.get(self.key(ws)) != self.uid(ws):
            await ws.close(4404, "unknown session or wrong session key")
            return
        self.senders[self.uid(ws)] = ws
        await ws.send(json.dumps({"event": "ready", "uid": self.uid(ws), "protocol": 3, "sample_rate": 16000}))
        await ws.wait_closed()

    async def receiver(self, ws) -> None:
        key = secrets.token_urlsafe(24)
        self.keys[key] = self.uid(ws)
        await ws.send(json.dumps({"event": "ready", "uid": self.uid(ws), "session_key": key, "protocol": 3,
                                  "sample_rate": 16000, "resumed": False}))
        async for message in ws:
            if isinstance(message, bytes):
                self.audio_frames += 1
                continue
            self.received.append(json.loads(message))
            if self.received[-1].get("type") == "user_input":
                await self.answer(self.senders[self.uid(ws)], self.received[-1]["text"])

    async def answer(self, ws, question: str) -> None:
        self.turns += 1
        turn, text = self.turns, f"About {question}: they turn light into power."
        for event in ({"event": "sources", "turn": turn, "sources": SOURCES_BEFORE},
                      {"event": "answer", "turn": turn, "seq": 0, "text": text, "end": False},
                      {"event": "sources", "turn": turn, "sources": SOURCES_DURING},
                      {"event": "answer", "turn": turn, "seq": 1, "text": "", "end": True}):
            await ws.send(json.dumps(event))


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def client_site():
    """The built page from a plain static file server, as any web server would serve it."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFiles, directory=BUILT))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_sources_are_links_and_a_muted_page_keeps_alive(client_site, tmp_path):
    mic_wav, screenshot = silent_mic(tmp_path, "browser_sources.png")
    server = SourcesServer()
    try:
        url = f"{client_site}?receiver=ws://127.0.0.1:{server.recv_port}&sender=ws://127.0.0.1:{server.send_port}"
        page = run_page("sources", url, mic_wav, screenshot)
    finally:
        server.stop()
    check_ran(page)
    assert page["answered"][-1]["answer"] == "About tell me about solar panels: they turn light into power."

    # Under the answer: each source once, five at most, in the order given. Web addresses are links that open
    # apart from the page (with the host they lead to beside them); anything else is text, markup included.
    shown = page["sources"]
    wiki, manual, script, prices, fifth = shown  # "Sixth" did not fit, the repeated Wikipedia page is not shown again
    new_tab = {"target": "_blank", "rel": "noopener noreferrer"}
    assert wiki["links"] == [{"href": SOURCES_BEFORE[0]["url"], "text": "Solar panel – Wikipedia", **new_tab}], wiki
    assert wiki["text"].endswith("en.wikipedia.org"), wiki
    assert manual == {"text": "<img src=x onerror=alert(1)>Installer's manual docs/manual.pdf", "links": []}, manual
    assert script == {"text": "Click me javascript:alert(1)", "links": []}, script
    assert prices["links"] == [{"href": "http://example.org/prices", "text": "Panel prices", **new_tab}], prices
    assert fifth["links"] == [{"href": "https://example.org/fifth", "text": "https://example.org/fifth", **new_tab}]
    assert page["elementsInSources"] == 0  # the title's <img> stayed text

    # Muted, the page sent no audio, and after half a minute a keepalive, so the server does not close it as idle.
    assert server.audio_frames > 0  # it streamed the microphone before
    assert {"type": "keepalive"} in server.received, server.received
