"""Hostile and careless clients beside a victim: what the server does to them, and what the victim notices.

    .venv/bin/python bench/hostile.py            # about 2-3 minutes on 2 CPU cores
    .venv/bin/python bench/hostile.py --quick    # a ~40 s smoke run of every row (the test suite runs it)

Each row starts the real server (tests/serve_test_models.py, fixed-latency ASR and TTS, the fake chat API: the setup of
bench/run.py) with the flags it names, opens a victim session, measures it alone, then attacks over 127.0.0.0/8 while
the victim goes on, and measures it again. Attackers "at another address" send X-Forwarded-For through 127.0.0.1,
which the server trusts as a proxy (--trusted_proxies), as nginx would.

Figures (the victim's, every row): victim first audio = seconds from sending a typed question to the first audio of its
answer (the whole answer must arrive), p50 over --turns turns, alone -> beside the attack. Per row:
  1 key        a sender on the victim's uid without its key (none, a wrong one as subprotocol, a wrong ?key=): close codes,
               bytes any of them heard (the victim's answers), refusal lines logged.
  2 stuck      a uid-less sender whose client never reads (SO_RCVBUF 4096, max_queue=1), beside a legacy victim with long
               answers: seconds from the victim's next question until the server logs "too slow" and until its TCP
               connection to the attacker is gone (psutil); server RSS before -> after.
  3 deflate    a receiver offering permessage-deflate that then writes a compressed frame (RSV1, a deflate bomb that
               would inflate to 16 MiB): whether deflate was negotiated, close code, ms until closed, server RSS change.
  4 one addr   one address opening uid-less senders: admitted / refused (1013), seconds until the admitted idle ones are
               closed (4408, --idle_timeout_s 5); the victim is at another address.
  5 handshakes connections that send half an HTTP request, never the rest, from 127.0.0.1 and 127.0.0.2: how many the server
               still holds, its open descriptors during -> after, a new victim session (open + first audio) and GET / of
               the page during the flood, the log lines the flood wrote.
  6 token      a burst of connections with a wrong --auth_token, 50 at a time: close codes, refusal lines logged.
  7 audio      a session that sends speech with pauses as fast as it can (1 s a message), under --turn_detection
               smart_turn (every pause asks the turn model): seconds of audio sent per second, audio_too_fast errors,
               the server's CPU seconds per second during the attack against before it.
Prints a markdown table and writes JSON with every raw figure and the machine (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import zlib
from collections import Counter

import numpy as np
import psutil
import websockets
from websockets.asyncio.client import connect

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import LLM_FIRST_TOKEN_MS, LLM_WORD_MS, LONG_ANSWER, MODEL_FLAGS, machine, spread, table, write_results  # noqa: E402
import s2s_server_pipeline as s2s  # noqa: E402  (run put the root and tests/ on the path)
from client import ExtendedClient, LegacyClient, load_wav  # noqa: E402
from conftest import fixture  # noqa: E402
from fakes import FakeChatAPI  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from test_privacy import as_client, http_get, still_open, stuck_socket, typed_answer  # noqa: E402

ANSWER = "Sure, here is a short answer."  # about 2 s of speech
ATTACKER, VICTIM = "203.0.113.9", "198.51.100.2"  # as X-Forwarded-For: addresses behind the trusted proxy 127.0.0.1
TOKEN = "bench-token-0123456789"
STUCK_FLAGS = ["--playback_lead_ms", "0", "--send_timeout_s", "2", "--send_buffer_kb", "256"]  # as tests/test_privacy.py


class TimedServer(ServerProcess):
    """The server, with what an attack row reads of it: its log since a moment, its memory and descriptors."""

    def since(self, t: float, text: str = "") -> list:
        """(time, line) of the lines read at or after t that contain text."""
        return [(s, line) for s, line in zip(list(self.times), list(self.lines)) if s >= t and text in line]

    def rss_mb(self) -> float:
        return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)

    def fds(self) -> int:
        return psutil.Process(self.proc.pid).num_fds()

    def cpu_s(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system


async def drain(ws, timeout: float) -> tuple:
    """Read until the server closes: (its close code, or "open" if it did not within timeout; bytes heard; when)."""
    heard = 0
    try:
        async with asyncio.timeout(timeout):
            async for message in ws:
                heard += len(message)
    except TimeoutError:
        return "open", heard, time.monotonic()
    except websockets.ConnectionClosed:
        pass
    return ws.close_code, heard, time.monotonic()


async def attempt(url: str, timeout: float = 5, **kwargs) -> tuple:
    """Connect and drain; a refusal before the WebSocket opens counts as its HTTP status or error."""
    try:
        async with connect(url, **kwargs) as ws:
            return await drain(ws, timeout)
    except websockets.InvalidStatus as exc:
        return f"HTTP {exc.response.status_code}", 0, time.monotonic()
    except (OSError, websockets.InvalidHandshake) as exc:
        return type(exc).__name__, 0, time.monotonic()


async def ask(victim, turns: int, label: str) -> list:
    return [round(await typed_answer(victim, f"{label} question {i}", 30), 3) for i in range(turns)]


def victim(alone: list, beside: list) -> dict:
    return {"alone_s": alone, "beside_s": beside, "alone_p50_s": round(statistics.median(alone), 3),
            "beside_p50_s": round(statistics.median(beside), 3)}


def codes(results) -> dict:
    return dict(Counter(str(r[0]) for r in results))


def compressed_frame(payload: bytes) -> bytes:
    """A masked text frame with RSV1 set (a permessage-deflate message) of under 64 KiB; mask key 0 leaves it as is."""
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return bytes([0xC1]) + size + b"\0\0\0\0" + payload


def deflate_bomb(inflated: int = 16 * 2**20) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as permessage-deflate; its 00 00 ff ff tail removed
    return (c.compress(bytes(inflated)) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


# ---- the rows: each gets a started server and returns its raw figures, with "does" and "figures" for the table ----

async def row_key(srv: TimedServer, a) -> dict:
    async with ExtendedClient(srv.recv_url, srv.send_url) as v:
        alone = await ask(v, a.turns, "alone")
        t0 = time.monotonic()
        url = f"{srv.send_url}/?uid={v.uid}"
        kinds = [{"url": url}, {"url": url, "subprotocols": ["s2s", "s2s.key." + "A" * 32]}, {"url": url + "&key=" + "B" * 32}]

        async def attack():
            return [await attempt(**kinds[i % 3]) for i in range(a.attempts)]
        tries, beside = await asyncio.gather(attack(), ask(v, a.turns, "beside"))
    lines = srv.since(t0, "refused a connection")
    return {**victim(alone, beside), "attempts": len(tries), "codes": codes(tries), "bytes_heard": sum(t[1] for t in tries),
            "refusal_log_lines": len(lines), "does": f"closes them: {codes(tries)}",
            "figures": f"{sum(t[1] for t in tries)} bytes of the victim's answers heard; {len(lines)} 'refused' log line(s)"}


async def row_stuck(srv: TimedServer, a) -> dict:
    async with LegacyClient(srv.recv_url, srv.send_url) as v:
        alone = await ask(v, a.turns, "alone")
        rss0 = srv.rss_mb()
        sock = stuck_socket(srv.send_port)
        port = sock.getsockname()[1]
        stuck = await connect(srv.send_url, sock=sock, max_queue=1)  # the library stops reading after one message

        def connected() -> bool:
            return any(c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port
                       for c in psutil.Process(srv.proc.pid).net_connections("tcp"))

        async def watch() -> float | None:  # when the server's end of the attacker's connection is no longer open
            while time.monotonic() < t0 + a.stuck_wait_s:
                if not await asyncio.to_thread(connected):
                    return time.monotonic()
                await asyncio.sleep(0.05)
        t0 = time.monotonic()
        gone = asyncio.create_task(watch())
        beside = await ask(v, a.turns, "beside")
        gone_t = await gone
        logged = srv.since(t0, "too slow")
        stuck.transport.abort()
        await asyncio.sleep(0.5)
        rss1 = srv.rss_mb()
    log_s = round(logged[0][0] - t0, 2) if logged else None
    tcp_s = round(gone_t - t0, 2) if gone_t else None
    tcp = f"TCP gone {tcp_s} s" if tcp_s else f"TCP still ESTABLISHED at {a.stuck_wait_s:g} s"
    return {**victim(alone, beside), "closed_logged_s": log_s, "closed_tcp_s": tcp_s, "watched_s": a.stuck_wait_s,
            "slow_log_line": logged[0][1].strip() if logged else None, "server_rss_mb": [rss0, rss1],
            "does": "closes it (4429, logged 'too slow')" if logged else f"does NOT close it within {a.stuck_wait_s:g} s",
            "figures": f"'too slow' logged {log_s} s, {tcp} after the victim's question; RSS {rss0} → {rss1} MB"}


async def row_deflate(srv: TimedServer, a) -> dict:
    bomb = compressed_frame(deflate_bomb())
    async with ExtendedClient(srv.recv_url, srv.send_url) as v:
        alone = await ask(v, a.turns, "alone")
        rss0, t0 = srv.rss_mb(), time.monotonic()

        async def attack():
            out = []
            for i in range(a.zips):
                async with connect(f"{srv.recv_url}/?uid=zipper-{i}", compression="deflate") as ws:
                    extension = ws.response.headers.get("Sec-WebSocket-Extensions")
                    await ws.recv()  # ready
                    sent = time.monotonic()
                    ws.transport.write(bomb)
                    code, _, closed = await drain(ws, 10)
                    out.append((code, extension, round((closed - sent) * 1000, 1)))
            return out
        tries, beside = await asyncio.gather(attack(), ask(v, a.turns, "beside"))
        rss1 = srv.rss_mb()
    negotiated = sorted({str(t[1]) for t in tries})
    closed_ms = spread([t[2] for t in tries])
    return {**victim(alone, beside), "attempts": len(tries), "codes": codes(tries), "extensions_answered": negotiated,
            "closed_ms": closed_ms, "frame_bytes": len(bomb), "inflates_to_bytes": 16 * 2**20, "server_rss_mb": [rss0, rss1],
            "refusal_log_lines": len(srv.since(t0, "refused")),
            "does": f"negotiates {'nothing' if negotiated == ['None'] else negotiated}, closes: {codes(tries)}",
            "figures": f"closed {closed_ms['p50']} ms after a {len(bomb) // 1024} KiB frame (p50); RSS {rss0} → {rss1} MB"}


async def row_one_address(srv: TimedServer, a) -> dict:
    async with ExtendedClient(srv.recv_url, srv.send_url, **as_client(VICTIM)) as v:
        alone = await ask(v, a.turns, "alone")
        opened, held = [], []
        for _ in range(a.senders):
            held.append(await connect(srv.send_url, **as_client(ATTACKER)))
            opened.append(time.monotonic())
        ends, beside = await asyncio.gather(asyncio.gather(*(drain(ws, 30) for ws in held)), ask(v, a.turns, "beside"))
    ages = [round(e[2] - t, 2) for e, t in zip(ends, opened)]  # seconds from its opening to its close
    admitted = [e for e in ends if e[0] != 1013]
    idle = [age for e, age in zip(ends, ages) if e[0] == 4408]
    return {**victim(alone, beside), "opened": len(held), "codes": codes(ends), "admitted": len(admitted),
            "max_connections_per_client": s2s.build_parser().get_default("max_connections_per_client"),
            "refused_1013": sum(e[0] == 1013 for e in ends), "idle_closed_after_s": spread(idle),
            "does": f"admits {len(admitted)}, refuses {sum(e[0] == 1013 for e in ends)}; closes: {codes(ends)}",
            "figures": f"admitted ones closed 4408 after {spread(idle)['p50']} s (p50) idle"}


async def row_handshakes(srv: TimedServer, a) -> dict:
    async def newcomer(label: str) -> dict:
        t = time.monotonic()
        async with ExtendedClient(srv.recv_url, srv.send_url) as v:
            opened = time.monotonic() - t
            first = await ask(v, a.turns, label)
        t = time.monotonic()
        status = (await asyncio.to_thread(http_get, srv.recv_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))[:12]
        return {"session_open_s": round(opened, 3), "first_audio_s": first, "get_page_s": round(time.monotonic() - t, 3),
                "get_page_status": status.decode(errors="replace")}
    alone, fds0 = await newcomer("alone"), srv.fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the server keeps the limit it started with
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process opens every flood connection
    t0, flood, loop = time.monotonic(), [], asyncio.get_running_loop()
    for source, count in (("127.0.0.1", a.flood), ("127.0.0.2", a.flood // 10)):
        for _ in range(count):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", srv.recv_port))
            sock.send(b"GET /?uid=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
            flood.append((source, sock))
    flood_s = time.monotonic() - t0
    await asyncio.sleep(0.3)
    fds_during, beside = srv.fds(), await newcomer("beside")
    held = Counter(source for source, sock in flood if still_open(sock))
    for _, sock in flood:
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await asyncio.sleep(1.0)
    lines = srv.since(t0)
    limit = s2s.build_parser().get_default("max_pending_connections")  # the server runs with the default
    fds, logged = [fds0, fds_during, srv.fds()], len([1 for _, line in lines if "opening handshakes" in line])
    return {**victim(alone["first_audio_s"], beside["first_audio_s"]), "alone": alone, "beside": beside,
            "flood": {s: n for s, n in Counter(s for s, _ in flood).items()}, "flood_connect_s": round(flood_s, 2),
            "held": dict(held), "server_fds_before_during_after": fds, "log_lines": len(lines),
            "handshake_log_lines": logged,
            "server_nofile_limit": psutil.Process(srv.proc.pid).rlimit(psutil.RLIMIT_NOFILE),
            "max_pending_connections": limit,
            "does": f"holds {sum(held.values())} of {len(flood)} ({dict(held)}; --max_pending_connections {limit}), drops "
                    f"{'the oldest' if sum(held.values()) < len(flood) else 'none'}",
            "figures": f"session open {alone['session_open_s']} → {beside['session_open_s']} s, GET / {alone['get_page_s']} → "
                       f"{beside['get_page_s']} s ({beside['get_page_status']}); fds {fds[0]} → {fds[1]} → {fds[2]}; "
                       f"{logged} 'opening handshakes' log line(s)"}


async def row_token(srv: TimedServer, a) -> dict:
    kwargs = {"subprotocols": ["s2s", "s2s.token." + TOKEN]}
    async with ExtendedClient(srv.recv_url, srv.send_url, **kwargs) as v:
        alone = await ask(v, a.turns, "alone")
        t0, gate = time.monotonic(), asyncio.Semaphore(50)

        async def one(i: int):
            url = (srv.recv_url, srv.send_url)[i % 2] + f"/?uid=u{i}"
            async with gate:
                if i % 4 < 2:
                    return await attempt(url, subprotocols=["s2s", "s2s.token.wrong-token-42"])
                return await attempt(url + "&token=wrong-token-42")

        async def burst():
            out = await asyncio.gather(*(one(i) for i in range(a.tokens)))
            return out, time.monotonic() - t0
        (tries, burst_s), beside = await asyncio.gather(burst(), ask(v, a.turns, "beside"))
        await asyncio.sleep(0.5)
    lines = srv.since(t0)
    refusals = len([1 for _, line in lines if "refused a connection" in line])
    return {**victim(alone, beside), "attempts": len(tries), "codes": codes(tries), "burst_s": round(burst_s, 2),
            "log_lines": len(lines), "refusal_log_lines": refusals, "does": f"closes them: {codes(tries)}",
            "figures": f"{len(tries)} in {burst_s:.2f} s; {refusals} 'refused' log line(s)"}


async def row_audio(srv: TimedServer, a) -> dict:
    second = s2s.SAMPLE_RATE
    speech = load_wav(fixture("en_question.wav"))
    pattern = np.concatenate([speech, np.zeros(second // 2, np.float32)] * 4)  # a pause every ~3 s: the model is asked
    messages = [pattern[i:i + second] for i in range(0, len(pattern), second)]
    async with ExtendedClient(srv.recv_url, srv.send_url) as v:
        cpu0, t0 = srv.cpu_s(), time.monotonic()
        alone = await ask(v, a.turns, "alone")
        idle_cpu = (srv.cpu_s() - cpu0) / (time.monotonic() - t0)
        attacker = await ExtendedClient(srv.recv_url, srv.send_url).__aenter__()
        cpu0, t0, sent = srv.cpu_s(), time.monotonic(), []

        async def attack():
            try:
                while True:
                    await attacker.send_audio(messages[len(sent) % len(messages)])
                    sent.append(len(messages[len(sent) % len(messages)]))
            except websockets.ConnectionClosed as exc:  # the server's keepalive: its pong waits behind the audio
                return f"{exc.rcvd.code} {exc.rcvd.reason}" if exc.rcvd else "closed"
        attacking = asyncio.create_task(attack())
        beside = await ask(v, a.turns, "beside")
        await asyncio.sleep(max(0.0, t0 + a.audio_s - time.monotonic()))
        attack_s, attack_cpu = time.monotonic() - t0, srv.cpu_s() - cpu0
        closed = attacking.result() if attacking.done() else None
        attacking.cancel()
        refused = [e for e in attacker.events("error") if e.data["code"] == "audio_too_fast"]
        for ws in (attacker.recv, attacker.send):  # a close handshake would wait behind the audio still buffered
            ws.transport.abort()
        await attacker.__aexit__(None, None, None)
    sent_s = sum(sent) / second
    return {**victim(alone, beside), "audio_sent_s_per_s": round(sent_s / attack_s, 1), "attack_s": round(attack_s, 1),
            "audio_too_fast_errors": len(refused), "server_cpu_s_per_s_before": round(idle_cpu, 3),
            "server_cpu_s_per_s_during": round(attack_cpu / attack_s, 3), "attacker_closed": closed,
            "does": f"hears {a.max_audio_ahead_s:g} s ahead of real time at most, then reads in real time "
                    f"({len(refused)} audio_too_fast){'; closed: ' + closed if closed else ''}",
            "figures": f"{sent_s / attack_s:.1f} s of audio a second written in {attack_s:.0f} s (into the socket buffers); "
                       f"server CPU {idle_cpu:.2f} → {attack_cpu / attack_s:.2f} s/s"}


def rows(args, page: str) -> list:
    legacy = ["--legacy_clients", "allow"]
    return [
        ("key", f"{args.attempts} senders on the victim's uid without its key", row_key, legacy, ANSWER),
        ("stuck", "a uid-less sender that never reads, beside a legacy victim with long answers", row_stuck,
         legacy + ([] if args.stuck_defaults else STUCK_FLAGS), LONG_ANSWER),
        ("deflate", f"{args.zips} receivers offering deflate, then a compressed frame (a deflate bomb)", row_deflate, legacy, ANSWER),
        ("one_address", f"{args.senders} uid-less senders from one address", row_one_address,
         legacy + ["--idle_timeout_s", "5"], ANSWER),
        ("handshakes", f"{args.flood} + {args.flood // 10} half-sent handshakes (127.0.0.1 + 127.0.0.2)", row_handshakes,
         ["--client_dir", page], ANSWER),
        ("token", f"a burst of {args.tokens} connections with a wrong token", row_token, ["--auth_token", TOKEN], ANSWER),
        ("audio", "a session sending speech with pauses as fast as it can, under smart_turn", row_audio,
         ["--turn_detection", "smart_turn", "--max_audio_ahead_s", f"{args.max_audio_ahead_s:g}"], ANSWER),
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench/hostile.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer turns, attempts and connections")
    p.add_argument("--turns", type=int, default=5, help="victim turns alone and beside each attack")
    p.add_argument("--attempts", type=int, default=100, help="row key: senders without the key")
    p.add_argument("--zips", type=int, default=20, help="row deflate: compressed frames")
    p.add_argument("--senders", type=int, default=50, help="row one_address: senders from one address")
    p.add_argument("--flood", type=int, default=1000, help="row handshakes: from 127.0.0.1 (and a tenth as many from 127.0.0.2)")
    p.add_argument("--tokens", type=int, default=300, help="row token: connections with a wrong token")
    p.add_argument("--stuck_defaults", action="store_true",
                   help=f"row stuck: the server's defaults instead of {' '.join(STUCK_FLAGS)}")
    p.add_argument("--stuck_wait_s", type=float, default=30,
                   help="row stuck: how long after the victim's question to watch for the server's end of the connection to go")
    p.add_argument("--audio_s", type=float, default=10, help="row audio: seconds the attack lasts at least")
    p.add_argument("--max_audio_ahead_s", type=float, default=5, help="row audio: the server's --max_audio_ahead_s")
    p.add_argument("--rows", default="key,stuck,deflate,one_address,handshakes,token,audio", help="rows to run, comma-separated")
    p.add_argument("--out", default=os.path.join("bench", "results", "latest-hostile.json"), help="JSON written here")
    args = p.parse_args(argv)
    if args.quick:
        args.turns, args.attempts, args.zips, args.senders, args.flood, args.tokens = 1, 20, 3, 20, 200, 60
        args.stuck_wait_s = min(args.stuck_wait_s, 5)
        args.audio_s = min(args.audio_s, 3)
    t0 = time.monotonic()
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "quick": args.quick,
               "models": {"llm_first_token_ms": LLM_FIRST_TOKEN_MS, "llm_word_ms": LLM_WORD_MS},
               "rows": {}}
    with tempfile.TemporaryDirectory() as page, \
            FakeChatAPI(first_token_delay_s=LLM_FIRST_TOKEN_MS / 1000, token_delay_s=LLM_WORD_MS / 1000) as api:
        with open(os.path.join(page, "index.html"), "w") as f:
            f.write("<h1>voice agent</h1>")
        for name, attack, scenario, flags, answer in rows(args, page):
            if name not in args.rows.split(","):
                continue
            print(f"{name} ...", flush=True)
            started = time.monotonic()
            api.answer = lambda messages, answer=answer: answer
            srv = TimedServer(*MODEL_FLAGS, "--lm_model_url", api.url, *flags, env={"LLM_API_KEY": "bench"})
            try:
                row = asyncio.run(scenario(srv, args))
            finally:
                srv.stop()
            row.update(attack=attack, server_flags=flags, traceback_in_log="Traceback" in srv.log(),
                       row_seconds=round(time.monotonic() - started, 1),
                       warning_lines=[line.strip() for _, line in srv.since(started, " WARNING ")])
            results["rows"][name] = row
    results["bench_seconds"] = round(time.monotonic() - t0)
    lines = [[r["attack"], r["does"], f"{r['alone_p50_s']} → {r['beside_p50_s']}", r["figures"]
              + (" **Traceback in the server log**" if r["traceback_in_log"] else "")] for r in results["rows"].values()]
    print(f"\n{results['date']}, {results['machine']}\n")
    print(table(lines, ["attack", "what the server does", "victim first audio p50, s: alone → beside", "measured"]))
    for name, r in results["rows"].items():
        raw = {k: v for k, v in r.items() if k not in ("attack", "does", "figures")}
        print(f"\n{name}: {json.dumps(raw)}")
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
