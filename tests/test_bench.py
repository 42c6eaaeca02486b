"""The benchmark's smoke run: every part runs end to end, so the benchmark cannot rot. No absolute times are
asserted; what is asserted holds on any machine."""
from conftest import run_bench


def test_quick_benchmark_runs_every_part(tmp_path):
    stdout, r = run_bench("run.py", tmp_path / "bench.json", "--quick")
    ours, theirs = r["latency"]["ours"], r["latency"]["cleans2s"]
    assert ours["turns"] == theirs["turns"] == 2
    for lat in (ours, theirs):
        for t in lat["results"]:
            # The client's clock and the server's agree: the first audio comes after the end-of-turn wait and
            # what was left of the models' time (ours start answering at a pause), and the breakdown adds up.
            m = t["metrics"]
            assert t["voice_to_voice_ms"] > m["eot_wait_ms"] + max(0, sum(lat["model_ms"].values()) - (m["speculated_ms"] or 0))
            assert abs(t["edge_ms"] + t["server_ms"] - t["overhead_ms"]) < 0.5
            assert not t["metrics"]["interrupted"]
    assert all(t["metrics"]["speculated"] for t in ours["results"])  # the default
    assert not any(t["metrics"]["speculated"] for t in theirs["results"])  # a turn that starts at the speech's end
    # CleanS2S's defaults, reproduced by flags: a longer end-of-turn wait and a later first chunk.
    assert theirs["parts"]["eot_wait_ms"]["p50"] >= ours["parts"]["eot_wait_ms"]["p50"] + 500
    assert theirs["model_ms"]["llm_first_chunk_ms"] > ours["model_ms"]["llm_first_chunk_ms"]
    for name in ("ours", "cleans2s"):
        assert r["barge_in"][name]["cuts"] == 2 and r["barge_in"][name]["old_frames_after_interrupt"] == 0
    # Interruption at the end of the new utterance comes after that utterance, ours at its start.
    assert r["barge_in"]["cleans2s"]["barge_in_ms"]["p50"] > r["barge_in"]["ours"]["barge_in_ms"]["p50"] + 1000
    rt = r["realtime"]  # the same turns through /v1/realtime: each answered after the end-of-turn wait, each cut
    assert rt["turns"] == 2 and rt["voice_to_voice_ms"]["p50"] > ours["parts"]["eot_wait_ms"]["p50"]
    assert rt["cuts"] == 2 and rt["barge_in_ms"]["p50"] > 0  # (the cut answer ended "cancelled": the bench asserts it)
    assert "OpenAI Realtime endpoint" in stdout
    assert [c["sessions"] for c in r["capacity"]][:1] == [1] and r["capacity"][0]["turns"] >= 1
    for c in r["capacity"]:  # CPU per session-second, from the same run's server CPU
        assert c["server_cpu_ms_per_session_s"] == round(c["server_cpu_pct"] * 10 / c["sessions"], 2) > 0
        # the server's own /metrics over the step: its loop checked 20 times a second, a share of them late
        assert 0 <= c["server_loop_late_pct"] <= 100 and c["server_full_gcs"] >= 0
    assert {v["vad"].split(" (")[0] for v in r["vad"]} == {"silero ONNX", "silero JIT", "webrtcvad"}
    assert "| **voice-to-voice**" in stdout and "Capacity" in stdout


def test_real_models_benchmark_runs_tiny(tmp_path):
    """bench/real_models.py --tiny: the real model code paths (FunASR, transformers, espeak-ng) alone and through the
    server, on the tiny test models."""
    stdout, r = run_bench("real_models.py", tmp_path / "real_models.json", "--tiny", "--turns", "2", "--device", "cpu")
    assert r["machine"]["label"] == "CPU" and r["device"] == "cpu" and r["tiny"]
    assert [m["info"]["stage"] for m in r["models"]] == ["ASR", "LLM", "TTS"]
    asr, llm, tts = r["models"]
    for m in (asr, llm):
        assert m["info"]["weights"] == "random (tiny test model)" and m["info"]["params"] > 0
        assert m["info"]["device"] == "cpu" and m["info"]["dtype"]
    assert tts["info"]["architecture"] == "espeak-ng" and tts["info"]["params"] is None
    assert [u["utterance"] for u in asr["runs"]] == ["en_question.wav", "zh_question.wav"]
    assert all(u["rtf"] > 0 and u["latency_ms"] > 0 and u["text"] for u in asr["runs"])
    answer = llm["runs"][0]
    assert 0 < answer["tokens"] <= r["answer_tokens"] and answer["tokens_per_s"] > 0 and answer["rtf"] > 0
    assert 0 < answer["first_token_ms"] <= answer["first_chunk_ms"] and answer["answer"].strip()
    assert tts["runs"][0]["rtf"] > 0 and tts["runs"][0]["audio_s"] > 1 and tts["runs"][0]["first_audio_ms"] > 0
    v = r["voice_to_voice"]
    assert v["turns"] == 2 and set(v["parts"]) == {"eot_wait_ms", "asr_ms", "llm_first_token_ms", "llm_first_chunk_ms",
                                                   "tts_first_audio_ms", "send_ms"}
    for t in v["results"]:
        m = t["metrics"]
        assert t["voice_to_voice_ms"] > m["eot_wait_ms"] and not m["interrupted"] and t["audio_s"] > 0
        # The overhead is what the stages do not explain: the socket and the edge (VAD decision, mic frame, network).
        assert abs(t["overhead_ms"] - (m["send_ms"] + t["edge_ms"])) < 1
    assert "## Real models, CPU" in stdout and "| **voice-to-voice**" in stdout


def test_hostile_benchmark_runs_every_row(tmp_path):
    """bench/hostile.py --quick: every attack beside a victim, and what the server does to each."""
    stdout, r = run_bench("hostile.py", tmp_path / "hostile.json", "--quick", timeout=300)
    rows = r["rows"]
    assert list(rows) == ["key", "stuck", "deflate", "one_address", "handshakes", "token", "audio"]
    for row in rows.values():
        assert not row["traceback_in_log"]
        assert row["beside_p50_s"] < row["alone_p50_s"] + 1.0  # the victim is answered as it was alone
    assert rows["key"]["codes"] == {"4404": 20} and rows["key"]["bytes_heard"] == 0
    assert rows["stuck"]["closed_logged_s"] is not None
    assert rows["deflate"]["codes"] == {"1002": 3} and rows["deflate"]["extensions_answered"] == ["None"]
    admitted = rows["one_address"]["max_connections_per_client"]  # the server's default, 8 when this was written
    assert rows["one_address"]["codes"] == {"4408": admitted, "1013": 20 - admitted}
    held = rows["handshakes"]["held"]
    assert held["127.0.0.2"] == 16 and sum(held.values()) <= rows["handshakes"]["max_pending_connections"]
    assert rows["handshakes"]["beside"]["get_page_status"] == "HTTP/1.1 200"
    assert rows["token"]["codes"] == {"4401": 60} and rows["token"]["refusal_log_lines"] <= 2
    assert rows["audio"]["audio_too_fast_errors"] >= 1 and rows["audio"]["audio_sent_s_per_s"] > 1
    assert "| attack | what the server does |" in stdout


def test_local_llm_benchmark_runs(tmp_path):
    """bench/local_llm.py on the tiny test model: a whole conversation through the server's handler, every figure."""
    from tiny_chat_model import build_tiny_chat_model
    model = build_tiny_chat_model(str(tmp_path / "llm"))
    stdout, r = run_bench("local_llm.py", tmp_path / "local_llm.json", "--models", model, "--dtypes", "float32",
                          "--answer_tokens", "8", timeout=300)
    (row,) = r["models"]
    assert row["weights"] == "real" and row["dtype"] == "float32" and row["params"] > 0
    assert row["prompt_tokens"] > 100  # the fifth turn's prompt holds the four before it
    assert 0 < row["first_token_ms"] and 0 < row["first_token_uncached_ms"] and row["tokens_per_s"] > 0 and row["rtf"] > 0
    assert "| model | dtype |" in stdout
