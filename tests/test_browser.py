"""The browser client (frontend_nextjs/) in headless Chromium against the real server, which serves the
built page itself (--client_dir). A fake microphone (a WAV file) asks a question, then cuts into the
answer; then the test types, starts a new topic and drops the connection. It checks what the page shows,
what it plays and what it sends, through test hooks on the page's audio output and sockets
(tests/browser/audio_tap.js); tests/browser/voice_page.mjs drives the page.

Needs Node.js, Chromium (CHROMIUM_PATH, default /usr/bin/chromium) and the built client with its
devDependencies: scripts/setup.sh --dev installs all three."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from client import load_wav
from conftest import ROOT, fixture, start_server

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


def write_mic_wav(path: str) -> None:
    """Silence, the question, a pause while the answer plays, the interruption, silence; 48 kHz stereo."""
    def silence(s: float) -> np.ndarray:
        return np.zeros(int(s * 16000), np.float32)
    speech = np.concatenate([silence(1.0), load_wav(fixture("en_question.wav")), silence(SILENCE_AFTER_QUESTION_S),
                             load_wav(fixture("en_interrupt.wav")), silence(6.0)])
    mono = soxr.resample(speech, 16000, MIC_RATE)
    sf.write(path, np.stack([mono, mono], axis=1), MIC_RATE, subtype="PCM_16")


def run_page(url: str, mic_wav: str, screenshot: str) -> dict:
    proc = subprocess.run(["node", os.path.join(ROOT, "tests", "browser", "voice_page.mjs"), url, mic_wav, screenshot],
                          capture_output=True, text=True, timeout=120)
    try:
        page = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"the browser script failed:\n{proc.stderr}\n{proc.stdout[-2000:]}") from None
    page["log"] = proc.stderr
    return page


def summary(page: dict) -> str:
    """What the page showed and heard, for failure messages (without the per-quantum levels)."""
    return json.dumps({k: v for k, v in page.items() if k not in ("quanta", "audio")}, indent=1)[-6000:]


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
        page = run_page(f"http://127.0.0.1:{srv.recv_port}/", mic_wav, screenshot)
    finally:
        srv.stop()
    with capsys.disabled():
        print(f"\nbrowser test screenshot: {screenshot}")
    assert "failure" not in page, summary(page) + "\nserver log:\n" + srv.log()[-3000:]
    assert not page["pageErrors"] and not [m for m in page["console"] if m.startswith("error")], page["console"]
    assert "Traceback" not in srv.log(), srv.log()

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
    turn1 = [a for a in page["audio"] if a["turn"] == 1]
    first_frame = turn1[0]["t"]
    onset = sound_between(quanta, first_frame - quantum_s, first_frame + 1.0)
    assert len(onset), "the answer's first audio did not play"
    assert onset[0] - first_frame < 0.25, onset[0] - first_frame  # it starts playing as soon as it arrives
    assert len(sound_between(quanta, interrupt["t"] - 1.0, interrupt["t"])), "nothing was playing at the interrupt"
    # It plays until the interrupt, then stops at once (turn 2's answer comes seconds later).
    played = sound_between(quanta, first_frame - quantum_s, interrupt["t"] + 0.5)
    stop = played[-1] + quantum_s
    played_s = stop - played[0]
    stop_latency_ms = (stop - interrupt["t"]) * 1000
    sent_s = sum(a["samples"] for a in turn1) / 16000
    with capsys.disabled():
        print(f"browser test: the answer played {played_s:.2f} s of the {sent_s:.2f} s received, "
              f"and stopped {stop_latency_ms:.0f} ms after the interrupt arrived")
    assert stop_latency_ms < 100, stop_latency_ms
    assert played_s <= sent_s + quantum_s, (played_s, sent_s)
    # The page reported what it played, and that it stopped, so the server's history keeps only that. The
    # player counts the samples it played: had it run dry between chunks (a gap), it would count fewer
    # than the time from the answer's first sound to its last.
    reconnected_at = [e["t"] for e in events if e["event"] == "ready"][1]  # turns count from 1 again then
    reports = [m for m in page["sent"] if m.get("type") == "playback" and m["turn"] == 1 and m["t"] < reconnected_at]
    assert reports and reports[-1]["playing"] is False, reports[-3:]
    assert abs(reports[-1]["played_ms"] / 1000 - played_s) < 0.1, (reports[-1], played_s)

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
    # After the connection dropped, the page came back by itself, under the same uid, and goes on.
    ready = [e for e in events if e["event"] == "ready"]
    assert len(ready) >= 2 and len({e["uid"] for e in ready}) == 1, ready
    assert page["reconnected"][-1]["answer"].startswith("About are you back:"), page["reconnected"]
