"""The OpenAI Realtime endpoint (/v1/realtime), driven by the official `openai` SDK's realtime client over a real socket:
text and spoken turns, barge-in with truncate, a function call's round trip, session settings, manual commits, bad
events, the token, and privacy between sessions."""
import asyncio
import base64
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr
import websockets
from openai import AsyncOpenAI

from conftest import LONG_ANSWER, ROOT, fixture, start_server
from fakes import FakeChatAPI, FakeSpeechAPI

import s2s_server_pipeline as s2s

RATE = 24000  # Hz: the protocol's pcm16
TOKEN = "realtime-test-token"


def answer(messages: list):
    """Names what it answers (the last user words, or a function's output); calls get_weather when asked about weather."""
    last = messages[-1]
    if last["role"] == "tool":
        return f"The weather is {json.loads(last['content'])['sky']}."
    if "weather" in (last.get("content") or ""):
        return {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    if "long" in (last.get("content") or ""):
        return f"About {last['content']}: {LONG_ANSWER}"
    return f"About {last['content']}: fine, thanks."


@pytest.fixture(scope="module")
def chat_api():
    with FakeChatAPI(answer=answer, first_token_delay_s=0.05, token_delay_s=0.01) as api:
        yield api


@pytest.fixture(scope="module")
def server(chat_api, tmp_path_factory):
    srv = start_server(chat_api, "--tts", "fixed", "--auth_token", TOKEN, "--save_data", str(tmp_path_factory.mktemp("saved")))
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def connect(srv, key: str = TOKEN, model: str = "gpt-realtime"):
    client = AsyncOpenAI(api_key=key, websocket_base_url=f"ws://127.0.0.1:{srv.recv_port}/v1")
    return client.realtime.connect(model=model)


async def until(conn, kind: str, timeout: float = 10.0) -> list:
    """Every event up to and including the first of type `kind`."""
    seen = []
    async with asyncio.timeout(timeout):
        async for event in conn:
            seen.append(event)
            if event.type == kind:
                return seen
    raise AssertionError(f"the connection closed before {kind}: {[e.type for e in seen]}")


def of(events: list, kind: str) -> list:
    return [e for e in events if e.type == kind]


def speech(seconds_of_silence: float = 1.0) -> bytes:
    """The English question fixture as pcm16 at 24 kHz, then silence."""
    audio, rate = sf.read(fixture("en_question.wav"), dtype="float32")
    audio = np.concatenate([soxr.resample(audio, rate, RATE), np.zeros(int(seconds_of_silence * RATE), np.float32)])
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def stream(conn, pcm: bytes, real_time: bool) -> None:
    """In 40 ms pieces as a microphone sends them, or faster than real time in 200 ms ones (within the message rate)."""
    piece_ms = 40 if real_time else 200
    step = RATE * piece_ms // 1000 * 2
    for i in range(0, len(pcm), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())
        if real_time:
            await asyncio.sleep(piece_ms / 1000)


def test_a_text_turn_answers_from_the_instructions_and_the_conversation(server, chat_api):
    async def talk():
        async with connect(server, model="my-model") as conn:
            created = (await until(conn, "session.created"))[-1]
            assert created.session.model == "my-model" and created.session.type == "realtime"
            assert created.session.audio.input.format.rate == RATE
            await conn.session.update(session={"type": "realtime", "instructions": "Answer like a pirate.",
                                               "output_modalities": ["text"]})
            updated = (await until(conn, "session.updated"))[-1]
            assert updated.session.instructions == "Answer like a pirate." and updated.session.output_modalities == ["text"]
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "how are you"}]})
            await conn.response.create()
            return await until(conn, "response.done")

    events = asyncio.run(talk())
    text = "".join(e.delta for e in of(events, "response.output_text.delta"))
    assert text == "About how are you: fine, thanks."
    assert of(events, "response.output_text.done")[0].text == text
    done = events[-1].response
    assert done.status == "completed" and [o.type for o in done.output] == ["message"]
    assert done.output[0].content[0].text == text and not of(events, "response.output_audio.delta")
    # The LLM's token counts, as the chat API reported them (the fake counts words).
    assert done.usage.output_tokens == len(text.split()) and done.usage.input_tokens == 7
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    order = [e.type for e in events if e.type.startswith("response.")]
    assert order[:3] == ["response.created", "response.output_item.added", "response.content_part.added"]
    assert order[-3:] == ["response.content_part.done", "response.output_item.done", "response.done"]
    messages = chat_api.chat_requests()[-1]["messages"]
    assert messages == [{"role": "system", "content": "Answer like a pirate."}, {"role": "user", "content": "how are you"}]


def test_a_spoken_turn_streamed_in_real_time_is_heard_transcribed_and_answered_in_24_khz_audio(server):
    async def talk():
        async with connect(server) as conn:
            await until(conn, "session.created")
            sender = asyncio.create_task(stream(conn, speech(), real_time=True))
            events = await until(conn, "response.done", timeout=20)
            await sender
            return events

    events = asyncio.run(talk())
    kinds = [e.type for e in events]
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                 "conversation.item.input_audio_transcription.completed", "response.created", "response.done"):
        assert kind in kinds, kinds
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
    started, stopped = of(events, "input_audio_buffer.speech_started")[0], of(events, "input_audio_buffer.speech_stopped")[0]
    assert started.item_id == stopped.item_id == of(events, "input_audio_buffer.committed")[0].item_id
    assert 2000 < stopped.audio_end_ms - started.audio_start_ms < 4500  # the fixture speaks for about 3 s
    heard = of(events, "conversation.item.input_audio_transcription.completed")[0]
    assert heard.item_id == started.item_id and heard.transcript.startswith("heard ")
    pcm = b"".join(base64.b64decode(e.delta) for e in of(events, "response.output_audio.delta"))
    transcript = of(events, "response.output_audio_transcript.done")[0].transcript
    assert transcript == f"About {heard.transcript}: fine, thanks."
    # The fixed TTS speaks 0.065 s per character: the answer's audio, at 24 kHz, lasts that long.
    chunker = s2s.SpeakableChunker()  # the answer's chunks, as the server cut them for the TTS
    chunks = chunker.push(transcript) + [chunker.flush()]
    expected = sum(int(s2s.speech_length(c) * 0.065 * s2s.SAMPLE_RATE) for c in chunks) * RATE / s2s.SAMPLE_RATE
    assert abs(len(pcm) / 2 - expected) <= 2, (len(pcm) / 2, expected)  # every sample, resampled to 24 kHz
    tone = np.frombuffer(pcm, "<i2").astype(np.float32)
    assert abs(np.argmax(np.abs(np.fft.rfft(tone))) * RATE / len(tone) - 220) < 5  # 220 Hz, not resampled wrong
    done = events[-1].response
    assert done.status == "completed" and done.output[0].content[0].type == "output_audio"


def test_speech_over_an_answer_cancels_it_and_truncate_sets_what_the_history_keeps(server, chat_api):
    async def talk():
        async with connect(server) as conn:
            await until(conn, "session.created")
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "tell me something long"}]})
            await conn.response.create()
            events = await until(conn, "response.output_audio.delta")
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            spoke_at = loop.time()
            sender = asyncio.create_task(stream(conn, speech(), real_time=True))
            events += await until(conn, "response.done", timeout=10)  # the answer, cut off
            stopped_in = loop.time() - spoke_at
            events += await until(conn, "input_audio_buffer.speech_started")
            item = of(events, "response.output_item.added")[0].item.id
            await conn.conversation.item.truncate(item_id=item, content_index=0, audio_end_ms=700)
            events += await until(conn, "conversation.item.truncated")
            await sender
            events += await until(conn, "response.done", timeout=10)  # the spoken question's answer
            return events, stopped_in

    events, stopped_in = asyncio.run(talk())
    first = of(events, "response.done")[0].response
    assert first.status == "cancelled" and first.status_details.reason == "turn_detected"
    assert stopped_in < 1.5  # the fixture's voice starts 0.5 s in, and 200 ms of speech is a turn
    late = [e for e in events[events.index(of(events, "response.done")[0]):] if e.type == "response.output_audio.delta"
            and e.response_id == first.id]
    assert not late  # no audio of the cancelled answer after its end
    assert of(events, "conversation.item.truncated")[0].audio_end_ms == 700
    # The next answer's request holds the first answer as far as it was heard (700 ms: its first chunk), marked.
    history = [m for r in chat_api.chat_requests() for m in r["messages"] if m["role"] == "assistant"]
    kept = history[-1]["content"]
    assert kept.endswith("[interrupted by the user]") and len(kept) < 80, kept


def test_a_function_call_round_trip(server, chat_api):
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

    async def talk():
        async with connect(server) as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "tools": [tool], "tool_choice": "auto",
                                               "output_modalities": ["text"]})
            assert (await until(conn, "session.updated"))[-1].session.tools[0].name == "get_weather"
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "what is the weather"}]})
            await conn.response.create()
            called = await until(conn, "response.done")
            call = of(called, "response.function_call_arguments.done")[0]
            await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                      "output": json.dumps({"sky": "sunny"})})
            await conn.response.create()
            return called, await until(conn, "response.done")

    called, answered = asyncio.run(talk())
    request = chat_api.chat_requests()[-2]
    assert request["tools"] == [{"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")}}]
    deltas = "".join(e.delta for e in of(called, "response.function_call_arguments.delta"))
    call = of(called, "response.function_call_arguments.done")[0]
    assert deltas == call.arguments and json.loads(call.arguments) == {"city": "Paris"} and call.name == "get_weather"
    assert len(of(called, "response.function_call_arguments.delta")) >= 2
    done = called[-1].response
    assert done.status == "completed" and [o.type for o in done.output] == ["function_call"]
    assert "".join(e.delta for e in of(answered, "response.output_text.delta")) == "The weather is sunny."
    messages = chat_api.chat_requests()[-1]["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == call.call_id and messages[-1] == {
        "role": "tool", "tool_call_id": call.call_id, "content": json.dumps({"sky": "sunny"})}


def test_bad_events_get_error_events_and_the_session_goes_on(server):
    async def talk():
        async with connect(server) as conn:
            await until(conn, "session.created")
            bad = ["not json", json.dumps({"type": "no.such.event", "event_id": "e1"}),
                   json.dumps({"type": "input_audio_buffer.append", "audio": "@@@", "event_id": "e2"}),
                   json.dumps({"type": "session.update", "session": {"output_modalities": ["video"]}, "event_id": "e3"}),
                   json.dumps({"type": "conversation.item.delete", "item_id": "item_nope", "event_id": "e4"}),
                   json.dumps({"type": "response.cancel", "event_id": "e5"}),
                   json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}),
                   json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
                       "type": "semantic_vad"}}}}}),  # this server has no turn model
                   json.dumps({"type": "input_audio_buffer.commit"}),  # with turn detection, the server commits
                   json.dumps({"type": "session.update", "session": {"tools": [{"type": "function", "name": "bad name!"}]}}),
                   json.dumps({"type": "session.update", "session": {"instructions": "unseen", "max_output_tokens": 0}}),
                   json.dumps({"type": "session.update", "session": {"audio": "loud"}}),  # shapes no SDK would send
                   json.dumps({"type": "session.update", "session": {"audio": {"input": [1], "output": "x"}}}),
                   json.dumps({"type": ["session.update"]})]
            errors = []
            for message in bad:
                await conn.send_raw(message)  # the SDK's own way to send what it would not build
                errors.append((await until(conn, "error"))[-1].error)
            await conn.session.update(session={"type": "realtime"})
            settings = (await until(conn, "session.updated"))[-1].session  # nothing of a refused update was taken
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "still there"}]})
            await conn.response.create(response={"output_modalities": ["text"]})
            return errors, (await until(conn, "response.done"))[-1], settings

    errors, done, settings = asyncio.run(talk())
    assert all(e.type == "invalid_request_error" for e in errors)
    assert [e.code for e in errors] == ["bad_json", "invalid_event", "invalid_value", "invalid_value", "item_not_found",
                                        "response_cancel_not_active", "invalid_value", "invalid_value",
                                        "input_audio_buffer_commit_unsupported", "invalid_value", "invalid_value",
                                        "invalid_value", "invalid_value", "invalid_event"]
    assert [e.event_id for e in errors][1:6] == ["e1", "e2", "e3", "e4", "e5"]
    assert "--turn_detection smart_turn" in errors[7].message
    assert settings.instructions != "unseen" and settings.max_output_tokens == "inf"
    assert done.response.status == "completed"


def test_audio_faster_than_real_time_is_heard_in_real_time(server):
    """As on the other sockets: audio more than --max_audio_ahead_s (5 s) ahead of real time gets an error event, and
    the rest is read at real time; nothing is lost."""
    async def talk():
        async with connect(server) as conn:
            await until(conn, "session.created")
            loop = asyncio.get_running_loop()
            start = loop.time()
            await stream(conn, bytes(RATE * 2 * 7), real_time=False)  # 7 s of silence, sent at once
            error = (await until(conn, "error"))[-1].error
            await conn.input_audio_buffer.clear()
            await until(conn, "input_audio_buffer.cleared")
            return error, loop.time() - start

    error, took = asyncio.run(talk())
    assert error.code == "audio_too_fast" and "real time" in error.message
    assert took > 1.5  # the last 2 s past the allowance were heard in real time, not at once


def test_manual_commits_and_create_response_off(server, chat_api):
    async def talk():
        async with connect(server) as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            assert (await until(conn, "session.updated"))[-1].session.audio.input.turn_detection is None
            await stream(conn, speech(0.2), real_time=False)
            await conn.input_audio_buffer.commit()
            await conn.response.create()  # waits for the transcript
            manual = await until(conn, "response.done", timeout=20)
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
                "type": "server_vad", "create_response": False, "silence_duration_ms": 300}}}})
            updated = (await until(conn, "session.updated"))[-1].session.audio.input.turn_detection
            await stream(conn, speech(), real_time=False)
            # 300 ms of silence ends a turn: the fixture's pause after its first words makes two user messages.
            heard = await until(conn, "conversation.item.input_audio_transcription.completed", timeout=20)
            heard += await until(conn, "conversation.item.input_audio_transcription.completed", timeout=20)
            await asyncio.sleep(0.5)
            await conn.response.create()
            return manual, updated, heard, await until(conn, "response.done", timeout=20)

    manual, updated, heard, answered = asyncio.run(talk())
    committed = of(manual, "input_audio_buffer.committed")[0]
    transcript = of(manual, "conversation.item.input_audio_transcription.completed")[0]
    assert transcript.item_id == committed.item_id and transcript.transcript.startswith("heard ")
    assert not of(manual, "input_audio_buffer.speech_started")  # no turn detection: nothing heard by the VAD
    assert [e.type for e in manual].index("conversation.item.input_audio_transcription.completed") < \
        [e.type for e in manual].index("response.created")
    said = "".join(e.delta for e in of(manual, "response.output_audio_transcript.delta"))
    assert said == f"About {transcript.transcript}: fine, thanks."
    assert updated.type == "server_vad" and updated.create_response is False and updated.silence_duration_ms == 300
    assert not of(heard, "response.created")  # heard, not answered
    words = [e.transcript for e in of(heard, "conversation.item.input_audio_transcription.completed")]
    assert "".join(e.delta for e in of(answered, "response.output_audio_transcript.delta")) == f"About {words[-1]}: fine, thanks."
    # Every user message so far is in the conversation the LLM reads, in order.
    users = [m["content"] for m in chat_api.chat_requests()[-1]["messages"] if m["role"] == "user"]
    assert users == [transcript.transcript, *words]


def test_voice_and_instructions_reach_the_models(chat_api):
    with FakeSpeechAPI() as speech_api:
        srv = start_server(chat_api, "--tts", "openai", "--tts_api_url", speech_api.url, "--tts_api_voice", "alloy")
        try:
            async def talk():
                async with connect(srv, key="any") as conn:
                    await until(conn, "session.created")
                    await conn.session.update(session={"type": "realtime", "instructions": "Speak softly.",
                                                       "audio": {"output": {"voice": "marin"}}})
                    assert (await until(conn, "session.updated"))[-1].session.audio.output.voice == "marin"
                    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                              "content": [{"type": "input_text", "text": "hi"}]})
                    await conn.response.create()
                    return await until(conn, "response.done", timeout=20)

            done = asyncio.run(talk())[-1].response
        finally:
            srv.stop()
        assert done.status == "completed"
        voices = {json.loads(r["body"])["voice"] for r in speech_api.requests if r["path"].endswith("/audio/speech")}
        assert voices == {"marin"}
        assert chat_api.chat_requests()[-1]["messages"][0] == {"role": "system", "content": "Speak softly."}


def test_the_token_is_required_and_sessions_are_private(server):
    async def talk():
        with pytest.raises(websockets.ConnectionClosed) as refused:
            async with connect(server, key="wrong-token") as conn:
                await until(conn, "session.created")
        # The browser form: subprotocols "realtime" and "openai-insecure-api-key.<token>".
        async with websockets.connect(f"ws://127.0.0.1:{server.recv_port}/v1/realtime",
                                      subprotocols=["realtime", f"openai-insecure-api-key.{TOKEN}"]) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with connect(server) as one, connect(server) as other:
            await until(one, "session.created")
            await until(other, "session.created")
            await one.conversation.item.create(item={"id": "item_secret", "type": "message", "role": "user",
                                                     "content": [{"type": "input_text", "text": "my secret"}]})
            await until(one, "conversation.item.done")
            await other.conversation.item.retrieve(item_id="item_secret")
            return refused, (await until(other, "error"))[-1]

    refused, error = asyncio.run(talk())
    assert "4401" in str(refused.value)
    assert error.error.code == "item_not_found"


def test_a_beta_client_is_told_what_is_served(server):
    """A client of the protocol's beta would misread every GA event: it is closed with a reason that says so."""
    async def talk():
        async with websockets.connect(f"ws://127.0.0.1:{server.recv_port}/v1/realtime?model=m",
                                      additional_headers={"Authorization": f"Bearer {TOKEN}", "OpenAI-Beta": "realtime=v1"}) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return closed.value

    closed = asyncio.run(talk())
    assert closed.rcvd.code == 1008 and "GA Realtime protocol" in closed.rcvd.reason


def test_realtime_turns_are_saved_and_counted(server):
    folder = next(arg for arg in server.proc.args if "saved" in str(arg))
    saved = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.endswith(".json")]
    records = [json.load(open(path, encoding="utf-8")) for path in saved]
    assert any(r["question"] == "how are you" and r["answer"] == "About how are you: fine, thanks." for r in records)
    assert any(r["interrupted"] for r in records)


def sdk_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not os.path.isdir(os.path.join(ROOT, "frontend_nextjs", "node_modules", "openai")):
        return "the openai JavaScript SDK is not installed (cd frontend_nextjs && npm ci)"
    return None


@pytest.mark.skipif(sdk_missing() is not None, reason=sdk_missing() or "")
def test_the_official_javascript_sdk_holds_a_spoken_turn(chat_api, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    (tmp_path / "question.pcm").write_bytes(speech())
    srv = start_server(chat_api, "--tts", "fixed", "--auth_token", TOKEN, "--ssl_certfile", str(cert), "--ssl_keyfile", str(key))
    try:
        run = subprocess.run(["node", os.path.join(ROOT, "tests", "realtime_sdk.mjs"), f"https://127.0.0.1:{srv.recv_port}/v1",
                              TOKEN, str(tmp_path / "question.pcm")], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "NODE_EXTRA_CA_CERTS": str(cert)})
    finally:
        srv.stop()
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["status"] == "completed", report
    types = report["types"]
    assert types[0] == "session.created" and "input_audio_buffer.speech_started" in types
    assert types.index("conversation.item.input_audio_transcription.completed") < types.index("response.created")
    assert report["transcript"].startswith("About heard ") and report["audioBytes"] > RATE  # over half a second of audio


def test_the_llm_reads_the_conversation_from_its_last_user_messages():
    """Without a socket: the answer's messages keep the last --chat_size exchanges (dropped by half at once, from a user
    message), a function call joins the assistant message before it, and the words being answered come last."""
    conversation = s2s.RealtimeConversation(4)
    for n in range(1, 6):
        conversation.add(s2s.RealtimeItem("message", "user", text=f"question {n}", turn=n))
        conversation.add(s2s.RealtimeItem("message", "assistant", text=f"answer {n}"))
    conversation.add(s2s.RealtimeItem("function_call", call_id="c1", name="f", arguments="{}"))
    conversation.add(s2s.RealtimeItem("function_call_output", call_id="c1", output="42"))
    conversation.add(s2s.RealtimeItem("message", "user", text="question 6", turn=6))  # being answered: the question
    messages = conversation.messages("Be brief.", s2s.Turn(6, True), "question 6")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in messages if m["role"] == "user"] == ["question 3", "question 4", "question 5", "question 6"]
    assert messages[-3]["content"] == "answer 5" and messages[-3]["tool_calls"][0]["id"] == "c1"
    assert messages[-2] == {"role": "tool", "tool_call_id": "c1", "content": "42"}
    # The next turn's prompt starts the same way; the one after drops two exchanges at once.
    conversation.add(s2s.RealtimeItem("message", "assistant", text="answer 6"))
    assert conversation.messages("Be brief.", s2s.Turn(7, True), "question 7")[:len(messages) - 1] == messages[:-1]
    conversation.add(s2s.RealtimeItem("message", "user", text="question 7", turn=7))
    later = conversation.messages("Be brief.", s2s.Turn(8, True), "question 8")
    assert [m["content"] for m in later if m["role"] == "user"][:2] == ["question 5", "question 6"]


def test_semantic_vad_is_the_turn_model(chat_api):
    """On a server started with --turn_detection smart_turn, a session starts with semantic_vad (the Smart Turn model
    ends its turns), takes an eagerness, and answers a spoken question."""
    srv = start_server(chat_api, "--tts", "fixed", "--turn_detection", "smart_turn")
    try:
        async def talk():
            async with connect(srv, key="any") as conn:
                created = (await until(conn, "session.created"))[-1].session.audio.input.turn_detection
                await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
                    "type": "semantic_vad", "eagerness": "high"}}}})
                updated = (await until(conn, "session.updated"))[-1].session.audio.input.turn_detection
                await stream(conn, speech(), real_time=True)
                events = await until(conn, "response.done", timeout=20)
                while events[-1].response.status != "completed":  # (the model may end the turn at its mid pause)
                    events += await until(conn, "response.done", timeout=20)
                return created, updated, events

        created, updated, events = asyncio.run(talk())
    finally:
        srv.stop()
    assert created.type == "semantic_vad" and created.eagerness == "auto"
    assert updated.type == "semantic_vad" and updated.eagerness == "high"
    assert events[-1].response.status == "completed" and of(events, "input_audio_buffer.speech_stopped")
    assert "Smart Turn" in srv.log()
