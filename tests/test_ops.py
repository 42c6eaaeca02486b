"""What operators use: Prometheus /metrics and /healthz (on the receiver port, and on --ops_port from before the models
load), and --log_format json. The real server in a subprocess, scraped over HTTP after real conversations."""
from __future__ import annotations

import asyncio
import gc
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import websockets
from websockets.asyncio.client import connect

import s2s_server_pipeline as s2s
from client import ExtendedClient
from conftest import fixture, short_voice, start_server
from server_process import ROOT, ServerProcess, free_port

TOKEN = "ops-token-0123456789"


def get(url: str, headers: dict | None = None) -> tuple:
    """(status, body) of a GET."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(metrics: str, name: str, **labels) -> float:
    """The value of one sample of the Prometheus text, 0 when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


async def conversation(srv, **kwargs) -> ExtendedClient:
    """A typed turn, then a spoken one that cuts into its answer: every per-turn figure gets a value."""
    async with ExtendedClient(srv.recv_url, srv.send_url, **kwargs) as c:
        await c.send_text("hello there")
        await c.wait_for(lambda r: r.kind == "answer" and r.data["end"] and r.data["turn"] == 1)
        await c.stream_wav(fixture("en_question.wav"))
        await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == 2, timeout=30)
        await c.recv.send(json.dumps({"type": "user_input", "uid": c.uid, "text": "x" * 3000}))  # too long: an error
        await c.wait_for(lambda r: r.kind == "error" and r.data["code"] == "text_too_long")
    return c


async def backchannel(srv, **kwargs) -> None:
    """A typed question; "mm" over its answer (the test ASR hears a short utterance as "Mm."): it pauses, goes on."""
    async with ExtendedClient(srv.recv_url, srv.send_url, **kwargs) as c:
        await c.send_text("say something")
        await c.wait_for(lambda r: r.kind == "audio")
        await c.stream(short_voice())
        await c.wait_for(lambda r: r.kind == "resume")
        await c.wait_for(lambda r: r.kind == "metrics" and r.data["metrics"]["resumed"] == 1)


async def refused(srv) -> None:
    """A connection without the token: refused (4401)."""
    async with connect(f"{srv.recv_url}/?uid=nobody") as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()


def test_metrics_count_sessions_turns_errors_and_every_turn_figure(chat_api):
    srv = start_server(chat_api, "--auth_token", TOKEN, "--asr_short_s", "1.2", "--asr_short_words", "Mm.")
    try:
        base = f"http://127.0.0.1:{srv.recv_port}"
        unauthorized, _ = get(f"{base}/metrics")
        wrong, _ = get(f"{base}/metrics", {"Authorization": "Bearer wrong-token-0000"})
        asyncio.run(conversation(srv, subprotocols=["s2s", f"s2s.token.{TOKEN}"]))
        asyncio.run(backchannel(srv, subprotocols=["s2s", f"s2s.token.{TOKEN}"]))
        asyncio.run(refused(srv))
        status, metrics = get(f"{base}/metrics", {"Authorization": f"Bearer {TOKEN}"})
        by_query, _ = get(f"{base}/metrics?token={TOKEN}")
        health, body = get(f"{base}/healthz")
    finally:
        srv.stop()
    assert (unauthorized, wrong, status, by_query) == (401, 401, 200, 200)
    assert (health, body) == (200, "ok\n")
    assert sample(metrics, "s2s_turns_total", interrupted="false") >= 1
    for figure in ("asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_ms", "voice_to_voice_ms", "eot_wait_ms"):
        assert sample(metrics, "s2s_turn_ms_count", figure=figure) >= 1, figure
    assert sample(metrics, "s2s_turn_ms_sum", figure="voice_to_voice_ms") > sample(metrics, "s2s_turn_ms_sum", figure="first_audio_ms")
    assert sample(metrics, "s2s_errors_total", code="text_too_long") == 1
    assert sample(metrics, "s2s_connections_refused_total", code="4401") == 1
    assert sample(metrics, "s2s_answers_resumed_total") == 1
    assert sample(metrics, "s2s_sessions") == 2  # the two conversations' sessions wait --resume_s for their clients
    assert sample(metrics, "s2s_event_loop_lag_ms_count") >= 20  # the conversations took more than a second


def test_healthz_on_its_own_port_says_503_until_the_models_are_ready(chat_api):
    port = free_port()
    statuses: list = []
    stop = threading.Event()

    def probe():  # as a Kubernetes readiness probe would, from before the server is started
        while not stop.is_set():
            try:
                statuses.append(get(f"http://127.0.0.1:{port}/healthz")[0])
            except OSError:
                statuses.append("no answer")
            time.sleep(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    srv = start_server(chat_api, "--ops_port", str(port), "--asr_load_s", "2")
    try:
        time.sleep(0.5)
        metrics_status, metrics = get(f"http://127.0.0.1:{port}/metrics")
    finally:
        srv.stop()
        stop.set()
        prober.join(5)
    answered = [s for s in statuses if s != "no answer"]
    assert answered.count(503) >= 5, statuses  # the models took 2 s to load: 503 all that while
    assert 200 in answered and answered.index(200) > answered.index(503)
    assert metrics_status == 200 and "s2s_sessions 0.0" in metrics


def test_json_logs_are_one_object_a_line_with_the_turn_figures_as_fields(chat_api):
    srv = start_server(chat_api, "--log_format", "json")
    try:
        asyncio.run(conversation(srv))
    finally:
        srv.stop()
    lines = [line for line in srv.lines if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, not only ours
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    turns = [e for e in entries if e["message"].startswith("turn session=")]
    # Turn 1, maybe reported again (interrupted, with its barge-in) if turn 2's speech cut into its audio, then turn 2.
    assert [(t["turn"], t["interrupted"]) for t in turns] in ([(1, False), (2, False)], [(1, False), (1, True), (2, False)])
    assert all(t["barge_in_ms"] > 0 for t in turns if t["interrupted"])
    assert turns[-1]["asr_ms"] >= 50 and turns[-1]["first_audio_ms"] > 0 and turns[-1]["eot_wait_ms"] > 0
    assert any(e["message"].startswith("ready: receiver") for e in entries)


def test_ops_port_is_only_what_it_is():
    """A path other than /metrics and /healthz on the ops port is 404 (nothing else is served there)."""
    port = free_port()
    srv = ServerProcess("--asr", "fixed", "--llm", "echo", "--ops_port", str(port))
    try:
        assert get(f"http://127.0.0.1:{port}/")[0] == 404
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        srv.stop()


def test_a_taken_port_is_said_in_one_line_before_the_models_load():
    """A second server started on a running one's port stops at once with the reason, not after loading every model
    (minutes for some) and not with a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, f"{ROOT}/tests/serve_test_models.py", "--asr", "fixed", "--llm", "echo",
                               "--recv_host", "127.0.0.1", "--recv_port", str(free_port()),
                               "--send_host", "127.0.0.1", "--send_port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"--send_port {port}: cannot listen on 127.0.0.1: Address already in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "load" not in done.stderr + done.stdout  # before any model loads


def test_the_loop_watch_sees_a_blocked_event_loop_and_a_full_garbage_collection():
    """What /metrics says of a server's event loop: a callback that holds the loop for 300 ms makes a timer that
    many ms late; a full collection is counted with its pause; leaving, the watch leaves the collector as it was."""
    metrics = s2s.ServerMetrics()
    watch = s2s.LoopWatch(metrics)

    async def blocked_then_collected() -> None:
        async with watch.watching():
            await asyncio.sleep(2 * watch.PROBE_S)
            time.sleep(0.3)  # a callback that holds the loop
            gc.collect()
            await asyncio.sleep(2 * watch.PROBE_S)  # the probe notes both

    asyncio.run(blocked_then_collected())
    text = metrics.exposition().decode()
    probes = sample(text, "s2s_event_loop_lag_ms_count")
    assert probes >= 3
    assert sample(text, "s2s_event_loop_lag_ms_bucket", le="250.0") == probes - 1  # the one timer due in the block
    assert sample(text, "s2s_event_loop_lag_ms_sum") >= 250
    assert sample(text, "s2s_gc_pause_ms_count", generation="2") >= 1
    assert watch.on_gc not in gc.callbacks
