"""Voice-agent benchmark: what a user feels, beside the physical limit.

    bash scripts/bench.sh              # the full run: about 10 minutes on 2 CPU cores
    bash scripts/bench.sh --quick      # a smoke run of every part (the test suite runs it)

The real server (tests/serve_test_models.py) runs in a subprocess with models of fixed, known latency: an ASR
that takes ASR_MS, an OpenAI-compatible chat API (a local fake) whose first token comes after LLM_FIRST_TOKEN_MS
and each next word LLM_WORD_MS later, and a TTS whose first audio comes after TTS_MS. Clients are real
WebSocket clients whose microphones send speech WAVs in real time, one frame every FRAME_MS, silence between.
So everything the model latencies do not explain is the server's own cost: the overhead, whose physical
limit is about zero.

Parts: latency (voice-to-voice and its breakdown), barge-in, the same two with CleanS2S's defaults reproduced
by flags, the same two through the OpenAI Realtime endpoint with the official SDK's client (realtime), capacity
(concurrent sessions), and the VAD alone per stream. Prints markdown tables and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import platform
import random
import shlex
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import s2s_server_pipeline as s2s  # noqa: E402
from client import ExtendedClient, load_wav, voiced_span  # noqa: E402
from fakes import FakeChatAPI  # noqa: E402
from server_process import ServerProcess  # noqa: E402

SR = s2s.SAMPLE_RATE
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# The models' fixed latencies, in ms: about what a GPU box with an API LLM gives.
ASR_MS = 50
LLM_FIRST_TOKEN_MS = 200
LLM_WORD_MS = 20  # ~50 words/s, a fast API
TTS_MS = 100
TTS_RTF = 0.1

SHORT_ANSWER = "Of course, I can help with that. Here is a short answer for you."  # ~4 s of speech
LONG_ANSWER = " ".join([SHORT_ANSWER] + ["This sentence keeps the answer going for a while longer."] * 4)

PARTS_RUN = ("latency", "barge_in", "realtime", "capacity", "vad")
OURS: list = []
CLEANS2S = ["--min_silence_ms", "1200", "--interrupt_at", "speech_end", "--first_chunk", "sentence",
            "--playback_lead_ms", "0"]
MODEL_FLAGS = ["--asr", "fixed", "--asr_latency_ms", str(ASR_MS), "--tts", "fixed", "--tts_latency_ms", str(TTS_MS),
               "--tts_rtf", str(TTS_RTF), "--llm", "openai", "--lm_model_name", "bench"]


def first_chunk_words(answer: str, first_min_chars) -> int:
    """Words the LLM must write before the first speakable chunk exists (the fake API sends a word a token)."""
    chunker = s2s.SpeakableChunker(first_min_chars)
    words = answer.split(" ")
    for i, word in enumerate(words):
        if chunker.push(word + " "):
            return i + 1
    return len(words)


def model_ms(first_min_chars) -> dict:
    """What the models alone cost before the first audio, stage by stage."""
    return {"asr_ms": ASR_MS, "llm_first_token_ms": LLM_FIRST_TOKEN_MS,
            "llm_first_chunk_ms": (first_chunk_words(SHORT_ANSWER, first_min_chars) - 1) * LLM_WORD_MS,
            "tts_first_audio_ms": TTS_MS, "send_ms": 0}


def models_left_ms(metrics: dict, model_ms: float) -> float:
    """Of the models' time, what was left when the user's turn ended: an answer started at a pause before it
    (--speculate) had run `speculated_ms` of it by then."""
    return max(0.0, model_ms - (metrics.get("speculated_ms") or 0.0))


def pct(values: list, q: float):
    return round(float(np.percentile(values, q)), 1) if values else None


def spread(values: list) -> dict:
    return {"p50": pct(values, 50), "p95": pct(values, 95)}


# The server's breakdown of each turn (its `metrics` event), in the order the stages run, with their names in tables.
PARTS = {"eot_wait_ms": "end-of-turn wait (VAD silence)", "asr_ms": "ASR", "llm_first_token_ms": "LLM first token",
         "llm_first_chunk_ms": "first speakable chunk", "tts_first_audio_ms": "TTS first audio", "send_ms": "to the socket"}


# ------------------------------------------------------------------------------------------------
# A client with a real-time microphone
# ------------------------------------------------------------------------------------------------

class Microphone:
    """Sends audio as a microphone would: one frame every frame_ms on a fixed schedule, silence when the
    user is quiet. Times of what the user says are on this schedule (time.monotonic())."""

    def __init__(self, send, frame_ms: int, rate: int = SR):
        self.send, self.rate, self.frame = send, rate, rate * frame_ms // 1000
        self.queue = np.zeros(0, np.float32)  # speech not yet sent
        self.t0 = time.monotonic()
        self.sent = 0  # samples
        self.max_lag_ms = 0.0  # how late the client ever was: a loaded client shows here, not as server cost

    def say(self, audio: np.ndarray) -> tuple:
        """Queue speech; return when its voice starts and ends."""
        start = self.sent + len(self.queue)
        self.queue = np.concatenate([self.queue, audio])
        first, last = voiced_span(audio)
        return self.t0 + (start + first) / self.rate, self.t0 + (start + last) / self.rate

    async def run(self) -> None:
        while True:
            due = self.t0 + (self.sent + self.frame) / self.rate  # a frame exists only once its last sample is recorded
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            self.max_lag_ms = max(self.max_lag_ms, (time.monotonic() - due) * 1000)
            frame, self.queue = self.queue[:self.frame], self.queue[self.frame:]
            if len(frame) < self.frame:
                frame = np.concatenate([frame, np.zeros(self.frame - len(frame), np.float32)])
            await self.send(frame)
            self.sent += self.frame


@dataclass
class TurnResult:
    voice_to_voice_ms: float  # end of the user's voice -> first answer audio received
    # voice_to_voice - end-of-turn wait - model time left after the turn's end (all of it, unless the answer was
    # started at a pause: --speculate), the sum of the next two
    overhead_ms: float
    edge_ms: float  # the VAD's decision trailing the voice, the microphone frame, the network both ways
    server_ms: float  # the server's own time between stages: first_audio_ms - model time left
    metrics: dict  # the server's own breakdown
    audio_s: float
    underrun_ms: float  # playback gaps: audio that arrived after it should have played


class BenchClient(ExtendedClient):
    def __init__(self, *args, frame_ms: int = 20, **kwargs):
        super().__init__(*args, **kwargs)
        self.frame_ms = frame_ms

    async def __aenter__(self) -> BenchClient:
        await super().__aenter__()
        self.mic = Microphone(self.send_audio, self.frame_ms)
        self.readers.append(asyncio.create_task(self.mic.run()))
        return self

    def audio(self, turn: int) -> list:
        return self.events("audio", turn)

    def playback_end(self, turn: int) -> float:
        frames = self.audio(turn)
        return frames[0].t + sum(len(r.pcm) for r in frames) / 2 / SR if frames else time.monotonic()

    def underrun_ms(self, turn: int) -> float:
        """Play the turn's audio from its first frame on; sum how late the frames that came too late were."""
        frames, late, clock = self.audio(turn), 0.0, None
        for r in frames:
            clock = r.t if clock is None else clock
            late += max(0.0, r.t - clock)
            clock = max(clock, r.t) + len(r.pcm) / 2 / SR
        return late * 1000

    async def turn(self, speech: np.ndarray, model: dict, timeout: float = 30) -> TurnResult:
        """Say something, wait for the whole answer, listen to it to the end."""
        onset, end = self.mic.say(speech)
        start = await self.wait_for(lambda r: r.kind == "speech_start" and r.t >= onset, timeout)
        turn = start.data["turn"]
        done = await self.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == turn, timeout)
        m = done.data["metrics"]
        first = self.audio(turn)[0].t
        v2v, model_left = (first - end) * 1000, models_left_ms(m, sum(model.values()))
        result = TurnResult(round(v2v, 1), round(v2v - m["eot_wait_ms"] - model_left, 1),
                            round(v2v - m["eot_wait_ms"] - m["first_audio_ms"], 1), round(m["first_audio_ms"] - model_left, 1),
                            m, round(sum(len(r.pcm) for r in self.audio(turn)) / 2 / SR, 2), round(self.underrun_ms(turn), 1))
        await asyncio.sleep(max(0.0, self.playback_end(turn) - time.monotonic()) + 0.3)  # the user listens
        return result


async def realtime_turns(srv: ServerProcess, utterances: list, cut_after_s: float = None) -> list:
    """Say each utterance (16 kHz) into one Realtime session, its microphone at 24 kHz, and wait for its answer. Without
    `cut_after_s`: listen to each answer; the voice-to-voice of each, ms. With it: each utterance cuts into the answer
    to the one before, `cut_after_s` into its audio; the barge-in of each, ms."""
    import soxr
    from openai import AsyncOpenAI
    client = AsyncOpenAI(api_key="bench", websocket_base_url=f"ws://127.0.0.1:{srv.recv_port}/v1")
    figures = []
    utterances = [soxr.resample(u, SR, s2s.REALTIME_RATE) for u in utterances]  # recorded at 24 kHz, as a client's mic
    async with client.realtime.connect(model="bench") as conn:
        async def send(frame: np.ndarray) -> None:
            await conn.input_audio_buffer.append(audio=base64.b64encode(s2s.to_pcm16(frame)).decode())

        async def next_event(kind: str, after: float = 0.0, response: str = None):
            async for event in events:
                if event.type == kind and time.monotonic() >= after and (response is None or event.response.id == response):
                    return event

        mic = Microphone(send, 20, s2s.REALTIME_RATE)
        task = asyncio.create_task(mic.run())
        events = aiter(conn)
        onset, end = mic.say(utterances[0])
        for i in range(len(utterances)):
            await next_event("input_audio_buffer.speech_started", after=onset)
            answer = (await next_event("response.created")).response.id
            await next_event("response.output_audio.delta")
            first = time.monotonic()
            if cut_after_s is None:
                figures.append(round((first - end) * 1000, 1))
                await next_event("response.done", response=answer)
                await asyncio.sleep(len(SHORT_ANSWER) * 0.065 + 0.3)  # the user listens to it
            elif i + 1 < len(utterances):
                await asyncio.sleep(max(0.0, first + cut_after_s - time.monotonic()))  # a while of the answer plays
                cut_by, _ = mic.say(utterances[i + 1])
                done = await next_event("response.done", response=answer)
                assert done.response.status == "cancelled", done.response.status
                figures.append(round((time.monotonic() - cut_by) * 1000, 1))
                onset = cut_by
            if cut_after_s is None and i + 1 < len(utterances):
                onset, end = mic.say(utterances[i + 1])
        task.cancel()
    return figures


# ------------------------------------------------------------------------------------------------
# The parts
# ------------------------------------------------------------------------------------------------

def frames_while_stopped(c: BenchClient, turn: int) -> list:
    """The turn's audio frames received while it should have been silent: after its `interrupt`, or between a `pause`
    and the `resume` or `interrupt` that ends it (a pause that resumed, when the server took a gap in the client's
    audio for a microphone gone quiet, lets the answer play on until the interrupt)."""
    marks = sorted((r.t, r.kind) for r in c.received if r.kind in ("pause", "resume", "interrupt") and r.data["turn"] == turn)
    quiet, since = [], None
    for t, kind in marks:
        if kind == "pause" and since is None:
            since = t
        elif kind == "resume" and since is not None:
            quiet.append((since, t))
            since = None
        elif kind == "interrupt":
            quiet.append((t if since is None else since, float("inf")))
            break
    return [r for r in c.audio(turn) if any(a < r.t < b for a, b in quiet)]


class Bench:
    def __init__(self, args: argparse.Namespace, api: FakeChatAPI):
        self.args, self.api = args, api
        self.question = load_wav(os.path.join(FIXTURES, "en_question.wav"))
        self.interruption = load_wav(os.path.join(FIXTURES, "en_interrupt.wav"))

    def server(self, *flags: str) -> ServerProcess:
        return ServerProcess(*MODEL_FLAGS, "--lm_model_url", self.api.url, *flags, env={"LLM_API_KEY": "bench"})

    def latency(self, flags: list, turns: int) -> dict:
        """One session, turn after turn: voice-to-voice and its parts."""
        model = model_ms(None if "sentence" in flags else 6)
        self.api.answer = lambda messages: SHORT_ANSWER
        srv = self.server(*flags)
        try:
            async def talk():
                async with BenchClient(srv.recv_url, srv.send_url) as c:
                    return [await c.turn(self.question, model) for _ in range(turns)]
            results = asyncio.run(talk())
        finally:
            srv.stop()
        parts = {k: {**spread([r.metrics[k] for r in results]), "model": model.get(k)} for k in PARTS}
        return {"turns": len(results), "model_ms": model, "parts": parts,
                "voice_to_voice_ms": spread([r.voice_to_voice_ms for r in results]),
                **{f"{k}_ms": spread([getattr(r, f"{k}_ms") for r in results]) for k in ("overhead", "edge", "server")},
                "underrun_ms": max(r.underrun_ms for r in results), "results": [asdict(r) for r in results]}

    def barge_in(self, flags: list, cuts: int) -> dict:
        """Every utterance cuts into the answer before it, one second into its audio."""
        self.api.answer = lambda messages: LONG_ANSWER
        srv = self.server(*flags)
        try:
            async def talk():
                rows = []
                async with BenchClient(srv.recv_url, srv.send_url) as c:
                    onset, _ = c.mic.say(self.question)
                    for i in range(cuts):
                        turn = (await c.wait_for(lambda r: r.kind == "speech_start" and r.t >= onset)).data["turn"]
                        first = await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == turn)
                        await asyncio.sleep(max(0.0, first.t + 1.0 - time.monotonic()))  # a second of the answer plays
                        onset, _ = c.mic.say(self.interruption if i % 2 == 0 else self.question)
                        # The answer stops at the pause (the server heard a voice), or at once at the interrupt
                        # (--backchannels ""); the interrupt follows the pause once the words are known.
                        cut = await c.wait_for(lambda r: r.kind in ("pause", "interrupt") and r.data["turn"] == turn)
                        await c.wait_for(lambda r: r.kind == "interrupt" and r.data["turn"] == turn)
                        before = [r for r in c.audio(turn) if r.t <= cut.t]
                        sent_s = sum(len(r.pcm) for r in before) / 2 / SR
                        rows.append({"barge_in_ms": round((cut.t - onset) * 1000, 1),
                                     "old_frames_after_interrupt": 0,
                                     "unplayed_audio_s": round(sent_s - (cut.t - first.t), 2),
                                     "turn": turn})
                    await c.wait_for(lambda r: r.kind == "speech_start" and r.t >= onset)
                    await asyncio.sleep(0.5)  # late frames, if any, would arrive now
                    for row in rows:
                        row["old_frames_after_interrupt"] = len(frames_while_stopped(c, row.pop("turn")))
                return rows
            rows = asyncio.run(talk())
        finally:
            srv.stop()
        return {"cuts": len(rows),
                "barge_in_ms": spread([r["barge_in_ms"] for r in rows]),
                "old_frames_after_interrupt": sum(r["old_frames_after_interrupt"] for r in rows),
                "unplayed_audio_s": pct([r["unplayed_audio_s"] for r in rows], 50), "results": rows}

    def realtime(self, turns: int, cuts: int) -> dict:
        """The latency and barge-in parts through /v1/realtime, as an OpenAI Realtime client (the official SDK's) sees
        them: end of the voice -> first response.output_audio.delta; onset of new speech -> the answer's response.done
        (cancelled)."""
        srv = self.server(*OURS)
        try:
            self.api.answer = lambda messages: SHORT_ANSWER
            v2v = asyncio.run(realtime_turns(srv, [self.question] * turns))
            self.api.answer = lambda messages: LONG_ANSWER
            cut = asyncio.run(realtime_turns(srv, [self.question, self.interruption] * (cuts // 2) + [self.question],
                                             cut_after_s=1.0))
        finally:
            srv.stop()
        return {"turns": len(v2v), "voice_to_voice_ms": spread(v2v), "cuts": len(cut), "barge_in_ms": spread(cut)}

    def capacity(self, sizes: list, seconds: float) -> list:
        """N sessions at once, each talking turn after turn with real-time microphones, until one breaks: overhead
        p95 more than 50 ms over one session's p50 (the VAD's decision and the mic frame cost that much under any
        load), audio behind real time, or a turn that never came back."""
        self.api.answer = lambda messages: SHORT_ANSWER
        model = model_ms(6)
        rows, limit = [], None
        for n in sizes:
            # A worker per session, as the LLM stage has: with fewer, a turn can wait for a free worker while all
            # are busy with other sessions' model calls (a TTS answer keeps one ~0.7 s). That wait is model time,
            # not the server's own cost; the fixed models only sleep, so the extra threads cost nothing.
            workers = str(n)
            for attempt in range(1 + self.args.capacity_retries):
                wait_for_quiet_machine(self.args.quiet_wait_s)
                srv = self.server("--max_sessions", str(n + 1), "--asr_workers", workers, "--tts_workers", workers,
                                  *shlex.split(self.args.capacity_flags))
                try:
                    row = asyncio.run(self.capacity_run(srv, n, seconds, model))
                finally:
                    srv.stop()
                step_limit = limit if limit is not None else row["overhead_ms"]["p50"] + 50 if row["turns"] else None
                if row["holds"] and step_limit is not None and row["overhead_ms"]["p95"] > step_limit:
                    row["holds"], row["why"] = False, f"overhead p95 over {step_limit} ms"
                row["attempt"] = attempt + 1
                if row["holds"] or not row["load_note"]:
                    break  # a step that breaks on a busy machine (not the server's doing) is tried again
                print(f"  capacity N={n}: breaks ({row['why']}) while {row['load_note']}: again", flush=True)
            limit = row["overhead_limit_ms"] = step_limit  # set by the first step with turns, then kept
            rows.append(row)
            print(f"  capacity N={n}: overhead p95 {row['overhead_ms']['p95']} ms, server CPU {row['server_cpu_pct']}% "
                  f"({row['server_cpu_ms_per_session_s']} ms per session-second), its loop over 100 ms late at "
                  f"{row['server_loop_late_pct']}% of checks, {row['server_full_gcs']} full GCs, "
                  f"machine CPU {row['machine_cpu_pct']}% of {row['machine_cpu_max_pct']}%, "
                  f"{'holds' if row['holds'] else 'breaks: ' + row['why']}{'; ' + row['load_note'] if row['load_note'] else ''}",
                  flush=True)
            if not row["holds"]:
                break
        return rows

    async def capacity_run(self, srv: ServerProcess, n: int, seconds: float, model: dict) -> dict:
        server_proc, me = psutil.Process(srv.proc.pid), psutil.Process()
        speech = load_wav(self.args.capacity_speech) if self.args.capacity_speech else self.question
        results, failures = [], []
        deadline = time.monotonic() + seconds

        async def session(i: int) -> float:
            async with BenchClient(srv.recv_url, srv.send_url, frame_ms=self.args.capacity_frame_ms) as c:
                await asyncio.sleep(random.uniform(0, 3))  # people do not all start talking at once
                while time.monotonic() < deadline:
                    try:
                        results.append(await c.turn(speech, model, timeout=20))
                    except TimeoutError as exc:
                        failures.append(str(exc)[:200])
                        break
                    await asyncio.sleep(random.uniform(0.2, 1.0))
                return c.mic.max_lag_ms

        loop_lags = []  # how late this process's event loop wakes up: a loaded load generator shows here

        async def loop_probe() -> None:
            while True:
                due = time.monotonic() + 0.01
                await asyncio.sleep(0.01)
                loop_lags.append((time.monotonic() - due) * 1000)

        probe = asyncio.create_task(loop_probe())
        health = await asyncio.to_thread(ServerHealth, srv)
        machine = MachineCPU(server_proc, me)
        lags = await asyncio.gather(*(session(i) for i in range(n)))
        probe.cancel()
        cpu = machine.stop()
        health = await asyncio.to_thread(health.since)
        overhead = [r.overhead_ms for r in results]
        underrun = max([r.underrun_ms for r in results], default=0.0)
        why = ("a turn timed out" if failures else "no turn finished" if not results
               else "audio behind real time" if underrun > 0 else "")
        # The bench process (clients and the fake chat API) and anything else on the machine share its cores with
        # the server: when they are busy the server waits for a core, and that is not the server's own limit.
        notes = []
        if cpu["client_cpu_pct"] > 80 or (pct(loop_lags, 99) or 0) > 20:
            notes.append(f"load generator saturated (bench process {cpu['client_cpu_pct']}% of a core, "
                         f"its loop {pct(loop_lags, 99)} ms late at p99)")
        if cpu["busy_s_frac"] >= 0.2:
            notes.append(f"machine saturated {round(cpu['busy_s_frac'] * 100)}% of the time, other processes using "
                         f"{cpu['other_cpu_pct']}% of a core")
        # Every session hears its client's audio the whole run: a second of the run is a session-second of audio each.
        per_session_s = round(cpu["server_cpu_pct"] * 10 / n, 2)  # % of a core -> ms of CPU a second, shared out
        return {"sessions": n, "turns": len(results), "failures": len(failures),
                "server_cpu_ms_per_session_s": per_session_s,
                "overhead_ms": spread(overhead), "voice_to_voice_ms": spread([r.voice_to_voice_ms for r in results]),
                "server_ms": spread([r.server_ms for r in results]), "edge_ms": spread([r.edge_ms for r in results]),
                "parts": {k: spread([r.metrics[k] for r in results]) for k in PARTS},
                "underrun_ms": underrun, **cpu, **health, "client_max_lag_ms": round(max(lags), 1),
                "client_loop_lag_ms": {"p99": pct(loop_lags, 99), "max": round(max(loop_lags, default=0.0), 1)},
                "holds": not why, "why": why, "load_note": "; ".join(notes)}

    def vad(self, seconds: float) -> list:
        """Each VAD through the server's own segmenter, one stream at a time: CPU per second of audio."""
        audio = np.concatenate([self.question, np.zeros(SR, np.float32)] * int(np.ceil(seconds / 4.7)))[:int(seconds * SR)]
        rows = []
        for name, model in (("silero ONNX (shared model)", s2s.SileroVAD(0.5)), ("silero JIT (model per stream)", SileroJIT()),
                            ("webrtcvad", s2s.WebRTCVAD(3))):
            model.setup()
            seg = s2s.VADSegmenter(model, 200, 600, 200, 30000)
            frame = SR * 20 // 1000
            cpu0 = time.process_time()
            for i in range(0, len(audio), frame):
                seg.feed(audio[i:i + frame])
            cpu = time.process_time() - cpu0
            rows.append({"vad": name, "cpu_ms_per_audio_s": round(cpu / seconds * 1000, 2),
                         "streams_per_core": int(seconds / cpu)})
        return rows


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (neither idle nor waiting for I/O)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_for_quiet_machine(max_wait_s: float, busy_pct: float = 25) -> float:
    """Wait (at most max_wait_s) until other processes use under busy_pct % of one core over 2 s, so that a capacity
    step measures the server, not whatever else shares the cores. Returns what they used at the end."""
    me, deadline = psutil.Process(), time.monotonic() + max_wait_s
    while True:
        t0, mine0 = machine_busy_s(), sum(me.cpu_times()[:2])
        time.sleep(2)
        t1, mine1 = machine_busy_s(), sum(me.cpu_times()[:2])
        others = max(0.0, (t1 - t0 - (mine1 - mine0)) / 2 * 100)
        if others < busy_pct or time.monotonic() >= deadline:
            if others >= busy_pct:
                print(f"  (the machine is busy: other processes use {others:.0f}% of a core; measuring anyway)", flush=True)
            return others


class ServerHealth:
    """The server's own /metrics over a step: the share of its event loop's timers that ran more than a 64 ms
    microphone frame late (s2s_event_loop_lag_ms), and its full garbage collections (s2s_gc_pause_ms, generation 2),
    which hold every thread."""

    LATE_MS = "100.0"  # the histogram's bucket edge just above a microphone frame

    def __init__(self, srv: ServerProcess):
        self.url = f"http://127.0.0.1:{srv.recv_port}/metrics"
        self.start = self.read()

    def read(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(self.url, timeout=10) as reply:
            text = reply.read().decode()
        figures = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "s2s_event_loop_lag_ms_bucket" and sample.labels["le"] == self.LATE_MS:
                    figures["on_time"] = sample.value
                elif sample.name == "s2s_event_loop_lag_ms_count":
                    figures["probes"] = sample.value
                elif sample.name in ("s2s_gc_pause_ms_count", "s2s_gc_pause_ms_sum") and sample.labels["generation"] == "2":
                    figures[sample.name.rsplit("_", 1)[1]] = sample.value
        return figures

    def since(self) -> dict:
        end = {k: v - self.start.get(k, 0.0) for k, v in self.read().items()}
        probes, full = end.get("probes", 0), end.get("count", 0)
        return {"server_loop_late_pct": round(100 * (probes - end.get("on_time", 0)) / probes, 1) if probes else None,
                "server_full_gcs": int(full), "server_full_gc_ms": round(end.get("sum", 0) / full, 1) if full else None}


class MachineCPU:
    """CPU over a capacity step, in % of one core: the server, this process (the clients and the fake chat API),
    the whole machine (/proc/stat) and so everything else; and how often, in 1 s samples, every core was busy."""

    def __init__(self, server: psutil.Process, me: psutil.Process):
        self.server, self.me = server, me
        self.samples: list = []
        self.done = threading.Event()
        self.start = self.snap()
        self.thread = threading.Thread(target=self._sample, name="bench-cpu", daemon=True)
        self.thread.start()

    def snap(self) -> tuple:
        return time.monotonic(), sum(self.server.cpu_times()[:2]), sum(self.me.cpu_times()[:2]), machine_busy_s()

    def _sample(self) -> None:
        last = self.start
        while not self.done.wait(1.0):
            now = self.snap()
            self.samples.append((now[3] - last[3]) / (now[0] - last[0]) / (os.cpu_count() or 1))
            last = now

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        end = self.snap()
        wall = end[0] - self.start[0]
        server, client, machine = ((end[i] - self.start[i]) / wall * 100 for i in (1, 2, 3))
        return {"server_cpu_pct": round(server), "client_cpu_pct": round(client), "machine_cpu_pct": round(machine),
                "machine_cpu_max_pct": 100 * (os.cpu_count() or 1), "other_cpu_pct": round(max(0.0, machine - server - client)),
                "busy_s_frac": round(sum(s >= 0.95 for s in self.samples) / len(self.samples), 2) if self.samples else 0.0}


class SileroJIT:
    """silero-vad's TorchScript model, as most projects load it. It keeps its state inside, so every stream
    needs its own copy: the cost the shared ONNX model avoids."""

    window, threshold = 512, 0.5

    def setup(self) -> None:
        import silero_vad
        import torch
        torch.set_num_threads(1)
        self.torch, self.load = torch, silero_vad.load_silero_vad

    def new_state(self):
        return self.load(onnx=False)

    def speech_probs(self, models: list, streams: list) -> list:
        with self.torch.inference_mode():
            return [[float(m(self.torch.from_numpy(w), SR)) for w in windows] for m, windows in zip(models, streams)]


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def table(rows: list, header: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("–" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(r: dict) -> str:
    out = []
    if "ours" in r["latency"] and "ours" in r["barge_in"]:
        out += latency_report(r)
    if r.get("realtime"):
        out += realtime_report(r)
    if r.get("capacity"):
        out += capacity_report(r)
    if r.get("vad"):
        out += ["VAD alone, one stream, through the server's segmenter:", "",
                table([[v["vad"], v["cpu_ms_per_audio_s"], v["streams_per_core"]] for v in r["vad"]],
                      ["VAD", "CPU ms per s of audio", "real-time streams per core"])]
    return "\n".join(out)


def latency_report(r: dict) -> list:
    ours, theirs = r["latency"]["ours"], r["latency"]["cleans2s"]
    rows = [[name, ours["parts"][k]["model"], ours["parts"][k]["p50"], ours["parts"][k]["p95"],
             theirs["parts"][k]["model"], theirs["parts"][k]["p50"], theirs["parts"][k]["p95"]] for k, name in PARTS.items()]
    rows.append(["**voice-to-voice** (end of speech → first audio received)", "", ours["voice_to_voice_ms"]["p50"],
                 ours["voice_to_voice_ms"]["p95"], "", theirs["voice_to_voice_ms"]["p50"], theirs["voice_to_voice_ms"]["p95"]])
    for key, name in (("overhead_ms", "**overhead** (voice-to-voice − end-of-turn wait − model time left after it)"),
                      ("edge_ms", "of which: VAD decision after the voice ends, mic frame, network"),
                      ("server_ms", "of which: the server between stages")):
        rows.append([name, 0, ours[key]["p50"], ours[key]["p95"], 0, theirs[key]["p50"], theirs[key]["p95"]])
    bo, bt = r["barge_in"]["ours"], r["barge_in"]["cleans2s"]
    rows.append(["**barge-in** (onset of new speech → `pause` or `interrupt` received)", 200, bo["barge_in_ms"]["p50"], bo["barge_in_ms"]["p95"],
                 "", bt["barge_in_ms"]["p50"], bt["barge_in_ms"]["p95"]])
    rows.append(["old-turn audio frames received after `interrupt` or while paused", 0, bo["old_frames_after_interrupt"], "", 0,
                 bt["old_frames_after_interrupt"], ""])
    rows.append(["answer audio already sent but not played at `interrupt` (s)", "", bo["unplayed_audio_s"], "", "",
                 bt["unplayed_audio_s"], ""])
    return ["Latency, ms (model = the fixed latency of the test models; for barge-in, --min_speech_ms):", "",
            table(rows, ["", "model", "ours p50", "ours p95", "model", "CleanS2S defaults p50", "p95"]), ""]


def realtime_report(r: dict) -> list:
    rt, ours = r["realtime"], r["latency"].get("ours")
    rows = [["voice-to-voice (end of speech → first audio received)", rt["voice_to_voice_ms"]["p50"], rt["voice_to_voice_ms"]["p95"],
             ours["voice_to_voice_ms"]["p50"] if ours else None, ours["voice_to_voice_ms"]["p95"] if ours else None]]
    bo = r["barge_in"].get("ours")
    rows.append(["barge-in (onset of new speech → the answer cancelled)", rt["barge_in_ms"]["p50"], rt["barge_in_ms"]["p95"],
                 bo["barge_in_ms"]["p50"] if bo else None, bo["barge_in_ms"]["p95"] if bo else None])
    return ["The same through the OpenAI Realtime endpoint, with the official Python SDK's client, ms:", "",
            table(rows, ["", "Realtime p50", "p95", "extended protocol p50", "p95"]), ""]


def capacity_report(r: dict) -> list:
    cap = [[c["sessions"], c["turns"], c["overhead_ms"]["p50"], c["overhead_ms"]["p95"], c["server_ms"]["p95"],
            c["voice_to_voice_ms"]["p95"], c["underrun_ms"], c["server_cpu_pct"], c["server_cpu_ms_per_session_s"],
            c["client_cpu_pct"],
            f"{c['machine_cpu_pct']} of {c['machine_cpu_max_pct']}", c["server_loop_late_pct"],
            f"{c['server_full_gcs']} × {c['server_full_gc_ms']}" if c["server_full_gcs"] else 0, c["client_loop_lag_ms"]["p99"],
            ("yes" if c["holds"] else "no: " + c["why"]) + (f" ({c['load_note']})" if c["load_note"] else "")]
           for c in r["capacity"]]
    held = [c["sessions"] for c in r["capacity"] if c["holds"]]
    limit = r["capacity"][0]["overhead_limit_ms"]
    flags = f", server flags {r['capacity_flags']}" if r.get("capacity_flags") else ""
    flags += f", saying {os.path.basename(r['capacity_speech'])}" if r.get("capacity_speech") else ""
    return [f"Capacity, {r['capacity_frame_ms']} ms microphone frames{flags} (largest N that holds: {max(held) if held else 0}; "
            f"holds = overhead p95 under {limit} ms, no audio behind real time, every turn answered; "
            f"CPU in % of one core):", "",
            table(cap, ["sessions", "turns", "overhead p50", "overhead p95", "of which server p95", "voice-to-voice p95",
                        "underrun ms", "server CPU", "server CPU ms per session-second", "bench process CPU", "machine CPU",
                        "server loop over 100 ms late, % of checks", "full GCs × mean ms", "bench loop lag p99 ms",
                        "holds"]), ""]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPU cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU in use")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: few turns, few sessions, short runs")
    p.add_argument("--turns", type=int, default=20, help="turns for the latency part")
    p.add_argument("--cuts", type=int, default=10, help="barge-ins for the barge-in part")
    p.add_argument("--sessions", default="1,10,25,50,100,150,200", help="session counts tried for capacity, in order")
    p.add_argument("--capacity_seconds", type=float, default=40, help="how long each capacity step runs")
    p.add_argument("--capacity_frame_ms", type=int, default=64,
                   help="microphone frame of the capacity clients (CleanS2S's browser client sends 64 ms)")
    p.add_argument("--capacity_flags", default="",
                   help="more server flags for the capacity steps, e.g. '--turn_detection smart_turn'")
    p.add_argument("--capacity_speech", default="",
                   help="the WAV each capacity session says, turn after turn (default: tests/fixtures/en_question.wav); "
                        "with --turn_detection smart_turn, one the model hears as one turn")
    p.add_argument("--quiet_wait_s", type=float, default=120,
                   help="before each capacity step, wait up to this long for other processes to leave the cores idle")
    p.add_argument("--capacity_retries", type=int, default=1,
                   help="times a capacity step that breaks while the machine or the load generator is saturated is rerun")
    p.add_argument("--parts", default=",".join(PARTS_RUN), help=f"parts to run, comma-separated, of {','.join(PARTS_RUN)}")
    p.add_argument("--out", default=os.path.join("bench", "results", "latest.json"), help="JSON written here")
    args = p.parse_args(argv)
    if args.quick:
        args.turns, args.cuts, args.sessions, args.capacity_seconds = 2, 2, "1,4", 6
        args.quiet_wait_s, args.capacity_retries = 0, 0
    sizes = [int(n) for n in args.sessions.split(",")]
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS_RUN):
        p.error(f"--parts: choose from {','.join(PARTS_RUN)}")
    t0 = time.monotonic()
    with FakeChatAPI(first_token_delay_s=LLM_FIRST_TOKEN_MS / 1000, token_delay_s=LLM_WORD_MS / 1000) as api:
        bench = Bench(args, api)
        results = {"date": datetime.date.today().isoformat(), "machine": machine(), "quick": args.quick,
                   "models": {"asr_ms": ASR_MS, "llm_first_token_ms": LLM_FIRST_TOKEN_MS, "llm_word_ms": LLM_WORD_MS,
                              "tts_first_audio_ms": TTS_MS, "tts_rtf": TTS_RTF}, "frame_ms": 20,
                   "capacity_frame_ms": args.capacity_frame_ms, "capacity_flags": args.capacity_flags,
                   "capacity_speech": args.capacity_speech,
                   "latency": {}, "barge_in": {}}
        for name, flags in (("ours", OURS), ("cleans2s", CLEANS2S)):
            if "latency" in parts:
                print(f"latency, {name} ...", flush=True)
                results["latency"][name] = bench.latency(flags, args.turns)
            if "barge_in" in parts:
                print(f"barge-in, {name} ...", flush=True)
                results["barge_in"][name] = bench.barge_in(flags, args.cuts)
        if "realtime" in parts:
            print("realtime ...", flush=True)
            results["realtime"] = bench.realtime(args.turns, args.cuts)
        if "capacity" in parts:
            print("capacity ...", flush=True)
            results["capacity"] = bench.capacity(sizes, args.capacity_seconds)
        if "vad" in parts:
            print("VAD ...", flush=True)
            results["vad"] = bench.vad(10 if args.quick else 60)
    results["bench_seconds"] = round(time.monotonic() - t0)
    print(f"\n{results['date']}, {results['machine']}\n")
    print(report(results))
    write_results(results, args.out)
    return results


def write_results(results: dict, path: str) -> None:
    """The JSON of a run, and where it went."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)  # answers and transcripts in Chinese stay readable
    print(f"\nJSON: {path} ({results['bench_seconds']} s)")


if __name__ == "__main__":
    main()
