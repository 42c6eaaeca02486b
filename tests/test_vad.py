"""VAD on real speech (espeak-ng fixtures, English and Mandarin), silence and noise."""
import asyncio

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


def test_the_utterance_begins_with_its_pad_of_what_came_before_the_voice():
    """The windows heard before the voice, idle and silent, are kept as the utterance's start (--speech_pad_ms)."""
    m = model("silero")
    audio = np.concatenate([silence(1), load_wav(fixture("en_question.wav")), silence(1)])
    audio += np.random.default_rng(3).normal(0, 0.002, len(audio)).astype(np.float32)  # a room, not digital silence
    end = next(e for e in segment(m, audio) if isinstance(e, s2s.SpeechEnded))
    first = next(i for i, p in enumerate(alone(m, audio)) if p >= m.threshold)  # the first voiced window
    pad = round(200 / (1000 * m.window / 16000)) * m.window  # samples: the pad's whole windows
    np.testing.assert_array_equal(end.audio[:pad], audio[first * m.window - pad:first * m.window])


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


# The server hears every session through one VADBatcher: one model call for the windows all sessions have ready.

class CountingModel:
    """A VAD model that records how many streams each call had; `on_call`, when given, runs at each call."""

    def __init__(self, inner, on_call=None):
        self.inner, self.on_call, self.calls = inner, on_call, []
        self.window, self.threshold = inner.window, inner.threshold

    def new_state(self):
        return self.inner.new_state()

    def speech_probs(self, states, streams):
        self.calls.append(len(streams))
        if self.on_call is not None:
            self.on_call()
        return self.inner.speech_probs(states, streams)


def streams():
    """What several users say at once: two languages, speech at different offsets, noise, silence."""
    en, zh = load_wav(fixture("en_question.wav")), load_wav(fixture("zh_question.wav"))
    noise = np.random.default_rng(1).normal(0, 0.05, 16000 * 3).astype(np.float32)
    return [np.concatenate([en, silence(1)]), np.concatenate([silence(0.7), zh, silence(1)]), np.concatenate([zh, en]),
            noise, silence(2), np.concatenate([silence(0.3), en])]


def alone(m, audio, chunk=1024):
    """Each window's probability with the stream heard alone, one model call a window."""
    seg = s2s.VADSegmenter(m, 200, 600, 200, 30000)
    probs = []
    for i in range(0, len(audio), chunk):
        for w in seg.split(audio[i:i + chunk]):
            probs += m.speech_probs([seg.state], [[w]])[0]
    return probs


def ask(batcher, state, windows):
    """A session's windows into the batcher's next round: (a future of their probabilities, the request)."""
    future = asyncio.get_running_loop().create_future()

    def then(outcome):
        (future.set_exception if isinstance(outcome, Exception) else future.set_result)(outcome)
    request = s2s.VADRequest(state, windows, then)
    batcher.hear(request)
    return future, request


async def hear_together(batcher, m, audios, chunk=1024):
    """Every stream through one batcher at once, in 64 ms messages, as the server hears its sessions; each stream's
    probabilities and events."""
    async def one(audio):
        seg = s2s.VADSegmenter(m, 200, 600, 200, 30000)
        probs, events = [], []
        for i in range(0, len(audio), chunk):
            windows = seg.split(audio[i:i + chunk])
            p = await ask(batcher, seg.state, windows)[0] if len(windows) else []
            probs += p
            events += seg.decide(windows, p)
        return probs, events
    return await asyncio.gather(*(one(a) for a in audios))


@pytest.mark.parametrize("vad", ["silero", "webrtc"])
def test_streams_of_different_lengths_in_one_call_get_what_they_get_alone(vad):
    """Under load a round holds whatever each session sent meanwhile: none, one or several windows, a different
    number for each."""
    m = model(vad)
    audios = streams()
    segs = [s2s.VADSegmenter(m, 200, 600, 200, 30000) for _ in audios]
    got, pos, uneven = [[] for _ in audios], [0] * len(audios), 0
    rng = np.random.default_rng(2)
    while any(p < len(a) for p, a in zip(pos, audios)):
        sizes = rng.integers(0, 4, len(audios)) * 700  # samples: 0 to 4 windows, a leftover carried to the next
        windows = [seg.split(a[p:p + n]) for seg, a, p, n in zip(segs, audios, pos, sizes)]
        pos = [p + n for p, n in zip(pos, sizes)]
        uneven += len({len(w) for w in windows}) > 1
        for i, probs in enumerate(m.speech_probs([seg.state for seg in segs], windows)):
            got[i] += probs
    assert uneven > 20
    for audio, probs in zip(audios, got):
        np.testing.assert_allclose(probs, alone(m, audio), atol=1e-5)


@pytest.mark.parametrize("vad", ["silero", "webrtc"])
def test_sessions_heard_in_one_batch_get_the_probabilities_they_get_alone(vad):
    m = model(vad)
    audios = streams()
    counted = CountingModel(m)
    together = asyncio.run(hear_together(s2s.VADBatcher(counted), m, audios))
    windows = sum(len(a) // m.window for a in audios)
    assert max(counted.calls) == len(audios) and len(counted.calls) < windows / 4  # batched, not a call a window
    for audio, (probs, events) in zip(audios, together):
        expected = alone(m, audio)
        assert len(probs) == len(expected)
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        assert [type(e) for e in events] == [type(e) for e in segment(m, audio)]
    assert [type(e) for e in together[0][1]] == [s2s.SpeechStarted, s2s.SpeechEnded]


def test_a_session_that_leaves_before_its_round_and_one_that_joins_during_a_round():
    m = model("silero")
    en = load_wav(fixture("en_question.wav"))
    w = m.window
    joined = []

    async def scenario():
        def join():  # a session's audio arrives while a round is in the model: it goes in the next round
            if not joined:
                joined.append(ask(batcher, joining.state, [en[12000:12000 + w]])[0])

        batcher = s2s.VADBatcher(CountingModel(m, join))
        staying, leaving, joining = (s2s.VADSegmenter(m, 200, 600, 200, 30000) for _ in range(3))
        first, _ = ask(batcher, staying.state, [en[5000:5000 + w], en[5000 + w:5000 + 2 * w]])
        left, request = ask(batcher, leaving.state, [en[9000:9000 + w]])
        await asyncio.sleep(0)
        request.wanted = False  # its client went away before its round
        return await first, await joined[0], left.done(), batcher.model.calls, leaving.state

    first, second, answered, calls, left_state = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert not answered and calls == [1, 1]  # the leaver was not heard; the joiner went in the next round, alone
    assert not left_state["state"].any()  # nothing of the leaver's was computed
    assert first == pytest.approx(alone(m, en[5000:5000 + 2 * w], chunk=2 * w), abs=1e-5)
    assert second == pytest.approx(alone(m, en[12000:12000 + w], chunk=w), abs=1e-5)


def test_one_sessions_bad_input_fails_only_that_session():
    m = model("silero")
    audios = streams()[:3]

    async def scenario():
        batcher = s2s.VADBatcher(m)
        segs = [s2s.VADSegmenter(m, 200, 600, 200, 30000) for _ in range(4)]
        windows = [segs[i].split(a[:4 * m.window]) for i, a in enumerate(audios)]
        bad = [np.zeros((m.window, 2), np.float32)]  # stereo, as a fork's decoder might give: the model refuses it
        return await asyncio.gather(*(ask(batcher, s.state, ws)[0] for s, ws in zip(segs, windows + [bad])),
                                    return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert isinstance(outcomes[3], Exception)
    for audio, probs in zip(audios, outcomes[:3]):
        assert probs == pytest.approx(alone(m, audio[:4 * m.window]), abs=1e-5)
