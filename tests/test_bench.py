"""The benchmark's smoke run: every part runs end to end, so the benchmark cannot rot. No absolute times are
asserted; what is asserted holds on any machine."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_quick_benchmark_runs_every_part(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(out.read_text())
    ours, theirs = r["latency"]["ours"], r["latency"]["cleans2s"]
    assert ours["turns"] == theirs["turns"] == 2
    for lat in (ours, theirs):
        for t in lat["results"]:
            # The client's clock and the server's agree: the first audio comes after the end-of-turn wait and
            # the models, and the breakdown adds up to the whole.
            assert t["voice_to_voice_ms"] > t["metrics"]["eot_wait_ms"] + sum(lat["model_ms"].values())
            assert abs(t["edge_ms"] + t["server_ms"] - t["overhead_ms"]) < 0.5
            assert not t["metrics"]["interrupted"]
    # CleanS2S's defaults, reproduced by flags: a longer end-of-turn wait and a later first chunk.
    assert theirs["parts"]["eot_wait_ms"]["p50"] >= ours["parts"]["eot_wait_ms"]["p50"] + 500
    assert theirs["model_ms"]["llm_first_chunk_ms"] > ours["model_ms"]["llm_first_chunk_ms"]
    for name in ("ours", "cleans2s"):
        assert r["barge_in"][name]["cuts"] == 2 and r["barge_in"][name]["old_frames_after_interrupt"] == 0
    # Interruption at the end of the new utterance comes after that utterance, ours at its start.
    assert r["barge_in"]["cleans2s"]["barge_in_ms"]["p50"] > r["barge_in"]["ours"]["barge_in_ms"]["p50"] + 1000
    assert [c["sessions"] for c in r["capacity"]][:1] == [1] and r["capacity"][0]["turns"] >= 1
    assert {v["vad"].split(" (")[0] for v in r["vad"]} == {"silero ONNX", "silero JIT", "webrtcvad"}
    assert "| **voice-to-voice**" in run.stdout and "Capacity" in run.stdout
