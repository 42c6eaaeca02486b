"""What looking things up costs per turn: the RAG agent (s2s_server_pipeline_rag.py) beside the core server.

    python bench/rag_cost.py            # about 3 minutes on 2 CPU cores; prints markdown tables (--out FILE: JSON too)
    python bench/rag_cost.py --quick    # a smoke run

Part 1, per turn, through the real servers with the fixed-latency models of bench/run.py (an LLM whose first token
takes 200 ms, then a word every 20 ms, for each request; a TTS whose first audio takes 100 ms) and a local Serper
that answers after SERPER_MS. A WebSocket client types questions of three kinds: one the model answers without a
look-up, one it looks up in the documents, one it looks up on the web. Measured at the client from sending the
question: the first audio (the filler when a look-up runs), and the first audio of the answer itself; at the
server, the look-up's own time (`lookup_ms`). Audio is sent as soon as it is made (--playback_lead_ms 0).

Part 2, retrieval alone, in process: a few hundred passages indexed, then searched, with a random-weight model of
the default embedder's shape (paraphrase-multilingual-MiniLM-L12-v2: 12 layers, 384 wide; the compute does not
depend on the weights, what it finds does).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from run import LLM_FIRST_TOKEN_MS, LLM_WORD_MS, MODEL_FLAGS, SHORT_ANSWER, machine, spread  # noqa: E402

from client import ExtendedClient  # noqa: E402
from fake_search import FakeSerper, ToolChatAPI, tool_results  # noqa: E402
from rag_server import RAGServerProcess  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from tiny_embedder import DEFAULT_SIZE, build_tiny_embedder  # noqa: E402

import s2s_server_pipeline_rag as rag  # noqa: E402

SERPER_MS = 400  # a Serper search; real ones take about 0.5-1.5 s
QUESTIONS = {"no look-up": "Hello, how are you today?", "documents": "When is the Zorblat festival?",
             "web": "What is the weather in Dask today?"}
FACT = "The Zorblat festival takes place every March in Kelmora."
WEATHER = "<html><body><p>Today in Dask: sunny, 21 degrees.</p></body></html>"
WORDS = ("market river bridge garden harbour stone tower lantern orchard meadow valley castle library school "
         "bakery station ferry island mountain forest village square fountain chapel museum theatre").split()


def write_documents(folder: str, files: int, paragraphs: int) -> str:
    """`files` notes of `paragraphs` paragraphs (~400 characters each, one passage each) and one fact."""
    rng = random.Random(0)
    for n in range(files):
        paras = [" ".join(f"The {rng.choice(WORDS)} near the {rng.choice(WORDS)} has a {rng.choice(WORDS)}." for _ in range(8))
                 for _ in range(paragraphs)]
        if n == files // 2:
            paras[paragraphs // 2] = FACT
        with open(os.path.join(folder, f"notes_{n:03d}.md"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(paras))
    return folder


def decide(messages: list, tools: list):
    question = messages[-1]["content"]
    if "festival" in question and "search_documents" in tools:
        return "search_documents", question
    if "weather" in question and "web_search" in tools:
        return "web_search", question
    return None


def answer(messages: list) -> str:
    return f"Here is what I found. {SHORT_ANSWER}" if tool_results(messages) else SHORT_ANSWER


async def measure_turns(server, kinds: list, turns: int) -> dict:
    """{kind: [(first audio ms, answer audio ms, lookup ms)]}, from the client's clock and the server's metrics."""
    out: dict = {kind: [] for kind in kinds}
    async with ExtendedClient(server.recv_url, server.send_url) as c:
        await c.wait_for(lambda r: r.kind == "ready")
        number = 0
        for _ in range(turns):
            for kind in kinds:
                number += 1
                sent = time.monotonic()
                await c.send_text(QUESTIONS[kind])
                metrics = await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == number)
                audio = c.events("audio", turn=number)
                filler = c.events("answer", turn=number)[0].data["text"].strip() == "Let me look that up."
                answer_audio = [a for a in audio if a.data["seq"] >= (1 if filler else 0)]
                out[kind].append(((audio[0].t - sent) * 1000, (answer_audio[0].t - sent) * 1000,
                                  metrics.data["metrics"].get("lookup_ms")))
    return out


def per_turn(chat_url: str, serper: FakeSerper, docs: str, index: str, model: str, turns: int) -> dict:
    common = [*MODEL_FLAGS, "--lm_model_url", chat_url, "--playback_lead_ms", "0"]
    rag_flags = ["--kb_dir", docs, "--kb_index_dir", index, "--embed_model", model, "--device", "cpu",
                 "--serper_url", serper.search_url]
    env = {"LLM_API_KEY": "bench", "SERPER_API_KEY": "bench"}
    setups = [("core server (s2s_server_pipeline.py), same question", ServerProcess, [], ["no look-up"]),
              ("RAG, tools (default)", RAGServerProcess, rag_flags, list(QUESTIONS)),
              ("RAG, --no-rag_tools: documents searched before every answer", RAGServerProcess, rag_flags + ["--no-rag_tools"], ["no look-up"]),
              ("RAG, --no-rag_tools --web_every_turn: documents and web before every answer", RAGServerProcess, rag_flags + ["--no-rag_tools", "--web_every_turn"],
               ["no look-up"])]
    results = {}
    for name, kind, flags, kinds in setups:
        server = kind(*common, *flags, env=env)
        try:
            asyncio.run(measure_turns(server, kinds, 1))  # warm-up turns, not counted
            measured = asyncio.run(measure_turns(server, kinds, turns))
        finally:
            server.stop()
        for k, rows in measured.items():
            lookups = [r[2] for r in rows if r[2] is not None]
            results[f"{name}: {k}" if len(kinds) > 1 else name] = {"first_audio_ms": spread([r[0] for r in rows]),
                                       "answer_audio_ms": spread([r[1] for r in rows]),
                                       "lookup_ms": spread(lookups) if lookups else None}
    return results


def retrieval(docs: str, index_dir: str, model: str, queries: int) -> dict:
    embedder = rag.Embedder(model, "cpu")
    embedder.setup()
    index = rag.DocumentIndex(docs, index_dir, embedder, refresh_s=float("inf"))
    t0 = time.monotonic()
    index.refresh()
    build_s = time.monotonic() - t0
    t0 = time.monotonic()
    rag.DocumentIndex(docs, index_dir, embedder, refresh_s=float("inf")).refresh()
    reopen_s = time.monotonic() - t0
    snap, timings = index.snapshot, {"bm25": [], "embed": [], "dense": [], "search": []}
    index.search("warm-up")
    for i in range(queries):
        q = f"When is the Zorblat festival near the {WORDS[i % len(WORDS)]}?"
        t0 = time.monotonic()
        snap.bm25.scores(rag.terms(q))
        t1 = time.monotonic()
        vector = embedder.encode([q])[0]
        t2 = time.monotonic()
        snap.vectors @ vector
        t3 = time.monotonic()
        found = index.search(q)
        t4 = time.monotonic()
        assert any(FACT in s.text for s in found)
        for key, ms in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            timings[key].append(ms * 1000)
    return {"passages": len(snap.passages), "index_build_s": round(build_s, 2), "index_reopen_s": round(reopen_s, 2),
            **{f"{k}_ms": spread(v) for k, v in timings.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench/rag_cost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few turns, few documents")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    turns, files = (2, 4) if args.quick else (10, 50)
    with tempfile.TemporaryDirectory() as tmp, \
            ToolChatAPI(decide, answer=answer, first_token_delay_s=LLM_FIRST_TOKEN_MS / 1000, token_delay_s=LLM_WORD_MS / 1000) as chat, \
            FakeSerper(lambda q: [("Dask weather", "weather", "Forecast for Dask.")], {"weather": WEATHER}, delay_s=SERPER_MS / 1000) as serper:
        os.makedirs(os.path.join(tmp, "docs"))
        docs = write_documents(os.path.join(tmp, "docs"), files, 10)
        model = build_tiny_embedder(os.path.join(tmp, "model"), words=WORDS + FACT.replace(".", "").split(),
                                    **({} if args.quick else DEFAULT_SIZE))
        results = {"machine": machine(), "model": "tiny random" if args.quick else "random weights, MiniLM-L12 shape",
                   "serper_ms": SERPER_MS, "llm_first_token_ms": LLM_FIRST_TOKEN_MS,
                   "retrieval": retrieval(docs, os.path.join(tmp, "index"), model, 5 if args.quick else 50),
                   "per_turn": per_turn(chat.url, serper, docs, os.path.join(tmp, "index"), model, turns)}
    print(f"machine: {results['machine']}; embedder: {results['model']}")
    r = results["retrieval"]
    print(f"\nretrieval over {r['passages']} passages: index built in {r['index_build_s']} s, re-opened in {r['index_reopen_s']} s")
    print("\n| per query | p50 ms | p95 ms |\n|---|---|---|")
    for key in ("bm25", "embed", "dense", "search"):
        print(f"| {key} | {r[key + '_ms']['p50']} | {r[key + '_ms']['p95']} |")
    print("\n| setup: question | first audio p50 | p95 | answer audio p50 | p95 | lookup p50 |\n|---|---|---|---|---|---|")
    for name, row in results["per_turn"].items():
        lookup = row["lookup_ms"]["p50"] if row["lookup_ms"] else "-"
        print(f"| {name} | {row['first_audio_ms']['p50']} | {row['first_audio_ms']['p95']} | "
              f"{row['answer_audio_ms']['p50']} | {row['answer_audio_ms']['p95']} | {lookup} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
