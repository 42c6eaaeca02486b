"""espeak-ng TTS: real speech at 16 kHz, English and Chinese."""
import numpy as np
import pytest

import s2s_server_pipeline as s2s


@pytest.fixture(scope="module")
def tts():
    h = s2s.EspeakTTSHandler("en-us", "cmn", 175)
    h.setup()
    return h


@pytest.mark.parametrize("text,min_s,max_s", [("Hello, how are you today?", 1.0, 3.5), ("你好，今天天气很好。", 1.0, 4.5)])
def test_synthesizes_audible_16k_speech(tts, text, min_s, max_s):
    audio = np.concatenate(list(tts.synthesize(text)))
    assert audio.dtype == np.float32
    assert min_s < len(audio) / s2s.SAMPLE_RATE < max_s
    assert np.sqrt(np.mean(audio ** 2)) > 0.02


def test_text_starting_with_a_dash_is_spoken_not_parsed_as_an_option(tts):
    audio = np.concatenate(list(tts.synthesize("-v is not a voice")))
    assert len(audio) > s2s.SAMPLE_RATE * 0.5


def test_markup_is_not_read_aloud(tts):
    class S:  # just enough of a session for TTSHandler.process
        voice = None

        def turn_record(self, n):
            return s2s.Turn(n, True)
    plain = list(tts.process(s2s.AnswerText(S(), 1, 0, "Hello world.", last=False)))
    marked = list(tts.process(s2s.AnswerText(S(), 1, 0, "**Hello** `world`.", last=True)))
    assert abs(len(plain[0].pcm) - len(marked[0].pcm)) < 0.1 * len(plain[0].pcm)
    assert marked[0].text == "**Hello** `world`."  # the client still sees the text as written
    assert marked[-1].last and marked[-1].pcm == b""


def test_wav_parser_rejects_garbage():
    with pytest.raises(ValueError):
        s2s.read_wav_bytes(b"not a wav at all")
