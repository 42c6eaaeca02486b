"""OpenAI-compatible ASR (/v1/audio/transcriptions) and TTS (/v1/audio/speech) through the real openai client,
against a local server on 127.0.0.1: the normal path, and the errors a user must understand."""
import numpy as np
import pytest

from client import load_wav
from conftest import fixture
from fakes import FakeSpeechAPI

import s2s_server_pipeline as s2s


@pytest.fixture
def api():
    with FakeSpeechAPI() as fake:
        yield fake


def asr(api, language="auto", timeout_s=5.0):
    h = s2s.OpenAIASRHandler(api.url, "whisper-test", language, timeout_s)
    h.setup()
    return h


def tts(api, fmt="wav", timeout_s=5.0):
    h = s2s.OpenAITTSHandler(api.url, "tts-test", "alloy", fmt, timeout_s)
    h.setup()
    return h


def test_transcription_uploads_the_utterance_as_wav(api, monkeypatch):
    monkeypatch.setenv("ASR_API_KEY", "sk-asr")
    speech = load_wav(fixture("en_question.wav"))
    assert asr(api, language="en").transcribe(speech) == f"heard {len(speech) / 16000:.1f} seconds"
    fields, seconds = api.uploads[-1]
    assert fields["model"] == "whisper-test" and fields["language"] == "en"
    assert abs(seconds - len(speech) / 16000) < 0.01
    assert api.requests[-1]["auth"] == "Bearer sk-asr"


def test_transcription_language_auto_is_left_to_the_server(api):
    asr(api).transcribe(np.zeros(8000, np.float32))
    assert "language" not in api.uploads[-1][0]


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_speech_streams_resampled_audio(api, fmt):
    pieces = list(tts(api, fmt).synthesize("Hello there, how are you?"))  # 25 characters: 1.25 s at 24 kHz
    audio = np.concatenate(pieces)
    assert len(pieces) > 2  # streamed in pieces, not one block
    assert abs(len(audio) / 16000 - 1.25) < 0.02  # resampled 24 kHz -> 16 kHz, nothing lost
    assert 0.15 < np.sqrt(np.mean(audio[1000:-1000] ** 2)) < 0.25  # the 0.3-amplitude tone (rms 0.21)


def test_bad_key_is_one_clear_sentence(api):
    api.fail_with = 401
    with pytest.raises(s2s.APIError, match=r"TTS API at .* refused the API key \(401\)"):
        list(tts(api).synthesize("hi"))
    with pytest.raises(s2s.APIError, match=r"ASR API at .* refused the API key"):
        asr(api).transcribe(np.zeros(8000, np.float32))


def test_server_error_names_the_status(api):
    api.fail_with = 503
    with pytest.raises(s2s.APIError, match=r"answered 503: the model is overloaded"):
        asr(api).transcribe(np.zeros(8000, np.float32))


def test_timeout_says_how_long_it_waited(api):
    api.fail_with, api.slow_s = "slow", 3.0
    with pytest.raises(s2s.APIError, match=r"did not answer within 1 s"):
        list(tts(api, timeout_s=1.0).synthesize("hi"))


def test_non_audio_reply_is_refused(api):
    api.speech_content_type = "text/html; charset=utf-8"
    with pytest.raises(s2s.APIError, match=r"answered text/html.*not audio.*Service unavailable"):
        list(tts(api).synthesize("hi"))


def test_unreachable_server():
    h = s2s.OpenAITTSHandler("http://127.0.0.1:9/v1", "m", "v", "wav", 2.0)
    h.setup()
    with pytest.raises(s2s.APIError, match="cannot be reached"):
        list(h.synthesize("hi"))


def test_wav_stream_decoder_handles_any_split():
    from fakes import tone_wav
    wav = tone_wav(0.5, 22050)
    whole = s2s.read_wav_bytes(wav)[1]
    dec = s2s.WavStreamDecoder()
    pieces = [dec.feed(wav[i:i + 7]) for i in range(0, len(wav), 7)]  # splits headers and samples
    assert dec.rate == 22050 and np.array_equal(np.concatenate(pieces), whole)
