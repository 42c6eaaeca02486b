"""The local transformers LLM on a tiny random-weight Llama chat model built here (tests/tiny_chat_model.py):
token streaming through the real generate() path, and a real stop mid-generation."""
import time

import pytest

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

    chunks = list(llm.process(s2s.UserText(Session(), 1, "hi")))
    assert chunks[-1].last and "".join(c.text for c in chunks).strip()


def test_bfloat16_and_a_bad_model_path(tmp_path):
    h = s2s.TransformersLLMHandler(build_tiny_chat_model(str(tmp_path / "m")), "cpu", "bfloat16", 0.7, 8, False)
    h.setup()
    assert str(h.model.dtype) == "torch.bfloat16" and "".join(h.stream(MESSAGES))
    with pytest.raises(Exception):
        s2s.TransformersLLMHandler(str(tmp_path / "missing"), "cpu", "float32", 0.7, 8, False).setup()
