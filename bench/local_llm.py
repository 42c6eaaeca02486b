"""Which local chat model answers in time on a CPU: the default LLM when no API key is set.

    python bench/local_llm.py                    # Qwen2.5 0.5B and 1.5B Instruct, bfloat16 and float32, on the CPU

Each model loads through the server's own TransformersLLMHandler from the server's flags, with real weights when
they are on this machine, else random weights of the real architecture and size (bench/random_weights.py; the
compute does not depend on the weight values). One conversation of five questions runs through it, as the server
runs one: the history of earlier turns in the prompt, the prefix cache on. For the last turn it reports the time to
the first token with the cache (only the new question is computed: the usual turn) and without it (the whole prompt:
the first turn after a restart, or after the cache let the conversation go), the decoding speed, and the real-time
factor of the answer (generation time / its speaking time). An answer is spoken as it is written, so a model with a
real-time factor above 1 makes the listener wait between sentences.

Prints a markdown table and writes JSON. Every figure is labelled with where it ran.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Optional

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from random_weights import QWEN25  # noqa: E402
from real_models import find_weights, llm_once, load, machine, quiet_libraries, release, s2s  # noqa: E402
from run import table, write_results  # noqa: E402

QUESTIONS = ["What is the weather like in Paris today, and should I take an umbrella?",
             "明天去北京，需要带什么衣服？",
             "Can you suggest a quick dinner with rice and eggs?",
             "帮我想一个周末的安排吧。",
             "And how long does that take?"]
REPEATS = 3  # runs of the last turn without the cache; the median is reported


def conversation(handler: s2s.TransformersLLMHandler) -> dict:
    """The turns of one conversation with the prefix cache; then the last turn's prompt REPEATS times without it."""
    messages, runs = [{"role": handler.system_role, "content": handler.system_prompt}], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        runs.append(llm_once(handler, messages))
        messages.append({"role": "assistant", "content": runs[-1].answer})
    messages.pop()  # the last turn's prompt again
    cache, handler.prefixes = handler.prefixes, None
    try:
        cold = [llm_once(handler, messages).first_token_ms for _ in range(REPEATS)]
    finally:
        handler.prefixes = cache
    last = runs[-1]
    return {"prompt_tokens": last.prompt_tokens, "first_token_ms": last.first_token_ms,
            "first_token_uncached_ms": statistics.median(cold),
            "tokens_per_s": round(statistics.median(r.tokens_per_s for r in runs), 1),
            "rtf": round(statistics.median(r.rtf for r in runs), 3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/local_llm.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(QWEN25), help="hub ids (random weights for these) or directories")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32", "float16"],
                   help="precisions to try")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--answer_tokens", type=int, default=40, help="tokens in each answer (random weights write this many)")
    p.add_argument("--out", default=os.path.join("bench", "results", "local_llm.json"), help="JSON written here")
    return p


def main(argv: Optional[list] = None) -> dict:
    args = build_parser().parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: real weights if cached, random ones otherwise
    quiet_libraries()
    t0 = time.monotonic()
    rows = []
    for model in args.models:
        weights = find_weights("LLM", model, "config.json")
        for dtype in args.dtypes:
            flags = ["--llm", "transformers", "--lm_model_name", weights.path, "--lm_dtype", dtype,
                     "--device", args.device, "--lm_max_new_tokens", str(args.answer_tokens), "--client_dir", ""]
            handler = s2s.TransformersLLMHandler.from_args(s2s.parse_args(flags))
            info = load("LLM", model, weights.kind, handler)
            print(f"{model} {dtype}: loaded in {info.load_s} s; {len(QUESTIONS)} turns ...", flush=True)
            rows.append({"model": model, "weights": weights.kind, "params": info.params, "dtype": dtype,
                         "load_s": info.load_s, **conversation(handler)})
            del handler
            release()
    results = {"date": datetime.date.today().isoformat(), "machine": machine(args.device), "device": args.device,
               "answer_tokens": args.answer_tokens, "turns": len(QUESTIONS), "models": rows,
               "bench_seconds": round(time.monotonic() - t0)}
    print()
    print(table([[r["model"], r["dtype"], r["prompt_tokens"], r["first_token_ms"], r["first_token_uncached_ms"],
                  r["tokens_per_s"], r["rtf"]] for r in rows],
                ["model", "dtype", "prompt tokens", "first token ms (cached)", "first token ms (whole prompt)",
                 "tokens/s", "RTF"]))
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
