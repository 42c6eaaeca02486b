"""Stage plumbing: stale work is dropped, a failing model call fails only its own turn."""
import queue
import threading

import s2s_server_pipeline as s2s


class FakeSession:
    """Just what a Stage touches: uid, slot, wants(), fail_turn()."""

    def __init__(self):
        self.uid, self.slot, self.turn = "u", 0, 1
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


def run_stage(handler):
    out = queue.Queue()
    stage = s2s.Stage("test", handler, 1, out.put)
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
    server = s2s.VoiceAgentServer(args, s2s.ASRHandler(), s2s.EchoLLMHandler(), s2s.EspeakTTSHandler("en-us", "cmn", 175), None)
    try:
        assert len(server.asr_stage.queues) == 3
    finally:
        server.vad_pool.shutdown()
