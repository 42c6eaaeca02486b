"""The real server in a subprocess, real WebSocket clients streaming speech in real time, a fixed-latency ASR,
the real OpenAI-compatible LLM handler talking to a local fake API, and real espeak-ng TTS."""
from __future__ import annotations

import asyncio
import base64
import glob
import json
import os
import time

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import connect

from client import CleanS2SClient, ExtendedClient, LegacyClient, load_wav
from conftest import LONG_ANSWER, fixture, saved_file, short_answer, short_voice, start_server

import s2s_server_pipeline as s2s


def run(coro):
    return asyncio.run(coro)


def audio_seconds(items) -> float:
    return sum(len(r.pcm) for r in items) / 2 / s2s.SAMPLE_RATE


def test_spoken_turn_arrives_in_order_with_metrics(server, chat_api):
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as c:
            await c.wait_for(lambda r: r.kind == "ready")
            await c.stream_wav(fixture("en_question.wav"))
            end = await c.wait_for(lambda r: r.kind == "answer" and r.data["end"])
            metrics = await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == 1)
            return c, end, metrics

    c, end, metrics = run(scenario())
    kinds = [r.kind for r in c.received]
    assert kinds.index("speech_start") < kinds.index("transcript") < kinds.index("answer") < kinds.index("audio")
    transcript = c.events("transcript")[0].data
    assert transcript["turn"] == 1
    heard = float(transcript["text"].split()[1])
    assert 2.8 <= heard <= 4.0, transcript  # the 3.1 s fixture, speech plus padding, reached the ASR whole
    answers = c.events("answer", turn=1)
    assert [a.data["seq"] for a in answers] == sorted(a.data["seq"] for a in answers)
    text = "".join(a.data["text"] for a in answers)
    assert text.startswith(f"About {transcript['text']}:") and text.endswith("the end.")
    audio = c.events("audio", turn=1)
    pcm = np.frombuffer(b"".join(a.pcm for a in audio), "<i2")
    assert audio_seconds(audio) > 2 and np.abs(pcm).max() > 1000  # an audible answer
    # The LLM received the transcript as the user's words, after the system prompt.
    request = chat_api.chat_requests()[-1]
    assert request["messages"][0]["role"] == "system"
    assert request["messages"][-1] == {"role": "user", "content": transcript["text"]}
    m = metrics.data["metrics"]
    for key in ("asr_ms", "llm_first_token_ms", "llm_first_chunk_ms", "tts_first_audio_ms", "first_audio_ms"):
        assert m[key] is not None and m[key] >= 0, m
    assert m["asr_ms"] >= 50  # the fixed ASR latency is inside the measured figure
    server.wait_for_log("turn session=")  # (written before the metrics event, read by another thread)


def test_barge_in_stops_audio_and_truncates_history(server, chat_api, long_answers):
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as c:
            await c.stream_wav(fixture("en_question.wav"), trailing_silence_s=0.8)
            await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == 1)
            await asyncio.sleep(1.0)  # the answer is playing
            await c.stream_wav(fixture("en_interrupt.wav"))
            interrupt = await c.wait_for(lambda r: r.kind == "interrupt")
            await c.wait_for(lambda r: r.kind == "answer" and r.data["turn"] == 2 and r.data["end"])
            return c, interrupt

    c, interrupt = run(scenario())
    # The answer pauses as soon as the voice is heard; its words (not a backchannel) then cut it off.
    (pause,) = c.events("pause")
    assert pause.data["turn"] == interrupt.data["turn"] == 1 and not c.events("resume")
    onset = c.speech_onsets[1]
    # Generous bound: min_speech_ms (200) plus transport; the benchmark measures the real figure.
    assert pause.t - onset < 1.0, pause.t - onset
    late = [r for r in c.received if r.kind == "audio" and r.data["turn"] == 1 and r.t > pause.t]
    assert late == []
    played = [r for r in c.received if r.kind == "audio" and r.data["turn"] == 1]
    assert audio_seconds(played) < 8  # far less than the ~15 s answer reached the client
    assert c.events("audio", turn=2)
    # The next LLM request carries only the part of turn 1 that was sent, marked as cut off.
    request = chat_api.chat_requests()[-1]["messages"]
    first_answer = request[-2]
    assert first_answer["role"] == "assistant" and first_answer["content"].endswith(s2s.INTERRUPTED_MARK)
    heard = first_answer["content"][:-len(s2s.INTERRUPTED_MARK)]
    assert heard and len(heard) < len(LONG_ANSWER)
    spoken_turn1 = "".join(r.data["text"] for r in c.events("answer", turn=1))
    assert heard == spoken_turn1
    metrics = [r.data["metrics"] for r in c.events("metrics", turn=1)]
    assert metrics[-1]["interrupted"] and metrics[-1]["barge_in_ms"] is not None


def test_a_backchannel_pauses_the_answer_and_it_goes_on_with_every_frame(chat_api, long_answers):
    """Over real sockets: "mm" while the answer plays pauses it at once (the client holds its playback) and, heard
    as a backchannel, lets it go on: the whole answer arrives, each audio frame once, with no interrupt. A client of
    protocol version 2, which knows no pause, is cut off at once as before."""
    srv = start_server(chat_api, "--asr_short_s", "1.2", "--asr_short_words", "Mm.")
    try:
        async def mm_over_an_answer(protocol, until):
            async with ExtendedClient(srv.recv_url, srv.send_url, protocol=protocol) as c:
                await c.send_text("tell me a story")
                await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == 1)
                await asyncio.sleep(1.0)  # the answer is playing
                said_at = time.monotonic()
                await c.stream(short_voice())
                metrics = await c.wait_for(lambda r: r.kind == until and r.data["turn"] == 1, timeout=60)
                return c, metrics, said_at

        async def bad_version():
            with pytest.raises(websockets.ConnectionClosed) as closed:
                async with ExtendedClient(srv.recv_url, srv.send_url, protocol="1"):
                    pass
            return closed.value.rcvd
        c, metrics, said_at = run(mm_over_an_answer(3, "metrics"))
        old, interrupt, old_said_at = run(mm_over_an_answer(None, "interrupt"))
        refused = run(bad_version())
    finally:
        srv.stop()
    assert c.ready["protocol"] == old.ready["protocol"] == 3
    assert not old.events("pause") and not old.events("resume") and interrupt.t - old_said_at < 1.0
    assert refused.code == 1008 and "protocol" in refused.reason
    (pause,), (resume,) = c.events("pause"), c.events("resume")
    assert pause.data["turn"] == resume.data["turn"] == 1 and resume.data["heard"] == "Mm."
    assert pause.t - said_at < 1.0, pause.t - said_at  # the answer holds while "mm" is still being said
    held = [r for r in c.received if r.kind == "audio" and pause.t < r.t < resume.t]
    assert held == [], "audio went out while the client held its playback"
    assert not c.events("interrupt", turn=1) and not metrics.data["metrics"]["interrupted"]
    assert metrics.data["metrics"]["resumed"] == 1
    frames = [(r.data["seq"], r.pcm) for r in c.received if r.kind == "audio" and r.data["turn"] == 1]
    assert len(frames) == len(set(frames))  # none sent twice
    assert "".join(r.data["text"] for r in c.events("answer", turn=1)).endswith(LONG_ANSWER)  # all of it, in order


def test_two_sessions_stay_isolated(server, chat_api):
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as a, \
                ExtendedClient(server.recv_url, server.send_url) as b:
            await asyncio.gather(a.stream_wav(fixture("en_question.wav")), b.stream_wav(fixture("zh_question.wav")))
            await asyncio.gather(a.wait_for(lambda r: r.kind == "answer" and r.data["end"]),
                                 b.wait_for(lambda r: r.kind == "answer" and r.data["end"]))
            return a, b

    a, b = run(scenario())
    ta, tb = a.events("transcript")[0].data["text"], b.events("transcript")[0].data["text"]
    assert ta != tb  # 3.1 s and 5.6 s of speech
    for c, own, other in ((a, ta, tb), (b, tb, ta)):
        text = "".join(r.data["text"] for r in c.events("answer"))
        assert own in text and other not in text
        assert len(c.events("transcript")) == 1 and all(r.data["turn"] == 1 for r in c.events("answer"))
    for req in chat_api.chat_requests()[-2:]:
        contents = [m["content"] for m in req["messages"]]
        assert not (any(ta in x for x in contents) and any(tb in x for x in contents))


def test_text_input_and_new_topic(server, chat_api):
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as c:
            await c.wait_for(lambda r: r.kind == "ready")
            await c.send_text("what is two plus two")
            await c.wait_for(lambda r: r.kind == "answer" and r.data["turn"] == 1 and r.data["end"])
            await c.send_text("and times three")
            await c.wait_for(lambda r: r.kind == "answer" and r.data["turn"] == 2 and r.data["end"])
            with_history = chat_api.chat_requests()[-1]["messages"]
            await c.send_text("new topic")
            await c.send_text("hello again")
            await c.wait_for(lambda r: r.kind == "answer" and r.data["turn"] == 4 and r.data["end"])
            return c, with_history, chat_api.chat_requests()[-1]["messages"]

    c, with_history, after_reset = run(scenario())
    assert [m["content"] for m in with_history if m["role"] == "user"] == ["what is two plus two", "and times three"]
    assert any(m["role"] == "assistant" and "two plus two" in m["content"] for m in with_history)
    assert [m["role"] for m in after_reset] == ["system", "user"] and after_reset[-1]["content"] == "hello again"
    assert c.events("audio", turn=4)
    assert not c.events("answer", turn=3)  # "new topic" is counted, not answered


def test_legacy_client_unchanged(server):
    """CleanS2S's client: no uid on the sender socket, base64 JSON both ways, its own counters."""
    async def scenario():
        async with LegacyClient(server.recv_url, server.send_url) as c:
            await c.stream_wav(fixture("en_question.wav"))
            end = await c.wait_for(lambda r: r.kind == "legacy" and r.data["end_flag"])
            await c.send_text("tell me more")
            end2 = await c.wait_for(lambda r: r.kind == "legacy" and r.data["end_flag"] and r.data["user_input_count"] == 2)
            return c, end, end2

    c, end, end2 = run(scenario())
    assert c.replies.count({"return_info": "VAD detected"}) == 1
    assert all(set(r) in ({"return_info"}, {"placeholder"}) for r in c.replies)
    assert len(c.replies) >= 50  # one reply per message sent
    kept = [r.data for r in c.received if r.kind == "legacy"]
    assert set(kept[0]) == {"uid", "user_input_count", "question_text", "answer_text", "answer_audio", "end_flag"}
    assert kept[0]["question_text"].startswith("heard ") and all(k["question_text"] is None for k in kept[1:])
    turn1 = [k for k in kept if k["user_input_count"] == 1]
    assert "".join(k["answer_text"] for k in turn1).endswith("the end.")
    assert [k["end_flag"] for k in turn1] == [False] * (len(turn1) - 1) + [True]
    pcm = np.frombuffer(b"".join(base64.b64decode(k["answer_audio"]) for k in turn1), "<i2")
    assert len(pcm) / s2s.SAMPLE_RATE > 2 and np.abs(pcm).max() > 1000
    assert any(k["user_input_count"] == 2 and k["question_text"] is None for k in kept)  # typed: no question echo
    assert not [r for r in c.received if r.kind not in ("legacy", "dropped")]


def test_cleans2s_client_hears_nothing_of_the_old_answer_after_cutting_in(chat_api):
    """CleanS2S's client queues each audio message 200 ms after it arrives, and a cut-in clears only its queue, so the
    server sends it nothing while the user may be that close to cutting in: no old audio plays after the stop. Short
    sentences in a fixed-latency TTS put a message on the wire every ~250 ms, so without that hold one would almost
    always be in the client's 200 ms delay when the cut-in lands."""
    chat_api.answer = lambda messages: "About it: " + "Yes. No. " * 40
    srv = start_server(chat_api, "--tts", "fixed")
    try:
        async def scenario():
            async with CleanS2SClient(srv.recv_url, srv.send_url) as c:
                await c.stream_wav(fixture("en_question.wav"), trailing_silence_s=0.8)
                await c.wait_for(lambda r: r.kind == "legacy" and r.data["answer_audio"])
                await asyncio.sleep(1.5)  # the answer plays
                await c.stream_wav(fixture("en_interrupt.wav"))
                await c.wait_for(lambda r: r.kind == "legacy" and r.data["user_input_count"] == 2)
                await asyncio.sleep(CleanS2SClient.QUEUE_DELAY_S + 0.3)  # what was in the client's delay is queued now
                return c

        c = run(scenario())
    finally:
        chat_api.answer = short_answer
        srv.stop()
    assert len(c.cleared_at) == 1, "the cut-in did not stop the answer while it played"
    old = [clip for clip in c.clips if clip.turn == 1 and clip.started is not None]
    late = [clip for clip in old if clip.started > c.cleared_at[0]]
    assert late == [], f"{sum(clip.seconds for clip in late):.2f} s of the old answer played after the cut-in"
    assert sum(clip.seconds for clip in old) > 1.0  # it was heard up to the cut-in
    assert [clip.turn for clip in c.clips if clip.started is not None][-1] == 2  # and the new answer plays


def test_a_sound_cut_short_by_a_silent_microphone_does_not_hold_the_answer(server):
    """The hold for a possible cut-in lasts while the VAD is deciding; a client that stops sending audio in the
    middle of a sound (muted mid-cough) leaves it undecided, and the answer goes on half a second later."""
    speech = load_wav(fixture("en_question.wav"))
    burst = speech[np.flatnonzero(np.abs(speech) > 0.02)[0]:][:int(0.15 * s2s.SAMPLE_RATE)]  # under --min_speech_ms

    async def scenario():
        async with CleanS2SClient(server.recv_url, server.send_url) as c:
            await c.send_text("tell me something")
            await c.wait_for(lambda r: r.kind == "legacy" and r.data["answer_audio"])
            await c.send_audio(burst)  # then nothing more
            t0 = asyncio.get_running_loop().time()
            await c.wait_for(lambda r: r.kind == "legacy" and r.data["end_flag"], timeout=10)
            return c, asyncio.get_running_loop().time() - t0

    c, waited = run(scenario())
    assert c.replies.count({"return_info": "VAD detected"}) == 0  # no turn started: nothing was cut off
    assert c.question_count == 1 and waited < 5, waited


@pytest.mark.parametrize("tts, answer", [("espeak", "Sure. Here is a short answer, the end."),
                                          ("espeak", "好的。明天见。"),
                                          ("fixed", "Sure, here is a longer answer. It has two sentences.")])
def test_cleans2s_client_sees_each_answer_end_and_every_sentence_once(chat_api, tts, answer):
    """CleanS2S's client ends an answer (takes its "still answering" bubble away) only on a message with text, audio
    and end_flag, and shows each message's text as a bubble: the answer's end rides on its last chunk, whether the
    answer's end came with that chunk, just after it (a Chinese answer ends with its last sentence mark, and the
    LLM's end comes a token later), or the TTS made the chunk in pieces (the first piece goes out alone, at once)."""
    chat_api.answer = lambda messages: answer
    srv = start_server(chat_api, "--tts", tts)
    try:
        async def scenario():
            async with CleanS2SClient(srv.recv_url, srv.send_url) as c:
                for turn in (1, 2):
                    await c.send_text(f"question {turn}")
                    await c.wait_for(lambda r: r.kind == "legacy" and r.data["user_input_count"] == turn
                                     and r.data["end_flag"])
                    await c.until_answer_ended(turn, timeout=15)  # its audio plays out
                return c

        c = run(scenario())
    finally:
        chat_api.answer = short_answer
        srv.stop()
    for turn in (1, 2):
        assert c.answer_ended(turn), [(clip.text, clip.end) for clip in c.clips if clip.turn == turn]
        assert "".join(c.bubbles(turn)).strip() == answer  # every sentence shown once, none twice
        assert all(clip.seconds > 0.1 for clip in c.clips if clip.turn == turn and clip.text)  # no bubble without speech


def test_client_vanishing_mid_turn_leaves_server_healthy(server):
    async def scenario():
        c = ExtendedClient(server.recv_url, server.send_url)
        async with c:
            await c.stream_wav(fixture("en_question.wav"), trailing_silence_s=0.7)
        # Gone while ASR/LLM work on its turn. Then a broken client, then a healthy one.
        async with connect(server.recv_url) as ws:
            await ws.send("{not json")
            assert json.loads(await ws.recv()) == {"placeholder": ""}
            await ws.send(json.dumps({"type": "audio_input", "uid": "x", "audio": "%%%"}))
            assert json.loads(await ws.recv()) == {"placeholder": ""}
        async with ExtendedClient(server.recv_url, server.send_url) as ok:
            await ok.send_text("are you still there")
            await ok.wait_for(lambda r: r.kind == "answer" and r.data["end"])
            return ok

    ok = run(scenario())
    assert server.alive() and ok.events("audio")
    assert "session" in server.log() and "Traceback" not in server.log()


def test_bad_messages_get_error_events(server):
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as c:
            await c.wait_for(lambda r: r.kind == "ready")
            await c.recv.send(b"\x01\x02\x03")  # odd byte count: not int16
            await c.recv.send(json.dumps({"type": "audio_input", "uid": c.uid,
                                          "audio": base64.b64encode(np.array([np.nan] * 4, "<f4").tobytes()).decode()}))
            await c.recv.send(json.dumps({"type": "user_input", "uid": "someone-else", "text": "hi"}))
            await c.recv.send("[1, 2]")
            codes = []
            for _ in range(4):
                item = await c.wait_for(lambda r: r.kind == "error" and r not in codes)
                codes.append(item)
            await c.send_text("still working")
            await c.wait_for(lambda r: r.kind == "answer" and r.data["end"])
            return [e.data["code"] for e in codes]

    assert run(scenario()) == ["bad_audio", "bad_audio", "uid_mismatch", "bad_message"]


def test_llm_failure_is_reported_and_session_goes_on(chat_api):
    srv = start_server(chat_api)
    try:
        async def scenario():
            async with ExtendedClient(srv.recv_url, srv.send_url) as c:
                chat_api.fail_with = 500
                await c.send_text("hello")
                err = await c.wait_for(lambda r: r.kind == "error")
                await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == 1)
                chat_api.fail_with = None
                await c.send_text("hello again")
                await c.wait_for(lambda r: r.kind == "answer" and r.data["turn"] == 2 and r.data["end"])
                await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == 2)
                await c.send_text("and a third")
                await c.wait_for(lambda r: r.kind == "answer" and r.data["turn"] == 3 and r.data["end"])
                return err, c

        err, c = run(scenario())
        assert err.data["code"] == "llm_failed" and "500" in err.data["message"] and err.data["turn"] == 1
        assert c.events("audio", turn=2)
        # The failed turn is left out of the history: roles alternate, as many chat templates require.
        messages = chat_api.chat_requests()[-1]["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"], messages
        assert [messages[1]["content"], messages[3]["content"]] == ["hello again", "and a third"]
    finally:
        chat_api.fail_with = None
        srv.stop()


def test_interruption_disabled_ignores_speech_while_speaking(chat_api, long_answers):
    srv = start_server(chat_api, "--no-enable_interruption")
    try:
        async def scenario():
            async with ExtendedClient(srv.recv_url, srv.send_url) as c:
                await c.stream_wav(fixture("en_question.wav"), trailing_silence_s=0.8)
                await c.wait_for(lambda r: r.kind == "audio")
                await c.stream_wav(fixture("en_interrupt.wav"))
                await c.wait_for(lambda r: r.kind == "answer" and r.data["end"], timeout=40)
                return c

        c = run(scenario())
        assert not c.events("interrupt") and len(c.events("speech_start")) == 1
        assert audio_seconds(c.events("audio", turn=1)) > 10  # the whole answer played
    finally:
        srv.stop()


def test_interrupt_at_speech_end_lets_the_answer_play_until_the_user_finishes(chat_api, long_answers):
    srv = start_server(chat_api, "--interrupt_at", "speech_end")
    try:
        async def scenario():
            async with ExtendedClient(srv.recv_url, srv.send_url) as c:
                await c.stream_wav(fixture("en_question.wav"), trailing_silence_s=0.8)
                await c.wait_for(lambda r: r.kind == "audio")
                streamed = asyncio.create_task(c.stream_wav(fixture("en_interrupt.wav")))
                interrupt = await c.wait_for(lambda r: r.kind == "interrupt")
                await streamed
                await c.wait_for(lambda r: r.kind == "answer" and r.data["turn"] == 2 and r.data["end"])
                return c, interrupt

        c, interrupt = run(scenario())
        speech = load_wav(fixture("en_interrupt.wav"))
        voiced = np.flatnonzero(np.abs(speech) > 0.02)
        utterance_s = (voiced[-1] - voiced[0]) / s2s.SAMPLE_RATE
        # CleanS2S's behaviour: the old answer goes on while the user speaks; the cut comes with the end of turn.
        assert interrupt.t - c.speech_onsets[1] > utterance_s + 0.5
        assert [r.data["turn"] for r in c.events("speech_start")] == [1, 2]
        assert c.events("speech_start", turn=2)[0].t >= interrupt.t - 0.05
        assert c.events("transcript", turn=2) and c.events("audio", turn=2)
        barge_in = [r.data["metrics"]["barge_in_ms"] for r in c.events("metrics", turn=1) if r.data["metrics"]["interrupted"]]
        assert barge_in and barge_in[0] > utterance_s * 1000
    finally:
        srv.stop()


def test_max_sessions_refuses_with_clear_reason_and_saves_turns(chat_api, tmp_path):
    srv = start_server(chat_api, "--max_sessions", "1", "--save_data", str(tmp_path))
    try:
        async def scenario():
            async with ExtendedClient(srv.recv_url, srv.send_url) as c:
                await c.wait_for(lambda r: r.kind == "ready")
                extra = await connect(f"{srv.recv_url}/?uid=second")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await extra.recv()
                await c.stream_wav(fixture("zh_question.wav"))
                await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == 1, timeout=40)
                return c, closed.value

        c, closed = run(scenario())
        assert closed.rcvd.code == 1013 and "server full" in closed.rcvd.reason
        srv.stop()
        uid = c.uid
        record = json.load(open(saved_file(tmp_path, uid, "turn00001.json")))
        assert record["uid"] == uid and record["question"].startswith("heard ") and record["answer"].endswith("the end.")
        assert len(load_wav(saved_file(tmp_path, uid, "turn00001_input.wav"))) > 16000 * 5
        assert len(load_wav(saved_file(tmp_path, uid, "turn00001_answer.wav"))) > 16000 * 2
        assert not glob.glob(os.path.join(tmp_path, "**", "*.tmp"), recursive=True)
    finally:
        srv.stop()


def test_history_keeps_only_what_the_client_reports_played(server, chat_api, long_answers):
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as c:
            await c.send_text("tell me a story")
            await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == 1 and r.data["seq"] == 1)
            # Two chunks were sent, but the client has played only 100 ms when the user cuts in by text.
            await c.recv.send(json.dumps({"type": "playback", "turn": 1, "played_ms": 100, "playing": True}))
            await c.send_text("stop, something else")
            await c.wait_for(lambda r: r.kind == "interrupt")
            await c.wait_for(lambda r: r.kind == "answer" and r.data["turn"] == 2)
            return c

    c = run(scenario())
    first_chunk = c.events("answer", turn=1)[0].data["text"]
    sent = "".join(r.data["text"] for r in c.events("answer", turn=1))
    assistant = chat_api.chat_requests()[-1]["messages"][-2]
    assert len(sent) > len(first_chunk)  # more was sent than played
    assert assistant == {"role": "assistant", "content": first_chunk + s2s.INTERRUPTED_MARK}


def test_a_slow_llm_stream_does_not_hold_back_another_session(server, chat_api):
    chat_api.first_token_delay_s = lambda messages: 6.0 if "slow" in messages[-1]["content"] else 0.1
    try:
        async def scenario():
            async with ExtendedClient(server.recv_url, server.send_url) as slow, \
                    ExtendedClient(server.recv_url, server.send_url) as fast:
                await slow.send_text("a slow question")
                await asyncio.sleep(0.3)  # the slow stream is open and waiting
                t0 = asyncio.get_running_loop().time()
                await fast.send_text("a quick question")
                await fast.wait_for(lambda r: r.kind == "audio")
                fast_s = asyncio.get_running_loop().time() - t0
                await slow.wait_for(lambda r: r.kind == "audio", timeout=30)
                return fast_s

        assert run(scenario()) < 3.0  # answered while the other session still waits for its first token
    finally:
        chat_api.first_token_delay_s = 0.1


def test_a_new_question_does_not_wait_for_the_stale_turns_first_token(server, chat_api):
    """The user asks again while the model still thinks about the last question: the new one starts at once,
    instead of after the stale request's first token (an API can take seconds to it)."""
    chat_api.first_token_delay_s = lambda messages: 6.0 if "slow" in messages[-1]["content"] else 0.1
    try:
        async def scenario():
            async with ExtendedClient(server.recv_url, server.send_url) as c:
                await c.send_text("a slow question")
                await asyncio.sleep(0.3)  # its stream is open and waiting
                t0 = asyncio.get_running_loop().time()
                await c.send_text("a quick question")
                await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == 2)
                return asyncio.get_running_loop().time() - t0, c

        waited, c = run(scenario())
        assert waited < 3.0
        assert not c.events("audio", turn=1)
    finally:
        chat_api.first_token_delay_s = 0.1
