"""The FunASR handler through funasr's real AutoModel code path, on tiny random-weight models built here."""
import os
import subprocess
import sys

import pytest

from client import load_wav
from conftest import ROOT, fixture
from tiny_funasr import build_paraformer, build_sensevoice_small

import s2s_server_pipeline as s2s


@pytest.mark.parametrize("build", [build_sensevoice_small, build_paraformer])
def test_funasr_handler_loads_and_transcribes(tmp_path, build):
    model_dir = build(str(tmp_path / build.__name__))
    h = s2s.FunASRHandler(model_dir, "cpu", "auto")
    h.setup()
    h.warmup()
    text = h.transcribe(load_wav(fixture("en_question.wav")))
    assert isinstance(text, str) and text  # random weights: some text, meaningless
    assert "<|" not in text  # SenseVoice's language / emotion / event tags are stripped
    assert h.is_sensevoice == (build is build_sensevoice_small)


def test_wrong_model_path_fails_at_start_up_with_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="ASR model .*missing does not exist"):
        s2s.FunASRHandler(str(tmp_path / "missing"), "cpu", "auto").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no FunASR model there"):
        s2s.FunASRHandler(str(tmp_path / "empty"), "cpu", "auto").setup()


def test_a_model_that_cannot_be_downloaded_stops_start_up_with_one_sentence():
    """The default ASR model with no way to the model hub (its address made to refuse connections, as on a machine
    with no network): one sentence that names the model, the cause and what to do instead, and none of funasr's own
    output (its notices and its list of 40 optional imports that failed)."""
    server = [sys.executable, os.path.join(ROOT, "s2s_server_pipeline.py"), "--llm", "echo", "--recv_port", "0"]
    done = subprocess.run(server, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MODELSCOPE_DOMAIN": "127.0.0.1:9"})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("ASR model iic/SenseVoiceSmall could not be downloaded from ModelScope: there is no network (the model "
                    "hub cannot be reached). Download it where there is a network (modelscope download --model "
                    "iic/SenseVoiceSmall --local_dir DIR) and start with --asr_model_name DIR, or transcribe through an "
                    "API with --asr openai"), done.stderr[-3000:]
    for noise in ("Registered model keys", "Recorded import failures", "Notice: ffmpeg", "funasr version"):
        assert noise not in done.stdout + done.stderr, noise


class Recorder:
    """Just enough of a session for ASRHandler.process: turn records and the events sent."""

    def __init__(self):
        self.turns = {1: s2s.Turn(1, True)}
        self.events = []

    def turn_record(self, n):
        return self.turns[n]

    def send_event(self, event):
        self.events.append(event)


def test_streaming_paraformer_sends_partials_then_the_final_text(tmp_path):
    h = s2s.FunASRStreamingHandler(build_paraformer(str(tmp_path / "stream"), streaming=True), "cpu", "auto")
    h.setup()
    h.warmup()
    session, speech = Recorder(), load_wav(fixture("zh_question.wav"))
    pieces = [speech[i:i + 4000] for i in range(0, len(speech), 4000)]  # pieces of any size
    for piece in pieces[:-1]:
        assert list(h.process(s2s.Utterance(session, 1, piece, final=False))) == []
    final = list(h.process(s2s.Utterance(session, 1, pieces[-1], final=True)))
    partials = [e.text for e in session.events if isinstance(e, s2s.TranscriptEvent) and not e.final]
    assert len(partials) >= 3  # one every 600 ms of speech, as the text grows
    assert all(b.startswith(a) for a, b in zip(partials, partials[1:]))
    assert final[0].text.startswith(partials[-1]) and len(final[0].text) >= len(partials[-1])
    assert session.events[-1].final and session.events[-1].text == final[0].text


def test_server_streams_partial_transcripts_to_the_client(tmp_path):
    import asyncio
    from client import ExtendedClient
    from conftest import ServerProcess
    model = build_paraformer(str(tmp_path / "stream"), streaming=True)
    srv = ServerProcess("--asr", "funasr_streaming", "--asr_model_name", model, "--device", "cpu", "--llm", "echo")
    try:
        async def scenario():
            async with ExtendedClient(srv.recv_url, srv.send_url) as c:
                await c.stream_wav(fixture("zh_question.wav"))
                await c.wait_for(lambda r: r.kind == "answer" and r.data["end"])
                return c
        c = asyncio.run(scenario())
    finally:
        srv.stop()
    transcripts = c.events("transcript")
    partial = [r for r in transcripts if not r.data["final"]]
    assert partial and transcripts[-1].data["final"]
    assert partial[0].t < c.speech_onsets[0] + 5.0  # while the 5.6 s utterance was still being spoken
    answer = "".join(r.data["text"] for r in c.events("answer"))
    assert transcripts[-1].data["text"] in answer  # the echo LLM repeats the final transcript
