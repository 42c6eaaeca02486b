"""A whole conversation held through the session engine alone: no socket, no server. Audio goes in through
hear(), text through type(), and everything the client would get comes out of output()."""
import asyncio
import gc
import threading
import weakref
from collections import deque

import numpy as np

from client import load_wav, voiced_span
from conftest import fixture, short_voice
import s2s_server_pipeline as s2s
from serve_test_models import FixedLatencyASR, FixedLatencyTTS

CHUNK = 1024  # samples per hear() call, as a browser sends them
SILENCE = np.zeros(s2s.SAMPLE_RATE, np.float32)  # 1 s


class Conversation:
    """A session and everything it has said so far, read by a task of its own as a client would."""

    def __init__(self, pipeline, args, legacy=False):
        self.session = s2s.Session("socket-free", pipeline, args, legacy=legacy)
        self.said: list = []
        self.more = asyncio.Condition()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self):
        async for item in self.session.output():
            async with self.more:
                self.said.append(item)
                self.more.notify_all()

    async def until(self, predicate, timeout_s=10.0):
        """The first item said (so far, or later) that `predicate` accepts."""
        async with asyncio.timeout(timeout_s):
            async with self.more:
                await self.more.wait_for(lambda: any(predicate(x) for x in self.said))
        return next(x for x in self.said if predicate(x))

    async def speak(self, audio):
        """Faster than real time (the VAD counts samples, not seconds), until all of it is heard. Returns how many
        user turns it started."""
        for i in range(0, len(audio), CHUNK):
            await self.session.hear(audio[i:i + CHUNK])
        return await self.session.caught_up()

    def answer(self, turn):
        return [x for x in self.said if isinstance(x, s2s.AnswerAudio) and x.turn == turn]


class ScriptedASR(FixedLatencyASR):
    """Hears what the test says it hears, in order; after that, what the fixed ASR says ("heard 1.2 seconds")."""

    def __init__(self):
        super().__init__(0.02)
        self.script = deque()

    def transcribe(self, audio):
        return self.script.popleft() if self.script else super().transcribe(audio)


class AskedEcho(s2s.EchoLLMHandler):
    """The echo LLM, keeping the questions it was asked; a test can wait until it is asked for a turn."""

    def __init__(self):
        super().__init__()
        self.questions: list = []
        self.turns: list = []  # (session, turn number) of every request
        self.asked = threading.Semaphore(0)

    def respond(self, msg, turn, messages):
        self.questions.append(msg.text)
        self.turns.append((msg.session, msg.turn))
        self.asked.release()
        return super().respond(msg, turn, messages)

    async def asked_for(self, session, turn, timeout_s=5.0):
        while (session, turn) not in self.turns:
            assert await asyncio.to_thread(self.asked.acquire, timeout=timeout_s), f"the LLM was not asked for turn {turn}"


def with_pipeline(scenario, *flags, vad_model=s2s.SileroVAD, turn_model=None):
    args = s2s.parse_args(["--llm", "echo", "--tts", "espeak", "--client_dir", "", *flags])
    vad = vad_model(args.vad_thresh)
    vad.setup()
    pipeline = s2s.Pipeline(args, ScriptedASR(), AskedEcho(), FixedLatencyTTS(0.02, 0.1), vad, turn_model)
    pipeline.start()
    try:
        asyncio.run(asyncio.wait_for(scenario(pipeline, args), 60))
    finally:
        pipeline.stop()


def test_a_spoken_turn_a_typed_turn_and_a_barge_in_with_no_socket():
    async def scenario(pipeline, args):
        c = Conversation(pipeline, args)
        question = load_wav(fixture("en_question.wav"))
        assert await c.speak(np.concatenate([question, SILENCE])) == 1

        transcript = await c.until(lambda x: isinstance(x, s2s.TranscriptEvent) and x.final)
        assert transcript.turn == 1 and transcript.text.startswith("heard ")
        metrics = await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 1)
        assert not metrics.metrics["interrupted"] and metrics.metrics["first_audio_ms"] > 0
        said = c.answer(1)
        assert "".join(x.text for x in said).startswith("You said: heard ")
        assert said[-1].last and sum(len(x.pcm) for x in said) > s2s.SAMPLE_RATE  # over half a second of speech
        kinds = [type(x).__name__ for x in c.said]
        assert kinds.index("SpeechStartEvent") < kinds.index("TranscriptEvent") < kinds.index("AnswerAudio")

        # A typed turn with a long answer, cut off by speech while its audio plays.
        c.session.type("tell me a long story " * 8)  # (it cuts off the first answer if that still plays)
        await c.until(lambda x: isinstance(x, s2s.AnswerAudio) and x.turn == 2 and x.pcm)
        assert c.session.assistant_busy()
        assert await c.speak(load_wav(fixture("en_interrupt.wav"))) == 1
        interrupt = await c.until(lambda x: isinstance(x, s2s.InterruptEvent) and x.turn == 2)
        after = c.said[c.said.index(interrupt):]
        assert not [x for x in after if isinstance(x, s2s.AnswerAudio) and x.turn == 2]
        cut = await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 2)
        assert cut.metrics["interrupted"] and cut.metrics["barge_in_ms"] is not None
        said_of_2 = "".join(x.text for x in c.answer(2))
        assert len(said_of_2) < len("You said: " + "tell me a long story " * 8)  # it did not all go out

        await c.speak(SILENCE)
        await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 3)
        past = c.session.history.past()
        assert [t.number for t in past] == [1, 2, 3]
        messages = c.session.history.messages("system", "", "next")
        assert messages[3]["content"].endswith(s2s.INTERRUPTED_MARK)  # the cut answer, as far as it went
        c.session.close()
        await c.reader  # output() ends with the session
    with_pipeline(scenario)


def test_a_session_that_closes_mid_answer_stops_its_output_and_reports_the_turn():
    async def scenario(pipeline, args):
        ended = []
        c = Conversation(pipeline, args)
        c.session.on_turn_end = lambda session, turn, again: ended.append((turn.number, turn.state, again))
        c.session.type("a long question that gets a long echo " * 6)
        await c.until(lambda x: isinstance(x, s2s.AnswerAudio) and x.pcm)
        c.session.close()
        await asyncio.wait_for(c.reader, 5)
        assert ended == [(1, s2s.TurnState.INTERRUPTED, False)]
        assert not c.answer(1)[-1].last  # its end never went out
    with_pipeline(scenario)


def test_a_legacy_session_sends_the_answer_in_whole_chunks_with_the_question_on_the_first():
    async def scenario(pipeline, args):
        c = Conversation(pipeline, args, legacy=True)
        await c.speak(np.concatenate([load_wav(fixture("en_question.wav")), SILENCE]))
        await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 1)
        said = c.answer(1)
        assert said[0].question.startswith("heard ") and all(x.question is None for x in said[1:])
        assert said[-1].last and said[-1].text  # CleanS2S's client ends an answer only on a message with text
        assert all(x.text for x in said[1:])  # after the first audio, a message per chunk, each with its text
        c.session.close()
    with_pipeline(scenario)


QUESTION = load_wav(fixture("en_question.wav"))
SHORT_VOICE = short_voice()
LONG_ANSWER = "tell me a long story " * 6


def answer_pcm(c, turn) -> bytes:
    return b"".join(x.pcm for x in c.answer(turn))


async def answering(pipeline, args) -> Conversation:
    """A conversation whose long typed answer has begun to go out: what speech over an answer cuts into."""
    c = Conversation(pipeline, args)
    c.session.type(LONG_ANSWER)
    await c.until(lambda x: isinstance(x, s2s.AnswerAudio) and x.pcm)
    return c


def test_a_backchannel_over_an_answer_pauses_it_and_it_goes_on_where_it_stopped():
    """"嗯" over an extended client's answer: the answer pauses as soon as the voice is heard, and goes on once its
    words prove to be a backchannel: nothing of it lost or repeated, no interrupt, nothing in the history."""
    async def scenario(pipeline, args):
        alone = Conversation(pipeline, args)  # the same answer, heard with no one speaking over it
        alone.session.type(LONG_ANSWER)
        await alone.until(lambda x: isinstance(x, s2s.AnswerAudio) and x.last)

        c = await answering(pipeline, args)
        pipeline.asr.handler.script.append("嗯嗯。")
        await c.speak(np.concatenate([SHORT_VOICE, SILENCE]))
        pause = await c.until(lambda x: isinstance(x, s2s.PauseEvent))
        resume = await c.until(lambda x: isinstance(x, s2s.ResumeEvent))
        metrics = await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 1)
        assert pause.turn == resume.turn == 1 and resume.heard == "嗯嗯。"
        assert not [x for x in c.said if isinstance(x, s2s.TranscriptEvent)]  # its words were never a turn's
        during = c.said[c.said.index(pause):c.said.index(resume)]
        assert not [x for x in during if isinstance(x, s2s.AnswerAudio)], "answer audio went out while paused"
        assert not [x for x in c.said if isinstance(x, (s2s.InterruptEvent, s2s.SpeechStartEvent))]
        assert answer_pcm(c, 1) == answer_pcm(alone, 1)  # every frame, once, in order
        assert c.answer(1)[-1].last and not metrics.metrics["interrupted"] and metrics.metrics["resumed"] == 1
        assert [t.number for t in c.session.history.past()] == [1]
        c.session.type("and then?")  # the next turn takes the next number; the backchannel's was never a turn
        after = await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn > 1)
        assert after.turn == 2 and after.metrics["resumed"] == 0
        for conversation in (alone, c):
            conversation.session.close()
    with_pipeline(scenario)


def test_words_over_an_answer_cut_it_off_where_it_paused_and_are_answered():
    async def scenario(pipeline, args):
        c = await answering(pipeline, args)
        pipeline.asr.handler.script.append("wait, what about Paris?")
        await c.speak(np.concatenate([SHORT_VOICE, SILENCE]))
        interrupt = await c.until(lambda x: isinstance(x, s2s.InterruptEvent))
        cut = await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 1)
        pause = next(x for x in c.said if isinstance(x, s2s.PauseEvent))
        assert interrupt.turn == pause.turn == 1 and c.said.index(pause) < c.said.index(interrupt)
        assert not [x for x in c.said if isinstance(x, s2s.ResumeEvent)]
        assert not [x for x in c.said[c.said.index(pause):] if isinstance(x, s2s.AnswerAudio) and x.turn == 1]
        assert cut.metrics["interrupted"] and 0 <= cut.metrics["barge_in_ms"] < 500  # heard -> paused, not -> words known
        start = await c.until(lambda x: isinstance(x, s2s.SpeechStartEvent))
        await c.until(lambda x: isinstance(x, s2s.AnswerAudio) and x.turn == start.turn and x.last)
        assert "".join(x.text for x in c.answer(start.turn)).startswith("You said: wait, what about Paris?")
        assert [t.number for t in c.session.history.past()] == [1, start.turn]
        c.session.close()
    with_pipeline(scenario)


def test_speech_longer_than_a_backchannel_cuts_the_answer_off_before_it_ends():
    async def scenario(pipeline, args):
        c = await answering(pipeline, args)
        first = voiced_span(QUESTION)[0]
        await c.speak(QUESTION[:first + int(1.4 * s2s.SAMPLE_RATE)])  # 1.4 s of voice, still speaking
        await c.until(lambda x: isinstance(x, s2s.InterruptEvent), timeout_s=1.0)  # written out by the reader task
        assert [type(x) for x in c.said if isinstance(x, (s2s.PauseEvent, s2s.InterruptEvent))] == [
            s2s.PauseEvent, s2s.InterruptEvent]
        assert c.session.turn == 2 and c.session.cut_in.turn is None
        await c.speak(np.concatenate([QUESTION[first + int(1.4 * s2s.SAMPLE_RATE):], SILENCE]))
        transcript = await c.until(lambda x: isinstance(x, s2s.TranscriptEvent) and x.turn == 2 and x.final)
        assert float(transcript.text.split()[1]) > 1.4  # the whole utterance, from its first word
        c.session.close()
    with_pipeline(scenario)


def test_with_no_backchannels_speech_cuts_the_answer_off_at_once():
    async def scenario(pipeline, args):
        c = await answering(pipeline, args)
        await c.speak(SHORT_VOICE)
        await c.until(lambda x: isinstance(x, s2s.InterruptEvent))
        assert not [x for x in c.said if isinstance(x, s2s.PauseEvent)]
        c.session.close()
    with_pipeline(scenario, "--backchannels", "")


def test_a_paused_answer_goes_on_when_the_microphone_stops_mid_word():
    """Muted in the middle of "mm": the VAD cannot tell the speech's end, so the answer does not wait for it."""
    async def scenario(pipeline, args):
        c = await answering(pipeline, args)
        await c.speak(SHORT_VOICE[:4800 + 1600])  # 0.3 s of the voice, and then nothing at all
        await c.until(lambda x: isinstance(x, s2s.PauseEvent))
        resume = await c.until(lambda x: isinstance(x, s2s.ResumeEvent), timeout_s=3)
        assert resume.heard == "" and c.session.cut_in.turn is None
        await c.speak(np.concatenate([SHORT_VOICE, SILENCE]))  # audio again: heard afresh (the fixed ASR's words)
        await c.until(lambda x: isinstance(x, s2s.InterruptEvent))
        c.session.close()
    with_pipeline(scenario)


# ---- a tentative answer at a pause (--speculate) ----

PAUSE = np.zeros(int(0.3 * s2s.SAMPLE_RATE), np.float32)  # longer than --turn_pause_ms, shorter than --min_silence_ms
SAID = QUESTION[:voiced_span(QUESTION)[1]]  # the question without the silence after it
HEARD_AFTER_S = 0.3  # time a tentative answer has to go out, if it wrongly could: its models take 20 ms each


def test_a_tentative_answer_goes_out_only_when_the_pause_ends_the_turn_and_is_the_same_answer():
    async def scenario(pipeline, args):
        alone = Conversation(pipeline, s2s.parse_args(["--llm", "echo", "--tts", "espeak", "--no-speculate"]))
        await alone.speak(np.concatenate([QUESTION, SILENCE]))
        await alone.until(lambda x: isinstance(x, s2s.MetricsEvent))
        question = alone.session.history.past()[0].question
        llm = pipeline.llm.handler

        c = Conversation(pipeline, args)
        await c.speak(np.concatenate([SAID, PAUSE]))
        await llm.asked_for(c.session, c.session.speculation.turn.number)
        await asyncio.sleep(HEARD_AFTER_S)
        assert [type(x) for x in c.said] == [s2s.SpeechStartEvent], "the tentative answer went out before the turn ended"
        await c.speak(SILENCE)
        metrics = await c.until(lambda x: isinstance(x, s2s.MetricsEvent))
        assert metrics.turn == 1 and metrics.metrics["speculated"] and metrics.metrics["speculated_ms"] > 0
        # The pauses between its words started answers too (espeak pauses at a comma), each dropped as the voice went on.
        asked = [q for session, q in zip(llm.turns, llm.questions) if session[0] is c.session]
        assert asked[-1] == question
        assert metrics.metrics["llm_requests_discarded"] == len(asked) - 1 <= metrics.metrics["speculations_discarded"]
        assert [x.text for x in c.said if isinstance(x, s2s.TranscriptEvent)] == [question]
        assert all(x.turn == 1 for x in c.said if hasattr(x, "turn"))  # the client knows one turn: its own number
        assert answer_pcm(c, 1) == answer_pcm(alone, 1) and c.answer(1)[-1].last
        assert [t.number for t in c.session.history.past()] == [1]
        c.session.type("and then?")  # the tentative answers took no number
        assert (await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn > 1)).turn == 2
        for conversation in (alone, c):
            conversation.session.close()
    with_pipeline(scenario, "--speculate")


def test_a_tentative_answer_is_dropped_unheard_when_the_user_speaks_on():
    """A thinking pause in the middle of a question: the answer to its first half is started and thrown away; the
    client hears nothing of it, the history holds one question, and the turn counts the request it cost."""
    async def scenario(pipeline, args):
        first, last = voiced_span(QUESTION)
        middle = (first + last) // 2
        llm = pipeline.llm.handler
        c = Conversation(pipeline, args)
        await c.speak(np.concatenate([SAID[:middle], PAUSE]))
        await llm.asked_for(c.session, c.session.speculation.turn.number)
        await asyncio.sleep(HEARD_AFTER_S)
        assert [type(x) for x in c.said] == [s2s.SpeechStartEvent]
        await c.speak(np.concatenate([QUESTION[middle:], SILENCE]))
        metrics = await c.until(lambda x: isinstance(x, s2s.MetricsEvent))
        whole = llm.questions[-1]
        assert float(whole.split()[1]) > float(llm.questions[-2].split()[1])  # the fixed ASR says how long it heard
        assert [x.text for x in c.said if isinstance(x, s2s.TranscriptEvent)] == [whole]
        assert "".join(x.text for x in c.answer(1)) == "You said: " + whole
        assert [type(x) for x in c.said if not isinstance(x, s2s.AnswerAudio)] == [
            s2s.SpeechStartEvent, s2s.SpeechEndEvent, s2s.TranscriptEvent, s2s.MetricsEvent]  # no interrupt, nothing of the half
        assert metrics.turn == 1 and metrics.metrics["speculated"]  # the last pause's answer was taken
        assert metrics.metrics["llm_requests_discarded"] == len(llm.questions) - 1 >= 1
        assert [t.question for t in c.session.history.past()] == [whole]
        c.session.close()
    with_pipeline(scenario, "--speculate")


def test_typed_text_during_a_pause_drops_the_tentative_answer():
    async def scenario(pipeline, args):
        c = Conversation(pipeline, args)
        await c.speak(np.concatenate([SAID, PAUSE]))
        await pipeline.llm.handler.asked_for(c.session, c.session.speculation.turn.number)
        c.session.type("never mind, what time is it?")
        await c.until(lambda x: isinstance(x, s2s.AnswerAudio) and x.last)
        assert {x.turn for x in c.said if isinstance(x, s2s.AnswerAudio)} == {c.session.turn}
        assert "".join(x.text for x in c.answer(c.session.turn)) == "You said: never mind, what time is it?"
        assert c.session.speculation.turn is None and [t.question for t in c.session.history.past()] == [
            "never mind, what time is it?"]
        c.session.close()
    with_pipeline(scenario, "--speculate")


def test_speech_soon_after_the_turns_end_carries_on_the_question():
    """A thinking pause long enough to end the turn, then more words over the start of the answer: the answer stops,
    the two utterances are answered as one question, and the cut answer leaves the history; so for a client that can
    pause (the cut-in waits for the words) and one that cannot. Said after a second of the answer (past
    --continue_turn_ms, 900 ms), the same words are a question of their own."""
    async def spoken_on(pipeline, args, legacy, wait_s):
        c = Conversation(pipeline, args, legacy=legacy)
        assert await c.speak(np.concatenate([SAID, SILENCE[:int(0.7 * s2s.SAMPLE_RATE)]])) == 1  # ends at 600 ms
        await c.until(lambda x: isinstance(x, s2s.AnswerAudio) and x.turn == 1 and x.pcm)  # the answer has begun
        await asyncio.sleep(wait_s)
        assert await c.speak(np.concatenate([SHORT_VOICE, SILENCE])) == 1
        metrics = await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 2)
        await c.until(lambda x: isinstance(x, s2s.AnswerAudio) and x.turn == 2 and x.last)
        first, then = (next(x for x in c.said if isinstance(x, s2s.TranscriptEvent) and x.final and x.turn == n)
                       for n in (1, 2))
        cut = [x.metrics for x in c.said if isinstance(x, s2s.MetricsEvent) and x.turn == 1]
        assert cut[-1]["interrupted"] and (legacy or [x for x in c.said if isinstance(x, s2s.PauseEvent)])
        c.session.close()
        assert first.continues is None and then.continues == metrics.metrics["continues"]  # the page joins them
        return c, metrics.metrics, first.text, then.text

    async def scenario(pipeline, args):
        for legacy in (False, True):
            c, metrics, first, then = await spoken_on(pipeline, args, legacy, 0.0)
            assert metrics["continues"] == 1 and first != then
            assert "".join(x.text for x in c.answer(2)) == f"You said: {first} {then}"
            assert [(t.number, t.question) for t in c.session.history.past()] == [(2, f"{first} {then}")]
        c, metrics, first, then = await spoken_on(pipeline, args, False, 1.0)
        assert metrics["continues"] is None and "".join(x.text for x in c.answer(2)) == f"You said: {then}"
        assert [t.number for t in c.session.history.past()] == [1, 2]  # the cut answer, as far as it was heard
        assert c.session.history.messages("system", "", "next")[1]["content"].endswith(s2s.INTERRUPTED_MARK)
    with_pipeline(scenario, "--speculate")


def test_a_question_carried_on_again_and_again_stays_within_the_text_limit():
    async def scenario(pipeline, args):
        session = s2s.Session("rambling", pipeline, args)
        before = s2s.Turn(1, spoken=True, question=" ".join(["and then"] * 400))  # many utterances carried on already
        turn = s2s.Turn(2, spoken=True, continues=before)
        messages = session.prompt(turn, "system", "", "the end")
        assert messages[-1]["content"] == turn.question and len(turn.question) == args.max_text_chars == 2000
        assert turn.question.endswith("and then the end")  # the latest words kept
        session.close()
    with_pipeline(scenario)


def test_transcripts_carried_on_join_as_the_language_writes():
    assert s2s.joined("How do I", "reset my router?") == "How do I reset my router?"
    assert s2s.joined("我怎么", "重置路由器的密码？") == "我怎么重置路由器的密码？"
    assert s2s.joined("我想知道。", "天气怎么样") == "我想知道。天气怎么样"
    assert s2s.joined("嗯 ok", "好") == "嗯 ok 好" and s2s.joined("", "好") == "好"


def test_a_closed_session_is_freed_by_reference_counting_alone():
    """It holds no reference cycle (its listener, speaker, cut-in and tentative answer are each handed the session
    rather than keeping it), and no idle stage worker holds it: with the garbage collector off, a session that
    started and dropped tentative answers, paused an answer for a backchannel, and closed, is freed at once."""
    async def scenario(pipeline, args):
        c = Conversation(pipeline, args)
        first, last = voiced_span(QUESTION)
        await c.speak(np.concatenate([SAID[:(first + last) // 2], PAUSE, QUESTION[(first + last) // 2:], SILENCE]))
        metrics = await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 1)
        assert metrics.metrics["speculations_discarded"] >= 1
        c.session.type(LONG_ANSWER)
        await c.until(lambda x: isinstance(x, s2s.AnswerAudio) and x.turn == 2 and x.pcm)
        pipeline.asr.handler.script.append("嗯。")
        await c.speak(np.concatenate([SHORT_VOICE, SILENCE]))
        await c.until(lambda x: isinstance(x, s2s.ResumeEvent))
        pipeline.llm.handler.turns.clear()  # (the test's LLM keeps who asked it)
        freed = asyncio.Event()
        ref = weakref.ref(c.session, lambda _: freed.set())
        c.session.close()
        await asyncio.wait_for(c.reader, 5)
        del c, metrics
        await asyncio.wait_for(freed.wait(), 5)  # a cycle would keep it until a collection that never comes
        assert ref() is None

    gc.collect()
    gc.disable()
    try:
        with_pipeline(scenario, "--speculate")
    finally:
        gc.enable()


class RefusingVAD(s2s.SileroVAD):
    """silero, refusing the audio of the streams whose state it was told, as a fork's model might refuse a sample
    format it cannot take."""

    def __init__(self, threshold):
        super().__init__(threshold)
        self.refused: list = []

    def speech_probs(self, states, streams):
        if any(state is refused for state in states for refused in self.refused):
            raise ValueError("the VAD refused this audio")
        return super().speech_probs(states, streams)


def test_audio_the_vad_refuses_fails_its_session_at_its_next_message_and_no_other():
    """Reading a client's audio never waits for its VAD, so what the VAD makes of it comes later: a failure is kept
    and raised to the session's next message (where the server closes its connection, 1011). A session heard in the
    same rounds goes on."""
    async def scenario(pipeline, args):
        refused, other = Conversation(pipeline, args), Conversation(pipeline, args)
        pipeline.vad_model.refused.append(refused.session.listener.vad.state)
        question = np.concatenate([load_wav(fixture("en_question.wav")), SILENCE])
        await refused.session.hear(question[:CHUNK])  # queued: the VAD has not heard it yet
        heard = asyncio.gather(refused.speak(question[CHUNK:]), other.speak(question), return_exceptions=True)
        failed, started = await heard
        assert isinstance(failed, ValueError) and "refused" in str(failed)
        assert started == 1  # the other session's question started its turn
        await other.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 1)
        for message in (refused.session.hear(question[:CHUNK]), refused.session.caught_up()):
            try:
                await message
            except ValueError as exc:
                assert "refused" in str(exc)
            else:
                raise AssertionError("the failure was not raised to the next message")
        assert not [x for x in refused.said if isinstance(x, s2s.SpeechStartEvent)]
        refused.session.close()
        other.session.close()
    with_pipeline(scenario, vad_model=RefusingVAD)


class HeldTurnModel:
    """A turn model that answers "complete" only once the test lets it go, as a slow model on a busy CPU might."""

    def __init__(self):
        self.go = threading.Event()
        self.asked = threading.Semaphore(0)

    def is_complete(self, audio):
        self.asked.release()
        assert self.go.wait(20)
        return True


def test_a_turn_starts_while_the_turn_model_is_busy_with_other_sessions_pauses():
    """The turn model (~45 ms of CPU a question) is asked off the event loop, on a few threads that every session
    shares. Only a pause waits for its answer: a session's other decisions (its turn starts, a barge-in) are made on
    the loop as its audio is heard, even while every one of those threads is busy with other sessions' pauses."""
    model = HeldTurnModel()

    async def scenario(pipeline, args):
        question = np.concatenate([load_wav(fixture("en_question.wav")), SILENCE[:s2s.SAMPLE_RATE * 3 // 10]])
        threads = pipeline.turn_pool._max_workers
        pausing = [Conversation(pipeline, args) for _ in range(threads)]
        # Each pauses (between its phrases, or after its question): the turn model is asked, and holds a thread.
        said = [asyncio.create_task(c.speak(question)) for c in pausing]
        for _ in range(threads):
            assert await asyncio.to_thread(model.asked.acquire, timeout=10), "a pause did not ask the turn model"

        starting = Conversation(pipeline, args)
        onset = voiced_span(question)[0]
        assert await asyncio.wait_for(starting.speak(question[:onset + s2s.SAMPLE_RATE * 2 // 5]), 5) == 1
        await starting.until(lambda x: isinstance(x, s2s.SpeechStartEvent))
        assert not model.go.is_set()  # its turn started while the turn model still held every thread

        model.go.set()
        assert all(started >= 1 for started in await asyncio.gather(*said))  # (a pause it calls complete ends a turn)
        for c in pausing:
            await c.until(lambda x: isinstance(x, s2s.SpeechEndEvent))
        for c in pausing + [starting]:
            c.session.close()
    with_pipeline(scenario, "--turn_detection", "smart_turn", "--no-speculate", turn_model=model)


class BrokenTurnModel:
    def is_complete(self, audio):
        raise RuntimeError("the turn model broke")


def test_a_turn_model_that_fails_leaves_the_session_answering_its_turns_ended_by_silence():
    """A failed question to the turn model is taken for "not finished": the turn ends at --max_turn_silence_ms of
    silence, and is answered, as on any other turn; the session is not failed for it."""
    async def scenario(pipeline, args):
        c = Conversation(pipeline, args)
        question = load_wav(fixture("en_question.wav"))
        assert await c.speak(np.concatenate([question, SILENCE, SILENCE])) == 1
        metrics = await c.until(lambda x: isinstance(x, s2s.MetricsEvent) and x.turn == 1)
        assert metrics.metrics["eot_wait_ms"] >= args.max_turn_silence_ms  # the longest silence ended it
        assert "".join(x.text for x in c.answer(1)).startswith("You said: heard ")
        assert await c.speak(np.concatenate([question, SILENCE, SILENCE])) == 1  # and the session goes on
        c.session.close()
    with_pipeline(scenario, "--turn_detection", "smart_turn", "--no-speculate", "--max_turn_silence_ms", "1200",
                  turn_model=BrokenTurnModel())
