"""--turn_detection smart_turn: a pause asks the turn model whether the user has finished. The policy with a model
whose answers the test writes; the real Smart Turn model (from the pipecat-ai wheel) in the VAD and in the server."""
import asyncio

import numpy as np
import pytest

from client import ExtendedClient, load_wav, voiced_span
from conftest import fixture, start_server

import s2s_server_pipeline as s2s

WINDOW_MS = 32  # silero's window


class ScriptedTurnModel:
    """Answers as the test's rule says, given how much audio (s) it hears, and keeps each answer. The espeak-ng
    fixtures pause between phrases, so a model is asked inside an utterance too."""

    def __init__(self, rule):
        self.rule, self.answers = rule, []

    def is_complete(self, audio):
        heard = len(audio) / s2s.SAMPLE_RATE
        self.answers.append((heard, self.rule(heard)))
        return self.answers[-1][1]


@pytest.fixture(scope="module")
def silero():
    m = s2s.SileroVAD(0.5)
    m.setup()
    return m


def silence(seconds):
    return np.zeros(int(seconds * s2s.SAMPLE_RATE), np.float32)


def ends(vad, turn_model, audio, pause_ms=200, max_silence_ms=2000, reask_ms=0):
    """The SpeechEnded events, each with where in the audio (ms) it was decided."""
    seg = s2s.VADSegmenter(vad, 200, 600, 200, 30000, turn_model, pause_ms, max_silence_ms, reask_ms)
    found = []
    for i in range(0, len(audio), vad.window):
        found += [(e, (i + vad.window) * 1000 / s2s.SAMPLE_RATE)
                  for e in seg.feed(audio[i:i + vad.window]) if isinstance(e, s2s.SpeechEnded)]
    return found


def voice_ms(speech):
    """Where the voice starts and ends in a fixture (ms)."""
    return tuple(sample * 1000 // s2s.SAMPLE_RATE for sample in voiced_span(speech))


def whole(speech_ms):
    """Complete once it has heard all of an utterance of this length (with the VAD's 200 ms pad in front and the
    200 ms pause), not before."""
    return lambda heard: heard * 1000 >= speech_ms + 300


def test_a_complete_turn_ends_at_the_short_pause(silero):
    speech = load_wav(fixture("en_question.wav"))
    start, end = voice_ms(speech)
    model = ScriptedTurnModel(whole(end - start))
    [(event, at_ms)] = ends(silero, model, np.concatenate([speech, silence(2.5)]))
    assert model.answers[-1][1] and not any(said for _, said in model.answers[:-1])
    assert 200 <= at_ms - end < 200 + 2 * WINDOW_MS  # not the 600 ms of --min_silence_ms
    assert 200 <= event.silence_ms < 200 + 2 * WINDOW_MS and event.turn_model_ms > 0  # the wait; the model's time apart


def test_an_unfinished_turn_waits_and_the_next_pause_asks_again(silero):
    first, second = load_wav(fixture("en_question.wav")), load_wav(fixture("en_interrupt.wav"))
    audio = np.concatenate([first, silence(0.9), second, silence(2.5)])  # 0.9 s: silence alone would end it (600 ms)
    start, _ = voice_ms(first)
    _, end = voice_ms(second)
    end += len(first) * 1000 // s2s.SAMPLE_RATE + 900
    model = ScriptedTurnModel(whole(end - start))
    [(event, at_ms)] = ends(silero, model, audio)
    asked_in_the_gap = [heard for heard, said in model.answers if not said and heard * 1000 > len(first) / 16 - start]
    assert asked_in_the_gap  # the 0.9 s gap asked, heard "unfinished", and the turn went on
    assert len(event.audio) * 1000 / s2s.SAMPLE_RATE > end - start  # one turn: both parts
    assert 200 <= at_ms - end < 200 + 2 * WINDOW_MS


def test_a_turn_the_model_never_calls_complete_ends_after_the_longest_silence(silero):
    speech = load_wav(fixture("zh_question.wav"))
    model = ScriptedTurnModel(lambda heard: False)
    [(event, at_ms)] = ends(silero, model, np.concatenate([speech, silence(3.0)]), max_silence_ms=1500)
    assert 1500 <= at_ms - voice_ms(speech)[1] < 1500 + 2 * WINDOW_MS


def test_asked_again_as_the_silence_goes_on_the_turn_ends_when_it_hears_it_complete(silero):
    speech = load_wav(fixture("en_question.wav"))
    start, end = voice_ms(speech)
    heard_whole = whole(end - start)
    asked_about_the_end = []

    def rule(heard):  # unfinished the first time it hears the whole question, complete the next
        if heard_whole(heard):
            asked_about_the_end.append(heard)
        return len(asked_about_the_end) > 1

    [(event, at_ms)] = ends(silero, ScriptedTurnModel(rule), np.concatenate([speech, silence(2.5)]), reask_ms=300)
    assert len(asked_about_the_end) == 2 and 0.29 <= asked_about_the_end[1] - asked_about_the_end[0] < 0.36
    assert 500 <= at_ms - end < 500 + 3 * WINDOW_MS  # the pause, then 300 ms more (each to the next window): not 2 s


def test_the_real_model_loads_from_the_wheel(silero):
    model = s2s.SmartTurn()
    model.setup()
    model.warmup()
    assert model.path.endswith("smart-turn-v3.2-cpu.onnx")
    for name in ("en_question.wav", "zh_question.wav"):
        speech = load_wav(fixture(name))
        p = model.probability(speech)
        assert 0.0 <= p <= 1.0 and p == model.probability(speech)  # a probability, the same for the same audio
    # Through the VAD, every pause it is asked about ends a turn there (it heard it complete), or none does and
    # the turn ends at the longest silence. (On these espeak-ng voices, which fall at every phrase end, it often
    # hears a phrase as a whole turn: see the README, Turn-taking.)
    speech = load_wav(fixture("en_question.wav"))
    found = ends(silero, model, np.concatenate([speech, silence(2.5)]))
    waited = found[-1][1] - voice_ms(speech)[1]
    assert 200 <= waited < 200 + 2 * WINDOW_MS or 2000 <= waited < 2000 + 2 * WINDOW_MS, waited
    assert all(200 <= e.silence_ms < 2000 + 2 * WINDOW_MS + 200 for e, _ in found)


def test_a_missing_model_file_stops_start_up_with_one_sentence(tmp_path):
    model = s2s.SmartTurn(str(tmp_path / "nope.onnx"))
    with pytest.raises(SystemExit, match="does not exist"):
        model.setup()


def test_the_pause_must_be_shorter_than_the_longest_silence(capsys):
    with pytest.raises(SystemExit):
        s2s.parse_args(["--turn_detection", "smart_turn", "--turn_pause_ms", "2500"])
    assert "--turn_pause_ms must be positive and shorter than --max_turn_silence_ms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        s2s.parse_args(["--turn_reask_ms", "-1"])


def test_the_server_answers_a_spoken_turn_ended_by_the_turn_model(chat_api):
    srv = start_server(chat_api, "--turn_detection", "smart_turn", "--playback_lead_ms", "0")

    async def scenario():
        async with ExtendedClient(srv.recv_url, srv.send_url) as c:
            await c.stream_wav(fixture("zh_question.wav"), trailing_silence_s=2.5)  # every turn has ended by then
            last = max(r.data["turn"] for r in c.events("speech_start"))
            await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == last)
            return c, last

    try:
        c, last = asyncio.run(scenario())
    finally:
        srv.stop()
    assert "turn model: Smart Turn smart-turn-v3.2-cpu.onnx" in srv.log()
    assert c.events("transcript", turn=last) and c.events("audio", turn=last)  # the last turn was answered aloud
    # Each turn ended at an ask the model answered "complete", or at the longest silence. The k-th ask comes after
    # 200 + 300 k ms of silence, late by up to a window for every ask so far; the model's time to decide follows.
    asks = [(200 + k * 300, 200 + k * 300 + (k + 1) * WINDOW_MS) for k in range(6)]
    for m in c.events("metrics"):
        decided = m.data["metrics"]["turn_model_ms"]
        silence = m.data["metrics"]["eot_wait_ms"] - decided
        assert any(lo <= silence < hi for lo, hi in asks) and decided > 0 or 2000 <= silence < 2000 + 2 * WINDOW_MS, m.data
