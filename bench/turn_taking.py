"""Turn-taking benchmark: how each end-of-turn policy answers, cuts off and is cut off, on speech it did not see.

    .venv/bin/python bench/turn_taking.py           # six policies: about an hour on 2 CPU cores
    .venv/bin/python bench/turn_taking.py --quick   # a smoke run (the test suite runs it)
    .venv/bin/python bench/turn_taking.py --probe   # what Smart Turn says of each question at each silence

The real server (tests/serve_test_models.py, fixed-latency ASR and TTS, the fake chat API: bench/run.py's setup)
hears the fixtures of bench/fixtures/turn_taking/ (bench/make_turn_fixtures.py: espeak-ng, English and Mandarin,
several voices and rates) from a real-time microphone, as a user would say them:

- complete questions: voice-to-voice (end of the voice -> first answer audio), median and p95;
- questions with a thinking pause (300-1200 ms) in the middle: how often the server takes the pause for the end
  of the turn and starts to answer half a question (a false cut-off), and how often the question was answered
  whole all the same (the LLM's last request asked both halves as one question: --continue_turn_ms);
- backchannels ("uh-huh", "嗯"), coughs and knocks one second into a long answer: how often the answer goes on
  (the fixed ASR hears each fixture's own words: --asr_transcripts);
- real interruptions one second into a long answer: the time from the voice to the answer's stop (the pause event,
  or the interrupt where it does not pause), and whether it was then cut off;
- LLM requests per thing said: a cut-off, or a backchannel taken for a turn, costs a request; and, with
  --speculate, the requests spent on tentative answers that were dropped because the user spoke on, per thing said.
Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from run import (LLM_FIRST_TOKEN_MS, LLM_WORD_MS, LONG_ANSWER, MODEL_FLAGS, SHORT_ANSWER, BenchClient,  # noqa: E402
                 machine, pct, s2s, table, write_results)
from client import load_wav, voiced_span  # noqa: E402
from fakes import FakeChatAPI  # noqa: E402
from server_process import ServerProcess  # noqa: E402

FIXTURES = os.path.join(BENCH, "fixtures", "turn_taking")
POLICIES = {  # name: the server's flags
    "silence_600": ["--no-speculate"],
    # any speech over an answer cuts it off, as before it could pause
    "silence_600_stop": ["--no-speculate", "--backchannels", ""],
    "silence_1200": ["--no-speculate", "--min_silence_ms", "1200"],  # CleanS2S's end-of-turn wait
    # asked at 200, 500, 800... ms of silence, 2 s at most
    "smart_turn": ["--no-speculate", "--turn_detection", "smart_turn"],
    "smart_turn_once": ["--no-speculate", "--turn_detection", "smart_turn", "--turn_reask_ms", "0"],  # asked once a pause
    "smart_turn_once_1200": ["--no-speculate", "--turn_detection", "smart_turn", "--turn_reask_ms", "0",
                             "--max_turn_silence_ms", "1200"],
    # answering starts at a pause of --speculate_pause_ms, and goes out when the turn ends
    "silence_600_speculate": ["--speculate"],
    "smart_turn_speculate": ["--speculate", "--turn_detection", "smart_turn"],
}
SETTLE_S = 2.6  # after the voice ends, every policy has ended the turn (smart_turn's longest silence is 2 s)
PROBE_SILENCE_MS = (200, 500, 800, 1100, 1400)  # where the server asks with the default flags (200, then every 300)


class TurnTakingBench:
    def __init__(self, api: FakeChatAPI, fixtures: list):
        self.api, self.fixtures = api, fixtures
        self.audio = {f["file"]: load_wav(os.path.join(FIXTURES, f["file"])) for f in fixtures}

    def of(self, kind: str) -> list:
        return [f for f in self.fixtures if f["kind"] == kind]

    def run(self, flags: list) -> dict:
        srv = ServerProcess(*MODEL_FLAGS, "--asr_transcripts", FIXTURES, "--lm_model_url", self.api.url, *flags,
                            env={"LLM_API_KEY": "bench"})
        requests_before = len(self.api.chat_requests())
        try:
            result = asyncio.run(self.talk(srv))
        finally:
            srv.stop()
        asked = len(self.of("question")) + len(self.of("paused")) + len(self.of("backchannel")) + \
            len(self.of("noise")) + len(self.of("interruption"))
        result["llm_requests_per_question"] = round((len(self.api.chat_requests()) - requests_before) / asked, 2)
        result["discarded_llm_requests_per_question"] = round(result.pop("llm_requests_discarded") / asked, 2)
        return result

    async def talk(self, srv: ServerProcess) -> dict:
        async with BenchClient(srv.recv_url, srv.send_url) as c:
            self.api.answer = lambda messages: SHORT_ANSWER
            questions = [await self.question(c, f) for f in self.of("question")]
            paused = [await self.question(c, f) for f in self.of("paused")]
            self.api.answer = lambda messages: LONG_ANSWER
            kept = [await self.during_answer(c, f) for f in self.of("backchannel") + self.of("noise")]
            cuts = [await self.during_answer(c, f) for f in self.of("interruption")]
            turns = {r.data["turn"]: r.data["metrics"] for r in c.events("metrics")}  # (a turn cut off while it played: twice)
        v2v = [q["voice_to_voice_ms"] for q in questions if q["voice_to_voice_ms"] is not None]
        return {"llm_requests_discarded": sum(m.get("llm_requests_discarded", 0) for m in turns.values()),
                "answers_speculated": sum(bool(q["speculated"]) for q in questions + paused),
                "voice_to_voice_ms": {"p50": pct(v2v, 50), "p95": pct(v2v, 95)},
                "complete_questions_cut": sum(q["turns"] > 1 for q in questions), "complete_questions": len(questions),
                "paused_cut": sum(q["turns"] > 1 for q in paused), "paused": len(paused),
                "paused_answered_whole": sum(q["whole"] for q in paused),
                "answer_went_on": sum(not k["interrupted"] for k in kept), "backchannels_and_noises": len(kept),
                "paused_ms": {"p50": pct([k["paused_ms"] for k in kept if k["paused_ms"] is not None], 50),
                              "max": max((k["paused_ms"] for k in kept if k["paused_ms"] is not None), default=None)},
                "stop_ms": {"p50": pct([c_["stop_ms"] for c_ in cuts if c_["stop_ms"] is not None], 50),
                            "max": max((c_["stop_ms"] for c_ in cuts if c_["stop_ms"] is not None), default=None)},
                "interruptions_stopped": sum(c_["interrupted"] for c_ in cuts), "interruptions": len(cuts),
                "results": {"questions": questions, "paused": paused, "during_answer": kept, "interruptions": cuts}}

    async def question(self, c: BenchClient, f: dict) -> dict:
        """Say it; every turn it started has ended SETTLE_S after the voice; the last one's answer is the answer."""
        onset, end = c.mic.say(self.audio[f["file"]])
        await asyncio.sleep(max(0.0, end + SETTLE_S - time.monotonic()))
        turns = [r.data["turn"] for r in c.events("speech_start") if r.t >= onset]
        row = {"file": f["file"], "turns": len(turns), "voice_to_voice_ms": None, "speculated": None, "whole": False}
        if turns:
            metrics = await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == turns[-1], 30)
            row["speculated"] = metrics.data["metrics"].get("speculated")
            asked = self.api.chat_requests()[-1]["messages"][-1]["content"]  # what the last answer answered
            row["whole"] = s2s.plain(asked) == s2s.plain(f["text"])  # (the text has " ... " for the pause)
            if len(turns) > 1:  # how much of the answer to the first half played before the user spoke on
                row["answer_heard_ms"] = heard_ms(c, turns[0])
            first = c.audio(turns[-1])  # none when the ASR heard no words (nothing to answer)
            row["voice_to_voice_ms"] = round((first[0].t - end) * 1000, 1) if first else None
            await asyncio.sleep(max(0.0, c.playback_end(turns[-1]) - time.monotonic()) + 0.3)  # the user listens
        return row

    async def during_answer(self, c: BenchClient, f: dict) -> dict:
        """Ask a question; one second into its answer, say (or make) the sound; did the answer stop, and how soon?"""
        onset, _ = c.mic.say(self.audio[self.of("question")[0]["file"]])
        turn = (await c.wait_for(lambda r: r.kind == "speech_start" and r.t >= onset, 15)).data["turn"]
        first = await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == turn, 15)
        await asyncio.sleep(max(0.0, first.t + 1.0 - time.monotonic()))
        sound_onset, sound_end = c.mic.say(self.audio[f["file"]])
        await asyncio.sleep(max(0.0, sound_end + SETTLE_S - time.monotonic()))
        cut = [r for r in c.events("interrupt") if r.data["turn"] == turn]
        stopped = [r for r in c.received if r.kind in ("pause", "interrupt") and r.data["turn"] == turn]
        resumed = [r for r in c.events("resume") if r.data["turn"] == turn]
        row = {"file": f["file"], "interrupted": bool(cut), "paused": any(r.kind == "pause" for r in stopped),
               "stop_ms": round((stopped[0].t - sound_onset) * 1000, 1) if cut else None,
               "answer_heard_ms": heard_ms(c, turn) if cut else None,
               # how long the answer held for it: the gap the user hears (its voice, the end-of-turn wait, the ASR)
               "paused_ms": round((resumed[0].t - stopped[0].t) * 1000, 1) if resumed else None}
        await self.quiet(c)
        return row

    async def quiet(self, c: BenchClient) -> None:
        """Wait out whatever is still answering, so the next item starts in silence."""
        last = max((r.data["turn"] for r in c.events("speech_start")), default=None)
        if last is not None:
            await c.wait_for(lambda r: r.kind in ("metrics", "interrupt") and r.data["turn"] == last, 60)
            await asyncio.sleep(max(0.0, c.playback_end(last) - time.monotonic()) + 0.3)


def heard_ms(c: BenchClient, turn: int) -> float:
    """A turn cut off: how much of its answer had played when the speech that cut it began (its metrics)."""
    return [r.data["metrics"] for r in c.events("metrics") if r.data["turn"] == turn][-1]["answer_heard_ms"]


def report(results: dict) -> str:
    rows = []
    for name, r in results["policies"].items():
        rows.append([name, r["voice_to_voice_ms"]["p50"], r["voice_to_voice_ms"]["p95"],
                     f"{r['paused_cut']}/{r['paused']}", f"{r['paused_answered_whole']}/{r['paused']}",
                     f"{r['complete_questions_cut']}/{r['complete_questions']}",
                     f"{r['answer_went_on']}/{r['backchannels_and_noises']}", r["paused_ms"]["p50"], r["stop_ms"]["p50"],
                     f"{r['interruptions_stopped']}/{r['interruptions']}", r["llm_requests_per_question"],
                     r["discarded_llm_requests_per_question"],
                     f"{r['answers_speculated']}/{r['complete_questions'] + r['paused']}"])
    return table(rows, ["policy", "voice-to-voice p50 (ms)", "p95", "paused questions cut off", "answered whole all the same",
                        "whole questions cut",
                        "answer goes on after a backchannel or noise", "it paused for, p50 (ms)",
                        "stop on a real interruption, p50 (ms)",
                        "interruptions that stopped it", "LLM requests per thing said",
                        "of which discarded speculations", "answers that were speculated"])


def probe(fixtures: list) -> dict:
    """Smart Turn's P(complete) for each whole question (after its voice) and each question with a pause (at the
    pause), followed by each of PROBE_SILENCE_MS of silence: the model alone, no server."""
    model = s2s.SmartTurn()
    model.setup()
    found = {}
    for f in fixtures:
        if f["kind"] not in ("question", "paused"):
            continue
        audio = load_wav(os.path.join(FIXTURES, f["file"]))
        said = audio[:round(f["pause_at_s"] * s2s.SAMPLE_RATE)] if f["kind"] == "paused" else audio
        said = said[:voiced_span(said)[1]]
        found[f["file"]] = [round(model.probability(np.concatenate([said, np.zeros(s2s.SAMPLE_RATE * ms // 1000, np.float32)])), 2)
                            for ms in PROBE_SILENCE_MS]
    print(table([[name, *probs] for name, probs in found.items()], ["fixture", *(f"{ms} ms" for ms in PROBE_SILENCE_MS)]))
    return found


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench/turn_taking.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: smart_turn_speculate, one fixture of four kinds")
    p.add_argument("--policies", default="silence_600,silence_600_stop,silence_1200,smart_turn,silence_600_speculate,smart_turn_speculate",
                   help=f"policies to run, comma-separated, of {','.join(POLICIES)}")
    p.add_argument("--probe", action="store_true", help="print Smart Turn's P(complete) for each question at each silence, and stop")
    p.add_argument("--out", default=os.path.join("bench", "results", "turn-taking-latest.json"), help="JSON written here")
    args = p.parse_args(argv)
    with open(os.path.join(FIXTURES, "fixtures.json"), encoding="utf-8") as f:
        fixtures = json.load(f)
    if args.probe:
        return probe(fixtures)
    names = args.policies.split(",")
    if not set(names) <= set(POLICIES):
        p.error(f"--policies: choose from {','.join(POLICIES)}")
    if args.quick:  # the turn model's path and speculation's (silence's is bench/run.py's), one fixture of four kinds
        fixtures = [next(f for f in fixtures if f["kind"] == kind) for kind in ("question", "paused", "backchannel", "interruption")]
        names = ["smart_turn_speculate"]
    t0 = time.monotonic()
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "quick": args.quick,
               "fixtures": len(fixtures), "policies": {}}
    with FakeChatAPI(first_token_delay_s=LLM_FIRST_TOKEN_MS / 1000, token_delay_s=LLM_WORD_MS / 1000) as api:
        bench = TurnTakingBench(api, fixtures)
        for name in names:
            print(f"{name} ...", flush=True)
            results["policies"][name] = bench.run(POLICIES[name])
    results["bench_seconds"] = round(time.monotonic() - t0)
    print(f"\n{results['date']}, {results['machine']}\n")
    print(report(results))
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
