"""Stage plumbing: stale work is dropped, a failing model call fails only its own turn."""
import queue
import threading
import time

import s2s_server_pipeline as s2s


class FakeSession:
    """Just what a Stage touches: tag (for its log), wants(), fail_turn()."""

    def __init__(self, slot=0):
        self.tag, self.slot, self.turn = "u", slot, 1
        self.failures = []

    def wants(self, turn):
        return turn == self.turn and turn not in [f[0] for f in self.failures]

    def fail_turn(self, turn, code, message):
        self.failures.append((turn, code, message))


class Doubler(s2s.BaseHandler):
    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()

    def process(self, msg):
        if msg.text == "boom":
            raise RuntimeError("model exploded")
        if msg.text == "slow":
            for i in range(100):
                self.started.set()
                self.release.wait()
                yield f"piece{i}"
            return
        yield msg.text * 2


def run_stage(handler, workers=1):
    out = queue.Queue()
    stage = s2s.Stage("test", handler, workers, out.put)
    stage.start()
    return stage, out


def test_failure_fails_its_turn_and_the_stage_goes_on():
    session = FakeSession()
    stage, out = run_stage(Doubler())
    stage.put(s2s.UserText(session, 1, "boom"))
    stage.put(s2s.UserText(session, 1, "ab"))  # the rest of the failed turn: dropped
    stage.put(s2s.UserText(FakeSession(), 1, "cd"))  # another session, on the same worker, after it
    assert out.get(timeout=5) == "cdcd"
    stage.stop()
    assert out.empty()
    assert session.failures == [(1, "test_failed", "test failed: model exploded")]


def test_stale_work_is_dropped_where_taken_and_stopped_mid_stream():
    session = FakeSession()
    handler = Doubler()
    stage, out = run_stage(handler)
    stage.put(s2s.UserText(session, 1, "slow"))
    handler.started.wait(5)
    stage.put(s2s.UserText(session, 1, "never"))  # queued behind the slow one
    session.turn = 2  # the user started a new turn: everything of turn 1 is stale
    handler.release.set()
    stage.put(s2s.UserText(session, 2, "xy"))
    results = [out.get(timeout=5)]
    while results[-1] != "xyxy":
        results.append(out.get(timeout=5))
    stage.stop()
    assert results in (["xyxy"], ["piece0", "xyxy"])  # at most the piece already made; never "nevernever"


def test_asr_workers_flag_sets_the_asr_stage_threads():
    args = s2s.parse_args(["--asr_workers", "3", "--llm", "echo", "--tts", "espeak", "--client_dir", ""])
    pipeline = s2s.Pipeline(args, s2s.ASRHandler(), s2s.EchoLLMHandler(), s2s.EspeakTTSHandler("en-us", "cmn", 175), None)
    try:
        assert len(pipeline.asr.threads) == 3
    finally:
        pipeline.turn_pool.shutdown()


def test_a_free_worker_takes_the_next_session_while_another_is_busy():
    handler = Doubler()
    stage, out = run_stage(handler, workers=2)
    stage.put(s2s.UserText(FakeSession(slot=0), 1, "slow"))
    assert handler.started.wait(5)
    stage.put(s2s.UserText(FakeSession(slot=2), 1, "ab"))  # slot 2: pinned to slot 0's worker, it would wait
    try:
        assert out.get(timeout=5) == "abab"
    finally:
        handler.release.set()
        stage.stop()


class Recorder(s2s.BaseHandler):
    """Records the order of each session's messages and whether two of them ever ran at once."""

    def __init__(self):
        self.order, self.running, self.overlaps = {}, set(), 0
        self.lock = threading.Lock()

    def process(self, msg):
        with self.lock:
            self.overlaps += msg.session in self.running
            self.running.add(msg.session)
            self.order.setdefault(msg.session, []).append(int(msg.text))
        time.sleep(0.001)  # the model's work: long enough for another worker to try the same session
        with self.lock:
            self.running.discard(msg.session)
        yield msg.text


def test_each_sessions_messages_run_in_order_and_one_at_a_time_on_many_workers():
    handler = Recorder()
    stage, out = run_stage(handler, workers=4)
    sessions = [FakeSession(slot=i) for i in range(3)]
    for i in range(60):
        stage.put(s2s.UserText(sessions[i % 3], 1, str(i)))
    for _ in range(60):
        out.get(timeout=5)
    stage.stop()
    assert handler.overlaps == 0
    assert [handler.order[s] for s in sessions] == [list(range(k, 60, 3)) for k in range(3)]


def test_a_turn_takes_only_the_moves_written_down():
    S = s2s.TurnState
    t = s2s.Turn(1, spoken=True)
    assert t.state is S.HEARING and not t.over
    assert not t.move(S.SPEAKING) and t.state is S.HEARING  # nothing goes out before the user's turn ends
    assert t.move(S.ANSWERING) and t.move(S.SPEAKING) and t.move(S.SENT) and t.over
    assert not t.move(S.SPEAKING) and not t.move(S.FAILED)  # an answer all sent neither speaks again nor fails
    assert t.move(S.INTERRUPTED) and t.over  # cut off while it still played
    assert not any(t.move(state) for state in S)  # and that is the end
    failed = s2s.Turn(2, spoken=False, state=S.SPEAKING)
    assert failed.move(S.FAILED) and not failed.move(S.SPEAKING) and not failed.over  # what it made still goes out
    assert failed.move(S.SENT) and failed.over
