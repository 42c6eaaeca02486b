"""VAD on real speech (espeak-ng fixtures, English and Mandarin), silence and noise."""
import numpy as np
import pytest

from client import load_wav, voiced_span
from conftest import fixture

import s2s_server_pipeline as s2s


def model(name):
    m = s2s.VAD_MODELS[name](0.5 if name == "silero" else 3)
    m.setup()
    return m


def segment(m, audio, min_speech_ms=200, min_silence_ms=600, pad_ms=200, max_speech_ms=30000, chunk=1024):
    seg = s2s.VADSegmenter(m, min_speech_ms, min_silence_ms, pad_ms, max_speech_ms)
    events = []
    for i in range(0, len(audio), chunk):  # as a client streams it: 64 ms messages
        events += seg.feed(audio[i:i + chunk])
    return events


def silence(seconds):
    return np.zeros(int(seconds * s2s.SAMPLE_RATE), np.float32)


@pytest.mark.parametrize("vad", ["silero", "webrtc"])
@pytest.mark.parametrize("name", ["en_question.wav", "zh_question.wav"])
def test_one_utterance_found_in_speech(vad, name):
    speech = load_wav(fixture(name))
    events = segment(model(vad), np.concatenate([silence(0.5), speech, silence(1.0)]))
    assert [type(e) for e in events] == [s2s.SpeechStarted, s2s.SpeechEnded]
    # The utterance holds the speech (the fixture has 0.3 s of silence at each end) plus padding, not the silence.
    assert len(speech) / 16000 - 0.8 < len(events[1].audio) / 16000 < len(speech) / 16000 + 0.4
    assert events[1].silence_ms >= 600


@pytest.mark.parametrize("vad", ["silero", "webrtc"])
def test_two_utterances_separated_by_a_pause(vad):
    en, zh = load_wav(fixture("en_question.wav")), load_wav(fixture("zh_question.wav"))
    events = segment(model(vad), np.concatenate([en, silence(1.0), zh, silence(1.0)]))
    ends = [e for e in events if isinstance(e, s2s.SpeechEnded)]
    assert len(ends) == 2 and len(ends[0].audio) < len(ends[1].audio)


@pytest.mark.parametrize("vad", ["silero", "webrtc"])
def test_nothing_found_in_silence(vad):
    assert segment(model(vad), silence(5)) == []


def test_silero_ignores_steady_noise():
    noise = np.random.default_rng(0).normal(0, 0.05, 16000 * 5).astype(np.float32)
    assert segment(model("silero"), np.concatenate([noise, silence(1)])) == []


def test_short_pause_inside_speech_does_not_end_the_turn():
    en = load_wav(fixture("en_question.wav"))[4800:-4800]  # without the fixture's 0.3 s of silence at each end
    events = segment(model("silero"), np.concatenate([en, silence(0.25), en, silence(1.0)]))
    assert [type(e) for e in events] == [s2s.SpeechStarted, s2s.SpeechEnded]


def test_turn_starts_after_min_speech_not_at_the_end():
    """The start is known a couple of hundred ms into speech: that is when a barge-in can fire."""
    m = model("silero")
    seg = s2s.VADSegmenter(m, 200, 600, 200, 30000)
    audio = load_wav(fixture("en_question.wav"))
    for i in range(0, len(audio), 512):
        events = seg.feed(audio[i:i + 512])
        if events:
            assert isinstance(events[0], s2s.SpeechStarted)
            assert i / 16000 < 0.3 + 0.5  # 0.3 s leading silence, then at most ~0.5 s of speech
            return
    pytest.fail("no speech start")


def test_max_speech_cuts_long_utterances():
    zh = load_wav(fixture("zh_question.wav"))
    events = segment(model("silero"), np.concatenate([zh, silence(1)]), max_speech_ms=2000)
    ends = [e for e in events if isinstance(e, s2s.SpeechEnded)]
    assert len(ends) >= 2 and all(len(e.audio) <= 2000 * 16 + 512 for e in ends)


@pytest.mark.parametrize("vad", ["silero", "webrtc"])
def test_end_of_turn_wait_counts_from_where_the_voice_stops(vad):
    """silero keeps its speech probability up for a window or two after the voice ends; the wait must not
    grow by that: the turn ends min_silence_ms after the last loud 10 ms, give or take the window the voice
    ends in (windows are 32 ms for silero, 30 ms for webrtcvad)."""
    speech = load_wav(fixture("en_question.wav"))
    audio = np.concatenate([speech, silence(1.0)])
    voice_end = voiced_span(audio)[1]
    m = model(vad)
    seg = s2s.VADSegmenter(m, 200, 600, 200, 30000)
    for i in range(0, len(audio), m.window):
        if any(isinstance(e, s2s.SpeechEnded) for e in seg.feed(audio[i:i + m.window])):
            decided_ms = (i + m.window - voice_end) * 1000 / 16000
            break
    assert 600 <= decided_ms < 600 + 1.5 * 1000 * m.window / 16000, decided_ms
