"""The turn-taking benchmark's smoke run (bench/turn_taking.py --quick): it runs end to end with the real turn
model, and what it reports adds up. No absolute times are asserted."""
from conftest import run_bench


def test_quick_turn_taking_benchmark_runs(tmp_path):
    stdout, r = run_bench("turn_taking.py", tmp_path / "turn_taking.json", "--quick")
    assert list(r["policies"]) == ["smart_turn_speculate"] and r["fixtures"] == 4
    p = r["policies"]["smart_turn_speculate"]
    assert (p["complete_questions"], p["paused"], p["backchannels_and_noises"], p["interruptions"]) == (1, 1, 1, 1)
    [q] = p["results"]["questions"]
    assert q["turns"] >= 1 and q["voice_to_voice_ms"] > 200  # the answer comes after at least the short pause
    assert p["interruptions_stopped"] == 1 and p["stop_ms"]["p50"] > 200  # a real cut-in stops it, after 200 ms of speech
    [backchannel] = p["results"]["during_answer"]  # "uh-huh" (the fixed ASR hears each fixture's words)
    assert backchannel["paused"] and not backchannel["interrupted"] and p["answer_went_on"] == 1
    assert backchannel["paused_ms"] > 200 and p["paused_ms"]["p50"] == backchannel["paused_ms"]  # its voice at least
    assert p["llm_requests_per_question"] >= 1 + p["discarded_llm_requests_per_question"] - 0.01
    # Cut off at its pause or not, the question with a pause was answered whole (the ASR hears each half's words).
    assert p["paused_answered_whole"] == 1 and p["results"]["paused"][0]["whole"]
    # The answer starts at a 100 ms pause, before the model is first asked (200 ms): every answer was speculated.
    assert q["speculated"] is True and p["answers_speculated"] == 2
    assert "| smart_turn_speculate |" in stdout
