"""Fault injection through the real server process and real sockets: the LLM API down, slow, failing mid-stream
or sending garbage; the ASR or the TTS raising; a client vanishing at every stage of a turn; SIGTERM during a
turn. In each case the user sees a short error with a code, the session goes on where it can, other sessions
are untouched, and what was saved stays whole."""
from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import signal
import time
import wave

import pytest

from client import ExtendedClient
from conftest import fixture, long_answer, saved_file, short_answer
from fakes import FakeChatAPI
from server_process import ServerProcess

from s2s_server_pipeline import uid_tag


def start(chat: FakeChatAPI, *flags: str) -> ServerProcess:
    return ServerProcess("--asr", "fixed", "--asr_latency_ms", "50", "--llm", "openai", "--lm_model_url", chat.url,
                         "--lm_model_name", "test-model", "--tts", "fixed", *flags, env={"LLM_API_KEY": "test-key"})


def answer(messages: list) -> str:
    """Talks for about fifteen seconds when asked for something long, else about three."""
    return long_answer(messages) if "long" in messages[-1]["content"] else short_answer(messages)


def heard_text(c: ExtendedClient, turn: int) -> str:
    return "".join(r.data["text"] for r in c.events("answer", turn))


def error_codes(c: ExtendedClient, turn: int | None = None) -> list:
    return [e.data["code"] for e in c.events("error", turn)]


async def turn_over(c: ExtendedClient, turn: int, timeout: float = 20.0) -> None:
    """Wait for the metrics event that closes a turn (answered, failed or cut off)."""
    await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == turn, timeout)


async def ask(c: ExtendedClient, text: str, turn: int, timeout: float = 20.0) -> float:
    """Send a question and wait for its turn to end; how long that took, in seconds."""
    t0 = time.monotonic()
    await c.send_text(text)
    await turn_over(c, turn, timeout)
    return time.monotonic() - t0


def assert_answered(c: ExtendedClient, turn: int, question: str | None = None) -> None:
    """The turn got the whole answer, with audio, and no error."""
    text = heard_text(c, turn)
    assert text.startswith(f"About {question or ''}") and text.endswith("the end."), (turn, text, c.received[-5:])
    assert [r.data["end"] for r in c.events("answer", turn)][-1] is True
    assert sum(len(r.pcm) for r in c.events("audio", turn)) > 2 * 16000  # over a second of int16 audio
    assert error_codes(c, turn) == [] and not c.events("interrupt", turn)


def assert_failed(c: ExtendedClient, turn: int, code: str) -> None:
    """The user saw one short error with this code for the turn, and nothing of the turn came after the answer's end."""
    errors = c.events("error", turn)
    assert [e.data["code"] for e in errors] == [code], [e.data for e in c.events("error")]
    assert 0 < len(errors[0].data["message"]) <= 300, errors[0].data
    items = [r for r in c.received if r.data.get("turn") == turn and r.kind in ("answer", "audio")]
    ends = [i for i, r in enumerate(items) if r.kind == "answer" and r.data["end"]]
    assert len(ends) <= 1 and (not ends or ends[0] == len(items) - 1), [(r.kind, r.data) for r in items]


@pytest.fixture(scope="module")
def chat():
    with FakeChatAPI(answer=answer, first_token_delay_s=0.1, token_delay_s=0.01) as api:
        yield api


@pytest.fixture(scope="module")
def faulty(chat):
    """The ASR breaks on utterances over 5 s (zh_question.wav, not en_question.wav); the TTS on "KABOOM". Answer
    audio goes out as soon as it is made (--playback_lead_ms 0), to keep the tests short."""
    srv = start(chat, "--lm_timeout_s", "2", "--asr_fail_over_s", "5", "--tts_fail_on", "KABOOM", "--playback_lead_ms", "0")
    yield srv
    srv.stop()
    # The only tracebacks logged are those of the injected faults.
    for block in srv.log().split("Traceback (most recent call last)")[1:]:
        assert "RuntimeError: test fault" in block, block


@pytest.fixture
def llm_fault(chat):
    """Break only the LLM requests whose question mentions "breakdown"; other sessions and turns are served."""
    def broken(messages):
        return "breakdown" in messages[-1]["content"]

    def set_fault(kind):
        if kind == "no_first_token":
            chat.first_token_delay_s = lambda m: 15.0 if broken(m) else 0.1
        else:
            chat.fault = lambda m: kind if broken(m) else None
            chat.slow_s = 15.0  # "stall": no next token for that long
    yield set_fault
    chat.fault, chat.first_token_delay_s, chat.slow_s = None, 0.1, FakeChatAPI.slow_s


def test_llm_api_down_reports_llm_failed_and_the_session_answers_once_it_is_back():
    with FakeChatAPI(answer=answer) as api:
        srv = start(api)  # its start-up check reached the API
        try:
            api.stop()  # nothing listens on its port any more

            async def scenario():
                async with ExtendedClient(srv.recv_url, srv.send_url) as c:
                    failed_s = await ask(c, "are you there", 1)
                    api.restart()
                    await ask(c, "are you back", 2)
                    return c, failed_s

            c, failed_s = asyncio.run(scenario())
            assert_failed(c, 1, "llm_failed")
            assert "cannot be reached" in c.events("error", 1)[0].data["message"]
            assert failed_s < 5 and not c.events("audio", 1)
            assert_answered(c, 2, "are you back")
        finally:
            srv.stop()
    assert srv.proc.returncode == 0


# fault -> whether part of the answer was generated (and must be heard) before it
LLM_FAULTS = {"no_first_token": False, "stall": True, "cut": True, "error": True,
              "not_json": False, "wrong_shape": False, "not_sse": False}


@pytest.mark.parametrize("fault", list(LLM_FAULTS))
def test_llm_fault_is_reported_and_other_sessions_and_turns_go_on(faulty, chat, llm_fault, fault):
    """Slow (no first token, or no next token, within --lm_timeout_s 2), failing mid-stream (connection cut, error
    event) or garbage (SSE data that is not JSON, JSON without choices, an HTML page): one llm_failed error, the
    part already generated is heard, a concurrent session is served as usual, and the next turn is answered."""
    llm_fault(fault)

    async def scenario():
        async with ExtendedClient(faulty.recv_url, faulty.send_url) as a, \
                ExtendedClient(faulty.recv_url, faulty.send_url) as b:
            failed_s, _ = await asyncio.gather(ask(a, "breakdown", 1), ask(b, "a normal question", 1))
            await ask(a, "are you fine now", 2)
            return a, b, failed_s

    a, b, failed_s = asyncio.run(scenario())
    assert_failed(a, 1, "llm_failed")
    assert failed_s < 8  # --lm_timeout_s 2 bounds the wait for a silent API (15 s here)
    heard = heard_text(a, 1)
    if LLM_FAULTS[fault]:
        assert heard.startswith("About breakdown:") and "the end." not in heard and a.events("audio", 1), heard
    else:
        assert heard.strip() == "" and not a.events("audio", 1), heard
    assert_answered(a, 2, "are you fine now")
    assert_answered(b, 1, "a normal question")


def test_asr_raising_is_reported_and_the_session_goes_on(faulty):
    async def scenario():
        async with ExtendedClient(faulty.recv_url, faulty.send_url) as a, \
                ExtendedClient(faulty.recv_url, faulty.send_url) as b:
            await asyncio.gather(a.stream_wav(fixture("zh_question.wav")), b.stream_wav(fixture("en_question.wav")))
            await asyncio.gather(turn_over(a, 1), turn_over(b, 1))
            await a.stream_wav(fixture("en_question.wav"))
            await turn_over(a, 2)
            return a, b

    a, b = asyncio.run(scenario())
    assert_failed(a, 1, "asr_failed")
    assert not a.events("transcript", 1) and not a.events("answer", 1)
    assert_answered(a, 2, "heard 3.")
    assert_answered(b, 1, "heard 3.")
    assert "asr failed on session" in faulty.log()


def test_tts_raising_is_reported_and_the_session_goes_on(faulty, chat):
    async def scenario():
        async with ExtendedClient(faulty.recv_url, faulty.send_url) as a, \
                ExtendedClient(faulty.recv_url, faulty.send_url) as b:
            await asyncio.gather(ask(a, "KABOOM", 1), ask(b, "a normal question", 1))
            with contextlib.suppress(TimeoutError):  # give the rest of the broken answer time to show up, if it does
                await a.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == 1, timeout=2)
            await ask(a, "say it again", 2)
            return a, b

    a, b = asyncio.run(scenario())
    assert_failed(a, 1, "tts_failed")
    assert not a.events("audio", 1)  # neither the failing chunk nor the rest of the broken answer was spoken
    assert_answered(a, 2, "say it again")
    assert_answered(b, 1, "a normal question")


# ---- a client vanishing at every stage of a turn ----

@pytest.fixture(scope="module")
def stalling(chat):
    """The ASR takes 3 s more on utterances over 5 s (zh_question.wav), the TTS on text containing "STALL"."""
    srv = start(chat, "--asr_stall_over_s", "5", "--tts_stall_on", "STALL", "--stall_s", "3")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def vanish(c: ExtendedClient) -> None:
    """The client disappears without a goodbye: both TCP connections are dropped."""
    for task in c.readers:
        task.cancel()
    c.recv.transport.abort()
    c.send.transport.abort()


async def reach_stage(srv: ServerProcess, chat: FakeChatAPI, c: ExtendedClient, stage: str) -> None:
    """Drive a turn of `c` to `stage` and return while that stage works on it."""
    if stage == "speech":  # mid-utterance: the VAD has started the turn, the user is still speaking
        speaking = asyncio.create_task(c.stream_wav(fixture("en_question.wav")))
        await c.wait_for(lambda r: r.kind == "speech_start")
        await asyncio.sleep(0.3)
        speaking.cancel()
    elif stage == "asr":
        logged = len(srv.lines)
        await c.stream_wav(fixture("zh_question.wav"))
        await asyncio.to_thread(srv.wait_for_log, "s of speech in the ASR", after=logged)
    elif stage == "llm":
        await c.send_text("wait for it")
        await asyncio.to_thread(chat.wait_for_request, lambda r: b"wait for it" in r["body"])
    elif stage == "tts":
        logged = len(srv.lines)
        await c.send_text("STALL")
        await asyncio.to_thread(srv.wait_for_log, "test fault: stalling 3 s on 'About STALL", after=logged)
    else:  # sending: the answer's audio is streaming to the client
        await c.send_text("something long")
        await c.wait_for(lambda r: r.kind == "audio")


@pytest.mark.parametrize("stage", ["speech", "asr", "llm", "tts", "sending"])
def test_client_vanishing_at_each_stage_leaves_others_untouched(stalling, chat, stage):
    chat.first_token_delay_s = lambda m: 4.0 if "wait for it" in m[-1]["content"] else 0.1
    try:
        async def scenario():
            async with ExtendedClient(stalling.recv_url, stalling.send_url) as bystander:
                gone = ExtendedClient(stalling.recv_url, stalling.send_url)
                await gone.__aenter__()
                await reach_stage(stalling, chat, gone, stage)
                await bystander.send_text("a question")  # answered while the other client vanishes
                vanish(gone)
                await turn_over(bystander, 1)
                await asyncio.to_thread(stalling.wait_for_log, f"session {uid_tag(gone.uid)} left")  # its work stopped
                async with ExtendedClient(stalling.recv_url, stalling.send_url) as newcomer:
                    if stage == "asr":  # the ASR, which was busy with the vanished client, serves the next one
                        await newcomer.stream_wav(fixture("en_question.wav"))
                        await turn_over(newcomer, 1, timeout=30)
                    else:
                        await ask(newcomer, "hello", 1)
                await ask(bystander, "another question", 2)
                return gone, newcomer, bystander

        gone, newcomer, bystander = asyncio.run(scenario())
        assert_answered(bystander, 1, "a question")
        assert_answered(bystander, 2, "another question")
        assert_answered(newcomer, 1, "heard 3." if stage == "asr" else "hello")
        if stage == "asr":  # the vanished client's transcript went nowhere
            heard = [r["messages"][-1]["content"].split()[1:2] for r in chat.chat_requests()
                     if r["messages"][-1]["content"].startswith("heard ")]
            assert heard and all(float(h[0]) < 5 for h in heard), heard
        if stage == "llm":  # its LLM stream was closed, not read to the end
            stream = next(s for s in chat.streams if s["messages"][-1]["content"] == "wait for it")
            assert stream["done"].wait(10) and stream["client_closed"] and stream["tokens_sent"] < stream["tokens_total"]
        assert f"session {uid_tag(gone.uid)} left" in stalling.log() and stalling.alive()
    finally:
        chat.first_token_delay_s = 0.1


# ---- SIGTERM during a turn ----

def wav_seconds(path: str) -> float:
    with wave.open(path) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        return w.getnframes() / w.getframerate()


def test_sigterm_during_a_turn_closes_sockets_and_keeps_what_was_saved(chat, tmp_path):
    srv = start(chat, "--save_data", str(tmp_path))
    try:
        async def scenario():
            async with ExtendedClient(srv.recv_url, srv.send_url) as c, \
                    ExtendedClient(srv.recv_url, srv.send_url) as idle:
                await idle.wait_for(lambda r: r.kind == "ready")
                await ask(c, "first question", 1)
                await asyncio.to_thread(srv.wait_for_log, f"turn session={uid_tag(c.uid)} turn=1")
                await c.stream_wav(fixture("en_question.wav"), trailing_silence_s=0.8)
                await turn_over(c, 2)
                await c.send_text("now something long")  # turn 3, its answer streaming when the server is stopped
                await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == 3 and r.data["seq"] >= 1)
                t0 = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(srv.proc.wait, 15)
                exit_s = time.monotonic() - t0
                closes = []
                for ws in (c.recv, c.send, idle.recv, idle.send):
                    await asyncio.wait_for(ws.wait_closed(), 5)
                    closes.append((ws.close_code, ws.close_reason))
                return c, code, exit_s, closes

        c, code, exit_s, closes = asyncio.run(scenario())
    finally:
        srv.stop()
    assert code == 0 and exit_s < 8, (code, exit_s, srv.log()[-3000:])
    assert [code for code, _ in closes] == [1001] * 4 and all(reason for _, reason in closes), closes  # "going away", why
    assert "Traceback" not in srv.log(), srv.log()
    records = {}
    for path in glob.glob(saved_file(tmp_path, c.uid, "turn?????.json")):
        with open(path) as f:
            record = json.load(f)
        records[record["turn"]] = record
    assert set(records) == {1, 2, 3}, sorted(os.listdir(tmp_path))
    assert records[1]["answer"] == heard_text(c, 1) and records[1]["answer"].endswith("the end.")
    assert records[2]["question"].startswith("heard 3.") and records[2]["answer"].endswith("the end.")
    assert records[3]["interrupted"] and records[3]["answer"] and heard_text(c, 3).startswith(records[3]["answer"])
    for turn in (1, 2, 3):  # the answer audio saved is the audio the client received, up to the last moment
        received = sum(len(r.pcm) for r in c.events("audio", turn)) / 2 / 16000
        assert 1 < wav_seconds(saved_file(tmp_path, c.uid, f"turn{turn:05d}_answer.wav")) == pytest.approx(received, abs=0.25)
    assert wav_seconds(saved_file(tmp_path, c.uid, "turn00002_input.wav")) > 2.5
    assert not glob.glob(os.path.join(tmp_path, "**", "*.tmp"), recursive=True)


def test_sigterm_with_model_calls_stuck_exits_within_seconds(chat):
    """Three sessions wait on an LLM's first token, one on a TTS that hangs: the server still exits at once,
    not after each stuck call in turn."""
    srv = start(chat, "--tts_stall_on", "hang", "--stall_s", "60")
    chat.first_token_delay_s = lambda messages: 60.0 if "ponder" in messages[-1]["content"] else 0.1
    try:
        async def scenario():
            clients = [ExtendedClient(srv.recv_url, srv.send_url) for _ in range(4)]
            for c in clients:
                await c.__aenter__()
            try:
                for c in clients[:3]:
                    await c.send_text("ponder this")
                await clients[3].send_text("hang on")
                await asyncio.to_thread(srv.wait_for_log, "test fault: stalling")
                await asyncio.to_thread(chat.wait_for_request, lambda r: b"ponder" in r["body"], count=3)
                t0 = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(srv.proc.wait, 30)
                return code, time.monotonic() - t0
            finally:
                for c in clients:
                    await c.__aexit__(None, None, None)

        code, exit_s = asyncio.run(scenario())
    finally:
        chat.first_token_delay_s = 0.1
        srv.stop()
    assert code == 0 and exit_s < 4, (code, exit_s, srv.log()[-3000:])
