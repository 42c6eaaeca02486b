"""Soak: more than a hundred clients connect, are cut off mid-answer (by typed text or by speech) and leave mid-answer,
cleanly or by vanishing, several at a time. Afterwards the server process has as many threads and open files as
before, its memory is back near its baseline, and no session is left open."""
from __future__ import annotations

import asyncio
import re

import numpy as np
import psutil

from client import ExtendedClient, load_wav
from conftest import fixture
from fakes import FakeChatAPI
from test_faults import answer, start, vanish

CONCURRENT = 4  # clients at a time
WARMUP_ROUNDS = 10  # lazily created threads and buffers, and the allocator's early growth, count in the baseline
ROUNDS = 30  # CONCURRENT clients each: 120 connect / cut in / leave cycles
# Answer audio is sent as fast as a quick TTS makes it (--playback_lead_ms 0), and every session has sent three chunks of
# its first answer, about 8 s of audio (250 KB), before it is cut off: if the server kept the sessions of the 120 cycles,
# RSS would grow by some 40 MB (45 MB, measured with such a leak put in on purpose). The allocator's own drift
# (fragmentation: about 30 KB a cycle, 4 MB in all, measured here) stays well under the slack.
RSS_SLACK = 10 * 2**20
SPEECH = np.concatenate([load_wav(fixture("en_interrupt.wav")), np.zeros(16000, np.float32)])


def usage(proc: psutil.Process) -> dict:
    return {"threads": proc.num_threads(), "fds": proc.num_fds(), "rss": proc.memory_info().rss}


def open_sessions(lines: list) -> tuple:
    """(uids opened and not closed, the last "(N active)" count) from the server log."""
    opened, active = set(), None
    for line in lines:
        m = re.search(r"s2s: session (\S+) (opened|closed)(?: from \S+)? \((\d+) active\)", line)
        if m:
            (opened.add if m.group(2) == "opened" else opened.discard)(m.group(1))
            active = int(m.group(3))
    return opened, active


async def cycle(srv, n: int) -> None:
    """A client asks for a long answer, cuts it off, and leaves while the next answer plays."""
    c = ExtendedClient(srv.recv_url, srv.send_url)
    await c.__aenter__()
    await c.send_text("tell me something long")
    await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == 1 and r.data["seq"] >= 3)  # seconds of it
    if n % 2:
        await c.send_text("stop, something else")
    else:  # speech, faster than real time: half a second of audio per message
        for i in range(0, len(SPEECH), 8000):
            await c.send_audio(SPEECH[i:i + 8000])
    await c.wait_for(lambda r: r.kind == "interrupt" and r.data["turn"] == 1)
    await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == 2)
    assert not [r for r in c.received if r.kind == "audio" and r.data["turn"] == 1 and r.t > c.events("interrupt")[0].t]
    if n % 3 == 0:
        vanish(c)
    else:
        await c.__aexit__(None, None, None)


def settle(srv, cycles_before: int, cycles: int) -> None:
    """Wait until every session of the cycles so far has closed."""
    def closed(lines):
        return sum("s2s: session" in line and "closed" in line for line in lines) >= cycles_before + cycles
    srv.wait_until(closed, timeout=30, what=f"{cycles} closed sessions")


def test_connect_interrupt_leave_cycles_return_threads_and_memory_to_baseline():
    with FakeChatAPI(answer=answer, first_token_delay_s=0.05, token_delay_s=0.01) as chat:
        srv = start(chat, "--playback_lead_ms", "0", "--tts_latency_ms", "20", "--tts_rtf", "0.02", "--resume_s", "1")
        try:
            proc = psutil.Process(srv.proc.pid)

            async def rounds(count: int, first: int) -> None:
                for r in range(count):
                    await asyncio.gather(*(cycle(srv, first + r * CONCURRENT + i) for i in range(CONCURRENT)))

            asyncio.run(rounds(WARMUP_ROUNDS, 0))
            warm = WARMUP_ROUNDS * CONCURRENT
            settle(srv, 0, warm)
            baseline = usage(proc)
            asyncio.run(rounds(ROUNDS, warm))
            settle(srv, warm, ROUNDS * CONCURRENT)
            after = usage(proc)
            still_open, active = open_sessions(srv.lines)
        finally:
            srv.stop()
    assert srv.proc.returncode == 0 and "Traceback" not in srv.log(), srv.log()[-5000:]
    assert still_open == set() and active == 0, (still_open, active)
    assert after["threads"] <= baseline["threads"] + 2, (baseline, after)
    assert after["fds"] <= baseline["fds"] + 2, (baseline, after)
    assert after["rss"] <= baseline["rss"] + RSS_SLACK, (baseline, after)
    assert len(chat.streams) >= 2 * (WARMUP_ROUNDS + ROUNDS) * CONCURRENT  # every cycle had two answers under way
    assert all(s["done"].wait(5) for s in chat.streams)  # and no LLM stream was left hanging
