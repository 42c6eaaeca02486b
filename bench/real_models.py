"""Real models: each model alone and the voice-to-voice breakdown, with the real model code paths.

    python bench/real_models.py                  # SenseVoiceSmall, Qwen2.5-0.5B-Instruct, espeak-ng; on the GPU if any
    python bench/real_models.py --tiny --turns 2 # the same code paths on the tiny test models: seconds, on any CPU

Every model loads through the server's own handler class (FunASRHandler, TransformersLLMHandler, the TTS handler)
with real weights when they are on this machine (a directory, or a hub id already in the Hugging Face or ModelScope
cache; nothing is ever downloaded), else with random weights of the real architecture and size, built once into
bench/.models/ (bench/random_weights.py). Compute does not depend on the weight values, so the timings hold for the
real models; what the models say does not.

1. Each model alone, warmed up, median of REPEATS runs: ASR latency and real-time factor on ~4 and ~6 s utterances;
   LLM time to first token, decoding speed and time to the first speakable chunk of an answer of --answer_tokens
   tokens; TTS time to first audio and real-time factor of a sentence.
2. Voice to voice: the real server in a subprocess with the same models and flags, and a client with a real-time
   microphone (bench/run.py) that speaks --turns turns and listens to each answer: p50 and p95 of each part.

Prints markdown tables and writes JSON. Every figure is labelled with where it ran: "CPU" or "GPU <name>".
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import gc
import importlib
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import psutil

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [BENCH, ROOT, os.path.join(ROOT, "tests")]

import s2s_server_pipeline as s2s  # noqa: E402
from client import load_wav  # noqa: E402
from random_weights import QUESTION, QWEN25, build_qwen_random, build_sensevoice_small_random  # noqa: E402
from run import PARTS, BenchClient, cpu_name, spread, table, write_results  # noqa: E402
from server_process import ServerProcess  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MODELS_DIR = os.path.join(BENCH, ".models")  # random-weight models, built once (not in git)
SENSEVOICE_ID, QWEN_ID = "iic/SenseVoiceSmall", s2s.DEFAULT_LOCAL_LLM  # the server's default LLM
RANDOM_BUILDS = {  # the models random weights can stand in for: hub id -> (the cache folder, the builder)
    **{name: ("sensevoice-small-random", build_sensevoice_small_random)
       for name in (SENSEVOICE_ID, "FunAudioLLM/SenseVoiceSmall")},
    **{name: (name.split("/")[1].lower() + "-random", functools.partial(build_qwen_random, model_id=name))
       for name in QWEN25},
}

UTTERANCES = ("en_question.wav", "zh_question.wav")  # ASR alone; the spoken turns say the first
SENTENCE = "Of course, I can help with that. Here is a short answer for you."  # the TTS alone: ~4 s of speech
REPEATS = 3  # runs of each model alone after its warm-up; the median is reported
SPEECH_CHARS_PER_S = 15  # a typical speaking rate (a Chinese character counts twice): the LLM's real-time factor
SERVER_START_S = 900  # the server listens once its models are loaded and warmed up: minutes for big models on a CPU
TURN_TIMEOUT_S = 300  # one spoken turn, until the whole answer is sent
TINY_ANSWER_TOKENS = 8  # --tiny: short answers, so each turn's answer plays for a few seconds only


# ------------------------------------------------------------------------------------------------
# Where the weights come from
# ------------------------------------------------------------------------------------------------

@dataclass
class Weights:
    path: str  # local directory handed to the handler
    kind: str  # "real", "random (real size)" or "random (tiny test model)"


def modelscope_dirs(model_id: str) -> list:
    """Where ModelScope (and FunASR, which downloads through it) keeps a model, across its versions."""
    roots = {os.environ.get("MODELSCOPE_CACHE", ""), os.path.join(os.path.expanduser("~"), ".cache", "modelscope")}
    names = {model_id, model_id.replace(".", "___")}  # ModelScope writes a dot in a name as "___"
    return [os.path.join(root, sub, name) for root in roots if root for sub in ("hub/models", "hub", "models", "")
            for name in names]


def huggingface_dir(model_id: str) -> Optional[str]:
    """The Hugging Face cache's copy of a hub id, without any network access; None if it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        return snapshot_download(model_id, local_files_only=True)
    except (HFValidationError, LocalEntryNotFoundError):
        return None


def local_copy(model: str, marker: str) -> Optional[str]:
    """`model` (a directory or a hub id) as a directory on this machine that holds the file `marker`."""
    for path in (os.path.expanduser(model), *modelscope_dirs(model), huggingface_dir(model)):
        if path and os.path.isfile(os.path.join(path, marker)):
            return os.path.abspath(path)  # the server runs it too
    return None


def find_weights(stage: str, model: str, marker: str) -> Weights:
    """Real weights if they are here, else random ones of the same architecture and size (built on first use)."""
    path = local_copy(model, marker)
    if path:
        return Weights(path, "real")
    if model not in RANDOM_BUILDS:
        raise SystemExit(f"{stage} model {model}: not on this machine, and random weights are built only for "
                         f"{', '.join(sorted(RANDOM_BUILDS))}")
    folder, build = RANDOM_BUILDS[model]
    path = os.path.join(MODELS_DIR, folder)
    if not os.path.isdir(path):
        print(f"{stage}: {model} is not on this machine; building random weights of its architecture and size "
              f"into {os.path.relpath(path, ROOT)} (once) ...", flush=True)
        build(path)
    return Weights(path, "random (real size)")


def tiny_weights(workdir: str) -> tuple:
    """The tiny test models (tests/tiny_funasr.py, tests/tiny_chat_model.py), built in seconds."""
    from tiny_chat_model import build_tiny_chat_model
    from tiny_funasr import build_sensevoice_small
    kind = "random (tiny test model)"
    return (Weights(build_sensevoice_small(os.path.join(workdir, "asr")), kind),
            Weights(build_tiny_chat_model(os.path.join(workdir, "llm")), kind))


def cosyvoice_problem(args: argparse.Namespace) -> Optional[str]:
    """Why CosyVoice cannot run here, or None when it can."""
    if not args.tts_model_name or not os.path.isdir(args.tts_model_name):
        return "--tts_model_name names no directory of CosyVoice weights"
    if args.cosyvoice_dir:  # as the server does with --cosyvoice_dir
        sys.path[:0] = [args.cosyvoice_dir, os.path.join(args.cosyvoice_dir, "third_party", "Matcha-TTS")]
    try:
        importlib.import_module("cosyvoice")
    except ImportError as exc:
        return f"the cosyvoice package is not importable: {exc}"
    return None


def tts_flags(args: argparse.Namespace) -> tuple:
    """The server's TTS flags, and a note when CosyVoice was asked for but espeak-ng runs instead."""
    if args.tts != "cosyvoice":
        return ["--tts", "espeak"], ""
    problem = cosyvoice_problem(args)
    if problem:
        return ["--tts", "espeak"], f"CosyVoice not run ({problem}): espeak-ng instead"
    flags = ["--tts", "cosyvoice", "--tts_model_name", args.tts_model_name, "--ref_dir", args.ref_dir,
             *(["--tts_text_stream"] if args.tts_text_stream else [])]
    return flags + (["--cosyvoice_dir", args.cosyvoice_dir] if args.cosyvoice_dir else []), ""


# ------------------------------------------------------------------------------------------------
# Each model alone
# ------------------------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    stage: str  # ASR, LLM or TTS
    model: str  # what was asked for: hub id or directory
    architecture: str  # the class that runs
    weights: str  # real, random of the real size, random tiny test model, or none (espeak-ng is rule-based)
    params: Optional[int]
    device: str
    dtype: str
    load_s: float
    warmup_s: float

    def line(self) -> str:
        weights = f"{self.weights} weights, {self.params / 1e6:.1f} M parameters" if self.params else "no weights"
        return f"{self.stage}: {self.architecture} ({self.model}), {weights}, {self.device}, {self.dtype}"


@dataclass
class ASRRun:
    utterance: str
    audio_s: float
    latency_ms: float  # transcribe() of the whole utterance
    rtf: float  # latency / audio duration
    text: str


@dataclass
class LLMRun:
    prompt_tokens: int
    tokens: int  # generated
    first_token_ms: float  # request -> first text piece
    first_chunk_ms: float  # request -> first speakable chunk (the whole answer if it has no break)
    tokens_per_s: float  # decoding, after the first token
    rtf: float  # generation time / the answer's speaking time at SPEECH_CHARS_PER_S
    answer: str


@dataclass
class TTSRun:
    text: str
    first_audio_ms: float
    audio_s: float
    rtf: float  # synthesis time / audio duration


@dataclass
class ModelResult:
    info: ModelInfo
    runs: list  # ASRRun, LLMRun or TTSRun


def torch_modules(obj: Any, depth: int = 3) -> list:
    """The torch modules a handler holds, a few attributes deep (FunASR and CosyVoice wrap theirs)."""
    import torch
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if depth == 0 or not hasattr(obj, "__dict__") or isinstance(obj, type):
        return []
    return [m for value in vars(obj).values() for m in torch_modules(value, depth - 1)]


def describe_weights(handler: Any) -> tuple:
    """(parameter count, device, dtype) of a handler's model; (None, "cpu", "-") for one without torch weights."""
    params = {id(p): p for m in torch_modules(handler) for p in m.parameters()}
    if not params:
        return None, "cpu", "-"
    first = next(iter(params.values()))
    return sum(p.numel() for p in params.values()), str(first.device), str(first.dtype).replace("torch.", "")


def architecture(handler: Any) -> str:
    """The model class that runs: FunASR's model, the transformers model, CosyVoice's family, or espeak-ng."""
    if isinstance(handler, s2s.FunASRHandler):
        return type(handler.model.model).__name__
    if isinstance(handler, s2s.TransformersLLMHandler):
        return type(handler.model).__name__
    return getattr(handler, "family", "espeak-ng")


def load(stage: str, model: str, weights: str, handler: Any) -> ModelInfo:
    """setup() and warmup(), timed, as the server's load() runs them; print one line about the model."""
    t0 = time.monotonic()
    handler.setup()
    t1 = time.monotonic()
    handler.warmup()
    t2 = time.monotonic()
    params, device, dtype = describe_weights(handler)
    info = ModelInfo(stage, model, architecture(handler), weights if params else "none", params, device, dtype,
                     round(t1 - t0, 2), round(t2 - t1, 2))
    print(info.line(), flush=True)
    return info


def median_ms(seconds: list) -> float:
    return round(statistics.median(seconds) * 1000, 1)


def asr_run(handler: s2s.ASRHandler, utterance: str) -> ASRRun:
    audio = load_wav(os.path.join(FIXTURES, utterance))
    seconds, text = [], ""
    for _ in range(REPEATS):
        t0 = time.monotonic()
        text = handler.transcribe(audio)
        seconds.append(time.monotonic() - t0)
    audio_s = len(audio) / s2s.SAMPLE_RATE
    rtf = statistics.median(seconds) / audio_s
    return ASRRun(utterance, round(audio_s, 2), median_ms(seconds), round(rtf, 3), text)


def llm_once(handler: s2s.TransformersLLMHandler, messages: list) -> LLMRun:
    """One answer, streamed as the server streams it, cut into speakable chunks as the server cuts it."""
    # Time after each forward pass: the prompt's (with the first token), then one per further token. On CUDA a forward
    # returns before the GPU is done, but generate() waits for each token before the next forward, so the spacing of
    # the steps is still the time per token.
    steps = []
    hook = handler.model.register_forward_hook(lambda *_: steps.append(time.monotonic()))
    chunker, pieces = s2s.SpeakableChunker(handler.first_chunk_min_chars), []
    first_token = first_chunk = None
    t0 = time.monotonic()
    try:
        for piece in handler.stream(messages):
            first_token = first_token or time.monotonic()
            if first_chunk is None and chunker.push(piece):
                first_chunk = time.monotonic()
            pieces.append(piece)
    finally:
        hook.remove()
    end = time.monotonic()
    answer = "".join(pieces)
    prompt = handler.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    decode = (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else 0.0
    speech_s = max(s2s.speech_length(answer), 1) / SPEECH_CHARS_PER_S
    return LLMRun(prompt_tokens=len(prompt["input_ids"]), tokens=len(steps),
                  first_token_ms=round(((first_token or end) - t0) * 1000, 1),
                  first_chunk_ms=round(((first_chunk or end) - t0) * 1000, 1),
                  tokens_per_s=round(decode, 1), rtf=round((end - t0) / speech_s, 3), answer=answer)


def llm_run(handler: s2s.TransformersLLMHandler) -> LLMRun:
    """The median run of REPEATS (by time to first token), each figure from that same run."""
    messages = s2s.ChatHistory(0).messages(handler.system_role, handler.system_prompt, QUESTION)
    runs = sorted((llm_once(handler, messages) for _ in range(REPEATS)), key=lambda r: r.first_token_ms)
    return runs[len(runs) // 2]


def tts_run(handler: s2s.TTSHandler, text: str) -> TTSRun:
    firsts, totals, samples = [], [], 0
    voice = handler.choose_voice()  # None for espeak-ng, a reference voice for CosyVoice
    for _ in range(REPEATS):
        t0, first, samples = time.monotonic(), None, 0
        for audio in handler.synthesize(text, voice):
            first = first or time.monotonic()
            samples += len(audio)
        firsts.append((first or time.monotonic()) - t0)
        totals.append(time.monotonic() - t0)
    audio_s = samples / s2s.SAMPLE_RATE
    return TTSRun(text, median_ms(firsts), round(audio_s, 2), round(statistics.median(totals) / max(audio_s, 1e-9), 3))


def release() -> None:
    """Free a model that is no longer referenced before the next one loads."""
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_alone(server_args: argparse.Namespace, names: dict, weights: dict) -> list:
    """Each model built from the server's flags, loaded, warmed up and measured on its own, then freed."""
    stages = (("ASR", s2s.ASR_HANDLERS[server_args.asr], lambda h: [asr_run(h, u) for u in UTTERANCES]),
              ("LLM", s2s.LLM_HANDLERS[server_args.llm], lambda h: [llm_run(h)]),
              ("TTS", s2s.TTS_HANDLERS[server_args.tts], lambda h: [tts_run(h, SENTENCE)]))
    results = []
    for stage, handler_class, measure in stages:
        handler = handler_class.from_args(server_args)
        results.append(ModelResult(load(stage, names[stage], weights[stage], handler), measure(handler)))
        del handler
        release()
    return results


# ------------------------------------------------------------------------------------------------
# Voice to voice, through the real server
# ------------------------------------------------------------------------------------------------

STAGES = ("asr_ms", "llm_first_token_ms", "llm_first_chunk_ms", "tts_first_audio_ms")  # the models' own parts


@dataclass
class SpokenTurn:
    voice_to_voice_ms: float  # end of the user's voice -> first answer audio received
    overhead_ms: float  # voice_to_voice - end-of-turn wait - the stages' own measured times (STAGES)
    edge_ms: float  # of the overhead, outside the server: the VAD's decision trailing the voice, mic frame, network
    metrics: dict  # the server's own breakdown of the turn
    audio_s: float  # the answer's length


def spoken_turns(flags: list, turns: int) -> list:
    """Start the server with `flags`; speak `turns` questions, one after the other, each answer heard to its end."""
    question = load_wav(os.path.join(FIXTURES, UTTERANCES[0]))
    srv = ServerProcess(*flags, ready_timeout_s=SERVER_START_S)
    try:
        async def talk() -> list:
            async with BenchClient(srv.recv_url, srv.send_url) as c:
                return [await c.turn(question, {}, timeout=TURN_TIMEOUT_S) for _ in range(turns)]
        results = asyncio.run(talk())
    except Exception:
        print("the server's log ends:\n" + "".join(srv.lines[-40:]), file=sys.stderr)
        raise
    finally:
        srv.stop()
    return [SpokenTurn(r.voice_to_voice_ms,
                       round(r.voice_to_voice_ms - r.metrics["eot_wait_ms"] - sum(r.metrics[k] for k in STAGES), 1),
                       r.edge_ms, r.metrics, r.audio_s) for r in results]


def alone_ms(models: list) -> dict:
    """What each part of a turn cost the model alone (part 1), to set beside the turns: the ASR on the utterance the
    turns say, the LLM on a short question without history."""
    asr, llm, tts = (m.runs[0] for m in models)
    return {"asr_ms": asr.latency_ms, "llm_first_token_ms": llm.first_token_ms,
            "llm_first_chunk_ms": round(llm.first_chunk_ms - llm.first_token_ms, 1),
            "tts_first_audio_ms": tts.first_audio_ms}


def summarize_turns(turns: list, alone: dict) -> dict:
    return {"turns": len(turns),
            "parts": {k: {**spread([t.metrics[k] for t in turns]), "alone": alone.get(k)} for k in PARTS},
            "voice_to_voice_ms": spread([t.voice_to_voice_ms for t in turns]),
            "overhead_ms": spread([t.overhead_ms for t in turns]),
            "edge_ms": spread([t.edge_ms for t in turns]),
            "results": [asdict(t) for t in turns]}


# ------------------------------------------------------------------------------------------------
# Machine, report
# ------------------------------------------------------------------------------------------------

def machine(device: str) -> dict:
    import torch
    info = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "os": f"{platform.system()} {platform.machine()}", "torch": torch.__version__}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30)
    info["label"] = f"GPU {info['gpu']}" if "gpu" in info else "CPU"
    return info


def models_report(models: list) -> str:
    rows = [[i["stage"], i["model"], i["architecture"], i["weights"],
             f"{i['params'] / 1e6:.1f} M" if i["params"] else None, i["device"], i["dtype"], i["load_s"], i["warmup_s"]]
            for i in (m["info"] for m in models)]
    return table(rows, ["stage", "model", "architecture", "weights", "parameters", "device", "dtype", "load s",
                        "warm-up s"])


def alone_report(models: list) -> str:
    asr, llm, tts = (m["runs"] for m in models)
    return "\n\n".join([
        table([[r["utterance"], r["audio_s"], r["latency_ms"], r["rtf"]] for r in asr],
              ["ASR: utterance", "audio s", "latency ms", "real-time factor"]),
        table([[r["prompt_tokens"], r["tokens"], r["first_token_ms"], r["first_chunk_ms"], r["tokens_per_s"], r["rtf"]]
               for r in llm], ["LLM: prompt tokens", "answer tokens", "first token ms", "first speakable chunk ms",
                               "tokens/s", "real-time factor"]),
        table([[len(r["text"]), r["first_audio_ms"], r["audio_s"], r["rtf"]] for r in tts],
              ["TTS: sentence characters", "first audio ms", "audio s", "real-time factor"])])


def turns_report(v: dict) -> str:
    rows = [[name, v["parts"][k]["alone"], v["parts"][k]["p50"], v["parts"][k]["p95"]] for k, name in PARTS.items()]
    rows.append(["**voice-to-voice** (end of speech → first audio received)", "", v["voice_to_voice_ms"]["p50"],
                 v["voice_to_voice_ms"]["p95"]])
    rows.append(["**overhead** (voice-to-voice − end-of-turn wait − the ASR, LLM and TTS parts)", "",
                 v["overhead_ms"]["p50"], v["overhead_ms"]["p95"]])
    rows.append(["of which: VAD decision after the voice ends, mic frame, network", "", v["edge_ms"]["p50"],
                 v["edge_ms"]["p95"]])
    return table(rows, ["", "model alone", "p50", "p95"])


def report(r: dict) -> str:
    m, label = r["machine"], r["machine"]["label"]
    gpu = f", {m['gpu_memory_gib']} GiB" if "gpu" in m else ""
    weights = ", ".join(sorted({x["info"]["weights"] for x in r["models"]} - {"none"}))
    note = f" {r['tts_note']}." if r["tts_note"] else ""
    return "\n".join([
        f"## Real models, {label}{gpu} (device {r['device']}; host {m['cpu']}, {m['cpu_cores']} cores, "
        f"{m['memory_gib']} GiB), {r['date']}", "",
        f"Weights: {weights}. Compute does not depend on the weight values; what random models say means "
        f"nothing.{note}",
        "", models_report(r["models"]), "",
        f"Each model alone, {label}: median of {REPEATS} runs after the warm-up.", "", alone_report(r["models"]), "",
        f"Voice to voice, {label}: {r['voice_to_voice']['turns']} spoken turns through the real server, answers of "
        f"at most {r['answer_tokens']} tokens, ms (model alone: from the table above).", "",
        turns_report(r["voice_to_voice"])])


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/real_models.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="torch device of the models: auto (cuda when present), cuda, cuda:1, cpu")
    p.add_argument("--asr_model", default=SENSEVOICE_ID,
                   help="FunASR model: a directory or a hub id already downloaded; random weights of SenseVoiceSmall's size otherwise")
    p.add_argument("--lm_model", default=QWEN_ID,
                   help="transformers chat model: a directory or a hub id already downloaded; random weights of the same size otherwise (Qwen2.5 0.5B and 1.5B Instruct)")
    p.add_argument("--lm_dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16",
                   help="precision of the LLM (the server's default)")
    p.add_argument("--lm_prefix_cache", type=int, default=None,
                   help="the server's --lm_prefix_cache: 0 makes every turn compute its whole prompt (default: the server's)")
    p.add_argument("--tts", choices=["espeak", "cosyvoice"], default="espeak",
                   help="TTS; cosyvoice runs only when the cosyvoice package imports and --tts_model_name is a directory, espeak otherwise")
    p.add_argument("--tts_model_name", default=None, help="--tts cosyvoice: directory of the CosyVoice weights")
    p.add_argument("--cosyvoice_dir", default=None, help="--tts cosyvoice: a clone of the CosyVoice repository, added to the import path")
    p.add_argument("--ref_dir", default="ref_audio", help="--tts cosyvoice: folder of reference voices with ref.json")
    p.add_argument("--tts_text_stream", action="store_true",
                   help="--tts cosyvoice: feed the LLM's text as it is written (the server's --tts_text_stream); run with and "
                        "without it to see which starts speaking sooner")
    p.add_argument("--turns", type=int, default=10, help="spoken turns through the server")
    p.add_argument("--answer_tokens", type=int, default=40,
                   help="most tokens in an answer, the server's --lm_max_new_tokens (random weights always write this many); "
                        f"at most {TINY_ANSWER_TOKENS} with --tiny")
    p.add_argument("--tiny", action="store_true", help="the tiny test models instead of real-size ones: a smoke run in seconds")
    p.add_argument("--out", default=os.path.join("bench", "results", "real_models.json"), help="JSON written here")
    return p


def quiet_libraries() -> None:
    """Warnings only, and no progress bars, from the libraries the models load with (the server logs as it does)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def server_flags(args: argparse.Namespace, asr: Weights, llm: Weights, device: str, tts: list) -> list:
    """The server's command line: the in-process measurements build their handlers from the same flags."""
    return ["--asr", "funasr", "--asr_model_name", asr.path, "--llm", "transformers", "--lm_model_name", llm.path,
            "--lm_dtype", args.lm_dtype, "--lm_max_new_tokens", str(args.answer_tokens), *tts, "--device", device,
            "--client_dir", "", *([] if args.lm_prefix_cache is None else ["--lm_prefix_cache", str(args.lm_prefix_cache)]),
            # Each answer starts at the turn's end, so every model's time shows in the breakdown; by default the server
            # starts it at a pause, hiding up to the end-of-turn wait of it (bench/turn_taking.py measures that).
            "--no-speculate"]


def main(argv: Optional[list] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.answer_tokens = min(args.answer_tokens, TINY_ANSWER_TOKENS)
    os.environ["HF_HUB_OFFLINE"] = "1"  # here and in the server: a missing file fails instead of downloading
    quiet_libraries()
    t0 = time.monotonic()
    device = s2s.resolve_device(args.device)
    tts, tts_note = tts_flags(args)
    if tts_note:
        print(tts_note, flush=True)
    with tempfile.TemporaryDirectory(prefix="real-models-") as workdir:
        if args.tiny:
            asr, llm = tiny_weights(workdir)
        else:
            asr = find_weights("ASR", args.asr_model, "model.pt")
            llm = find_weights("LLM", args.lm_model, "config.json")
        flags = server_flags(args, asr, llm, device, tts)
        names = {"ASR": args.asr_model, "LLM": args.lm_model,
                 "TTS": args.tts_model_name if "cosyvoice" in tts else "espeak-ng"}
        if args.tiny:
            names.update(ASR="tests/tiny_funasr.py", LLM="tests/tiny_chat_model.py")
        weights = {"ASR": asr.kind, "LLM": llm.kind, "TTS": "real"}
        models = measure_alone(s2s.parse_args(flags), names, weights)
        print(f"voice to voice, {args.turns} turns ...", flush=True)
        turns = spoken_turns(flags, args.turns)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(device), "device": device,
               "tiny": args.tiny, "answer_tokens": args.answer_tokens, "lm_dtype": args.lm_dtype, "tts_note": tts_note,
               "lm_prefix_cache": args.lm_prefix_cache,
               "models": [asdict(m) for m in models],
               "voice_to_voice": summarize_turns(turns, alone_ms(models)),
               "bench_seconds": round(time.monotonic() - t0)}
    print("\n" + report(results))
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
