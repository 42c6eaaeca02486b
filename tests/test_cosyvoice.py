"""The CosyVoice TTS handler against a stand-in module that follows the documented `cosyvoice.cli` API
(tests/stand_ins/cosyvoice: same classes, signatures, yaml checks and {"tts_speech": tensor} chunks; the
audio is a tone of 0.06 s per character). Real CosyVoice weights were not run here."""
import os
import sys
import tempfile

import numpy as np
import pytest

from conftest import ROOT

import s2s_server_pipeline as s2s

STAND_INS = os.path.join(ROOT, "tests", "stand_ins")
REF_DIR = os.path.join(ROOT, "ref_audio")


def model_dir(tmp_path, family_yaml):
    d = tempfile.mkdtemp(dir=tmp_path)
    open(os.path.join(d, family_yaml), "w").close()
    return d


def handler(tmp_path, family_yaml="cosyvoice2.yaml", *flags):
    args = s2s.parse_args(["--tts", "cosyvoice", "--cosyvoice_dir", STAND_INS, "--ref_dir", REF_DIR,
                           "--tts_model_name", model_dir(tmp_path, family_yaml), *flags])
    h = s2s.CosyVoiceTTSHandler.from_args(args)
    h.setup()
    return h


@pytest.fixture
def cv(monkeypatch):
    monkeypatch.syspath_prepend(STAND_INS)  # as --cosyvoice_dir does
    from cosyvoice.cli import cosyvoice  # the stand-in
    cosyvoice.reset_calls()
    return cosyvoice


@pytest.mark.parametrize("family_yaml,family,rate", [("cosyvoice.yaml", "CosyVoice", 22050),
                                                      ("cosyvoice2.yaml", "CosyVoice2", 24000),
                                                      ("cosyvoice3.yaml", "CosyVoice3", 24000)])
def test_each_family_streams_16k_audio_in_order(tmp_path, family_yaml, family, rate):
    h = handler(tmp_path, family_yaml)
    assert h.family == family and h.rate == rate
    text = "Hello there, this sentence is long enough to need several streamed chunks of audio."
    pieces = list(h.synthesize(text, h.voices[0]))
    audio = np.concatenate(pieces)
    assert len([p for p in pieces if len(p)]) >= 2  # streamed: more than one piece
    assert abs(len(audio) / 16000 - 0.06 * len(text)) < 0.05  # resampled to 16 kHz, nothing lost or doubled
    # The stand-in's tone is continuous across chunks: no clicks from per-chunk resampling.
    assert np.max(np.abs(np.diff(audio[2000:-2000]))) < 0.1


def test_references_load_once_at_start_not_per_sentence(tmp_path, cv):
    h = handler(tmp_path)
    loads_at_start = len(cv.calls("load_prompt_wav"))
    spk = cv.calls("add_zero_shot_spk")
    assert [c["zero_shot_spk_id"] for c in spk] == ["espeak_en", "espeak_zh"] and loads_at_start > 0
    for sentence in ("One sentence.", "Another one.", "And a third."):
        list(h.synthesize(sentence, h.voices[1]))
    assert len(cv.calls("load_prompt_wav")) == loads_at_start
    assert all(c["zero_shot_spk_id"] == "espeak_zh" for c in cv.calls("inference_zero_shot"))


def test_cosyvoice3_prompt_gets_its_required_prefix(tmp_path, cv):
    handler(tmp_path, "cosyvoice3.yaml")
    for call in cv.calls("add_zero_shot_spk"):
        assert call["prompt_text"].startswith("You are a helpful assistant.<|endofprompt|>")


def test_stops_at_the_next_chunk_when_closed(tmp_path, cv):
    h = handler(tmp_path)
    long_text = "word " * 200  # about a minute of audio
    stream = h.synthesize(long_text, h.voices[0])
    next(stream)
    made = len(cv.calls("chunk"))
    stream.close()  # what a barge-in does to a stale turn's TTS
    assert len(cv.calls("chunk")) == made < 10
    list(h.synthesize("The next turn still works.", h.voices[0]))  # the lock was released


def test_every_answer_starts_with_a_short_first_chunk(tmp_path, cv):
    """CosyVoice2/3 double the chunk length on the model after each chunk and never reset it; the handler does,
    so a later answer's first audio is as quick as the first answer's (not a 4 s chunk)."""
    h = handler(tmp_path)
    text = "This answer is long enough for the chunks to grow to their longest, and then some more words. " * 3
    firsts = []
    for _ in range(3):
        cv.reset_calls()
        list(h.synthesize(text, h.voices[0]))
        firsts.append(cv.calls("chunk")[0]["seconds"])
    assert firsts[0] < 2.0 and firsts == [firsts[0]] * 3


def test_each_session_keeps_its_voice(tmp_path, cv):
    h = handler(tmp_path, "cosyvoice2.yaml", "--tts_voice", "espeak_zh")
    assert h.choose_voice().name == "espeak_zh"
    h = handler(tmp_path, "cosyvoice2.yaml", "--tts_voice", "random")
    assert {h.choose_voice().name for _ in range(50)} == {"espeak_en", "espeak_zh"}

    class Session:  # just enough of a session for TTSHandler.process
        voice = None

        def turn_record(self, n):
            return s2s.Turn(n, False)

    sessions = [Session() for _ in range(8)]
    for seq in range(3):  # three answers each: every session speaks with one voice throughout
        for session in sessions:
            list(h.process(s2s.AnswerText(session, 1, seq, "Hi.", last=False)))
    used = [c["zero_shot_spk_id"] for c in cv.calls("inference_zero_shot")]
    per_session = [used[i::8] for i in range(8)]
    assert all(len(set(ids)) == 1 for ids in per_session)
    assert [ids[0] for ids in per_session] == [s.voice.name for s in sessions]


@pytest.fixture
def transformers_4(monkeypatch):
    """CosyVoice's own environment: its requirements pin transformers 4.51.3, which its text-stream path needs."""
    import transformers
    monkeypatch.setattr(transformers, "__version__", "4.51.3")


def test_text_stream_starts_speaking_before_the_text_is_complete(tmp_path, cv, transformers_4):
    h = handler(tmp_path, "cosyvoice2.yaml", "--tts_text_stream")
    assert h.reads_text_stream
    feed = s2s.TextFeed()
    for word in "Hello there my friend, how are you doing today? I am fine, thanks.".split(" "):
        feed.put(word + " ")
    feed.close()
    stream = h.synthesize(s2s.clean_stream(feed.pieces()), h.voices[0])
    first = next(stream)
    read_before_first_audio = feed.take_read()
    rest = list(stream)
    assert len(first) and read_before_first_audio and len(read_before_first_audio.split()) < 13
    assert sum(map(len, rest)) > 0 and feed.take_read().endswith("thanks. ")


def test_text_stream_is_refused_for_cosyvoice_300m(tmp_path):
    with pytest.raises(SystemExit, match="needs CosyVoice2 or CosyVoice3"):
        handler(tmp_path, "cosyvoice.yaml", "--tts_text_stream")


def test_text_stream_is_refused_with_transformers_5(tmp_path):
    """With transformers 5 the real text-stream path waits forever (its LLM thread fails): refuse it at start."""
    import transformers
    assert transformers.__version__.startswith("5.")
    with pytest.raises(SystemExit, match="--tts_text_stream needs transformers 4 .*this is 5"):
        handler(tmp_path, "cosyvoice2.yaml", "--tts_text_stream")
    assert handler(tmp_path, "cosyvoice2.yaml").reads_text_stream is False  # sentence by sentence works with 5


def test_clear_start_up_errors(tmp_path):
    with pytest.raises(SystemExit, match="no ref.json"):
        handler(tmp_path, "cosyvoice2.yaml", "--ref_dir", str(tmp_path))
    with pytest.raises(SystemExit, match="not in .*ref.json"):
        handler(tmp_path, "cosyvoice2.yaml", "--tts_voice", "nobody")
    bad = tmp_path / "bad_refs"
    (bad / "ref_wav").mkdir(parents=True)
    (bad / "ref.json").write_text('[{"ref_wav_path": "missing.wav", "prompt_text": "hi"}]')
    with pytest.raises(SystemExit, match="missing.wav not found"):
        handler(tmp_path, "cosyvoice2.yaml", "--ref_dir", str(bad))
    args = s2s.parse_args(["--tts", "cosyvoice", "--cosyvoice_dir", STAND_INS, "--ref_dir", REF_DIR,
                           "--tts_model_name", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a CosyVoice model"):
        s2s.CosyVoiceTTSHandler.from_args(args).setup()


def test_missing_package_is_one_sentence(tmp_path):
    import subprocess
    d = model_dir(tmp_path, "cosyvoice2.yaml")
    code = ("import s2s_server_pipeline as s; "
            f"h = s.CosyVoiceTTSHandler({d!r}, {REF_DIR!r}, 'random', False, False, False); h.setup()")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "cosyvoice.cli.cosyvoice is not installed" in out.stderr and "--cosyvoice_dir" in out.stderr


@pytest.mark.parametrize("text_stream", [False, True])
def test_server_speaks_with_cosyvoice(tmp_path, text_stream):
    """Through the real server: LLM text reaches CosyVoice sentence by sentence, or as it is written."""
    import asyncio
    from client import ExtendedClient
    from conftest import FakeChatAPI, ServerProcess
    answer = "Sure, here is a fine answer. It has two sentences."
    with FakeChatAPI(answer=lambda m: answer) as api:
        srv = ServerProcess("--asr", "fixed", "--llm", "openai", "--lm_model_url", api.url,
                            "--tts", "cosyvoice", "--cosyvoice_dir", STAND_INS, "--ref_dir", REF_DIR,
                            "--tts_model_name", model_dir(tmp_path, "cosyvoice2.yaml"), "--tts_voice", "first",
                            *(["--tts_text_stream", "--transformers_version", "4.51.3"] if text_stream else []))
        try:
            async def scenario():
                async with ExtendedClient(srv.recv_url, srv.send_url) as c:
                    await c.send_text("hello")
                    await c.wait_for(lambda r: r.kind == "answer" and r.data["end"], timeout=30)
                    await c.wait_for(lambda r: r.kind == "metrics")
                    return c
            c = asyncio.run(scenario())
        finally:
            srv.stop()
    assert "".join(r.data["text"] for r in c.events("answer")) == answer
    audio = sum(len(r.pcm) for r in c.events("audio")) / 2 / 16000
    assert abs(audio - 0.06 * len(answer)) < 0.3  # every character spoken once, at 16 kHz
    assert "CosyVoice2" in srv.log() and ("text stream" in srv.log()) == text_stream
