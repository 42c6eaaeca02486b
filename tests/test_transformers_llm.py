"""The local transformers LLM on a tiny random-weight Llama chat model built here (tests/tiny_chat_model.py):
token streaming through the real generate() path, a real stop mid-generation, the prefix cache, and the server with
no LLM flag at all answering through the default local model."""
import asyncio
import copy
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from client import ExtendedClient
from conftest import ROOT, fixture
from server_process import ServerProcess
from tiny_chat_model import build_tiny_chat_model

import s2s_server_pipeline as s2s


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    h = s2s.TransformersLLMHandler(build_tiny_chat_model(str(tmp_path_factory.mktemp("llm"))), "cpu", "float32",
                                   temperature=0.0, max_tokens=24, compile=False, system_prompt="Be brief.")
    h.setup()
    h.warmup()
    return h


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, how are you?"}]


def test_streams_visible_text_token_by_token(llm):
    pieces = list(llm.stream(MESSAGES))
    assert len(pieces) >= 5 and "".join(pieces).strip()
    assert pieces == list(llm.stream(MESSAGES))  # greedy: the same answer again


def test_closing_the_stream_stops_generation_at_the_next_token(llm):
    forwards = []
    hook = llm.model.register_forward_hook(lambda *a: forwards.append(1))
    llm.max_tokens = 5000  # seconds of generation, if nothing stopped it
    try:
        stream = llm.stream(MESSAGES)
        got = [next(stream) for _ in range(3)]
        t0 = time.monotonic()
        stream.close()  # what a barge-in does to a stale turn
        closed_in = time.monotonic() - t0
    finally:
        llm.max_tokens = 24
        hook.remove()
    assert all(isinstance(p, str) for p in got)
    assert closed_in < 0.5 and len(forwards) < 30  # stopped after a few tokens, not drained to 5000


def test_through_the_llm_stage_logic_into_speakable_chunks(llm):
    class Session:  # just enough of a session for LLMHandler.process
        uid = "u"

        def __init__(self):
            self.history = s2s.ChatHistory(4)
            self.turns = {1: s2s.Turn(1, False, question="hi")}

        def turn_record(self, n):
            return self.turns[n]

        def is_current(self, n):
            return n == 1

        prompt, speaks = s2s.Session.prompt, s2s.Session.speaks

    chunks = list(llm.process(s2s.UserText(Session(), 1, "hi")))
    assert chunks[-1].last and "".join(c.text for c in chunks).strip()


def test_bfloat16_and_a_bad_model_path(tmp_path):
    h = s2s.TransformersLLMHandler(build_tiny_chat_model(str(tmp_path / "m")), "cpu", "bfloat16", 0.7, 8, False)
    h.setup()
    assert str(h.model.dtype) == "torch.bfloat16" and "".join(h.stream(MESSAGES))
    with pytest.raises(SystemExit, match="missing does not exist"):
        s2s.TransformersLLMHandler(str(tmp_path / "missing"), "cpu", "float32", 0.7, 8, False).setup()


def answer_and_prefill(h, messages):
    """The answer's text, and how many tokens the model computed before its first new token."""
    computed = []
    hook = h.model.register_forward_pre_hook(
        lambda module, args, kwargs: computed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        text = "".join(h.stream(messages))
    finally:
        hook.remove()
    return text, computed[0]


def prompt_len(h, messages):
    return len(h.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


@pytest.fixture
def cached_and_plain(llm):
    """The module's model twice: with an empty prefix cache, and with none."""
    cached, plain = copy.copy(llm), copy.copy(llm)
    cached.prefixes, plain.prefixes = s2s.PrefixCache(4), None
    return cached, plain


def test_a_later_turn_computes_only_its_new_tokens_and_answers_the_same(cached_and_plain):
    cached, plain = cached_and_plain
    messages = [{"role": "system", "content": "Be brief."}]
    for turn, question in enumerate(["hello there", "what is the weather like", "and tomorrow?"]):
        messages.append({"role": "user", "content": question})
        text, computed = answer_and_prefill(cached, messages)
        assert (text, prompt_len(plain, messages)) == answer_and_prefill(plain, messages)
        if turn:  # the history was computed on the turn before: only the new question is left
            assert computed <= prompt_len(plain, messages[-1:]) + 8 < prompt_len(plain, messages) / 2
        messages.append({"role": "assistant", "content": text})


def test_after_a_barge_in_the_next_turn_reuses_what_was_heard(cached_and_plain):
    cached, plain = cached_and_plain
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "tell me a long story"}]
    stream = cached.stream(messages)
    heard = "".join(next(stream) for _ in range(3))
    stream.close()  # the user cut in: the history keeps what was heard
    messages += [{"role": "assistant", "content": heard + s2s.INTERRUPTED_MARK}, {"role": "user", "content": "stop"}]
    text, computed = answer_and_prefill(cached, messages)
    assert text == answer_and_prefill(plain, messages)[0]
    assert computed <= prompt_len(plain, messages) - prompt_len(plain, messages[:2]) + 8  # the first prompt was reused


def test_a_new_conversation_shares_the_system_prompt_without_disturbing_another(cached_and_plain):
    cached, plain = cached_and_plain
    system = {"role": "system", "content": "You are a helpful voice assistant. Answer in one short sentence."}
    a = [system, {"role": "user", "content": "hello there"}]
    a.append({"role": "assistant", "content": answer_and_prefill(cached, a)[0]})
    b = [system, {"role": "user", "content": "good morning"}]
    text_b, computed_b = answer_and_prefill(cached, b)  # starts from a copy of the system prompt's part
    assert text_b == answer_and_prefill(plain, b)[0]
    assert computed_b <= prompt_len(plain, b) - prompt_len(plain, [system]) + 8
    a.append({"role": "user", "content": "and you?"})
    text_a, computed_a = answer_and_prefill(cached, a)  # conversation a's own cache is whole
    assert text_a == answer_and_prefill(plain, a)[0]
    assert computed_a <= prompt_len(plain, a[-1:]) + 8


def test_a_sliding_window_model_runs_without_the_prefix_cache(tmp_path):
    """Its cache keeps only the last tokens of each layer, so it cannot be cut back to an earlier prefix."""
    import transformers
    d = build_tiny_chat_model(str(tmp_path / "m"))
    c = transformers.AutoConfig.from_pretrained(d)
    sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "bos_token_id", "eos_token_id"]
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **{k: getattr(c, k) for k in sizes}, use_sliding_window=True, sliding_window=8, max_window_layers=0)).save_pretrained(d)
    h = s2s.TransformersLLMHandler(d, "cpu", "float32", 0.0, 12, False)
    h.setup()
    h.warmup()
    assert h.prefixes is None and "".join(h.stream(MESSAGES)) == "".join(h.stream(MESSAGES))


@pytest.mark.parametrize("model, cause", [("nobody/no-such-model", "there is no network"), ("./no/such/folder", "does not exist"),
                                          (None, "there is no network")])
def test_a_model_that_cannot_be_had_stops_start_up_with_one_sentence(model, cause, tmp_path):
    """The hub out of reach (offline mode: the library's own error for no network, without its minute of retries), or
    a folder that is not there: one sentence that names the model, the cause and what to do instead, and no library
    warnings before it. None: no LLM flag and no key, so the default local model, not downloaded yet."""
    flags = ["--llm", "transformers", "--lm_model_name", model] if model else []
    code = ("import s2s_server_pipeline as s2s\n"
            f"args = s2s.parse_args({flags + ['--device', 'cpu']!r})\n"
            "s2s.load('LLM', s2s.TransformersLLMHandler.from_args(args))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "LLM_API_KEY": ""})
    assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr  # one line
    assert done.stderr.startswith(f"LLM model {model or s2s.DEFAULT_LOCAL_LLM} ") and cause in done.stderr, done.stderr
    assert "--lm_model_name" in done.stderr


def test_download_failures_are_named_by_the_cause_a_user_can_act_on():
    assert s2s.download_failure("OSError: [Errno 28] No space left on device") == "the disk is full"
    assert s2s.download_failure("nobody/x is not a local folder and is not a valid model identifier") == "no model has that id"
    assert s2s.download_failure("404 Client Error: Not Found for url") == "no model has that id"
    assert s2s.download_failure("Caused by NameResolutionError(...)") == "there is no network (the model hub cannot be reached)"


def hub_cache_with(model_dir: str, model_id: str, cache: str) -> str:
    """A Hugging Face hub cache (the layout a download leaves) that holds `model_dir` as `model_id`: with the hub
    offline, from_pretrained(model_id) loads it as it would a downloaded model."""
    revision = "0" * 40
    repo = os.path.join(cache, "models--" + model_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    shutil.copytree(model_dir, os.path.join(repo, "snapshots", revision))
    return cache


def test_with_no_llm_flag_and_no_key_the_default_local_model_answers(tmp_path):
    """What `./scripts/serve.sh` with no flags does on a laptop: no key, so the local default model, from the hub
    cache a first run downloads into (here the tiny model stands in for the download), answers a spoken question in
    speech, with its prefix cache on."""
    cache = hub_cache_with(build_tiny_chat_model(str(tmp_path / "tiny")), s2s.DEFAULT_LOCAL_LLM, str(tmp_path / "hub"))
    srv = ServerProcess("--asr", "fixed", "--max_new_tokens", "12", "--playback_lead_ms", "60000", env={
        "LLM_API_KEY": "", "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"})

    async def scenario():
        async with ExtendedClient(srv.recv_url, srv.send_url) as c:
            await c.stream_wav(fixture("en_question.wav"))
            await c.wait_for(lambda r: r.kind == "answer" and r.data["end"], 60)
            return c

    try:
        c = asyncio.run(scenario())
    finally:
        srv.stop()
    log = srv.log()
    assert f"LLM: transformers {s2s.DEFAULT_LOCAL_LLM} on cpu" in log and "prefix cache of" in log, log
    answer = "".join(a.data["text"] for a in c.events("answer", turn=1))
    assert len(answer.split()) >= 3, answer  # the tiny model's words, not an echo of the transcript
    assert "heard" not in answer
    pcm = np.frombuffer(b"".join(a.pcm for a in c.events("audio", turn=1)), "<i2")
    assert len(pcm) / s2s.SAMPLE_RATE > 0.5 and np.abs(pcm).max() > 1000  # spoken by espeak-ng, the default TTS
    assert "Traceback" not in log


def test_the_default_llm_is_an_api_when_a_key_is_set(monkeypatch):
    monkeypatch.setenv("LLM_API_KEY", "sk-test")
    assert s2s.parse_args([]).llm == "openai" and s2s.parse_args([]).lm_model_name == "gpt-4o-mini"
    assert s2s.parse_args(["--lm_model_name", "/models/Qwen"]).llm == "transformers"  # CleanS2S's meaning stays
    monkeypatch.delenv("LLM_API_KEY")
    assert s2s.parse_args([]).llm == "transformers" and s2s.parse_args([]).lm_model_name == s2s.DEFAULT_LOCAL_LLM
