from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from client import load_wav, voiced_span  # noqa: E402
from fakes import FakeChatAPI  # noqa: E402
from s2s_server_pipeline import uid_tag  # noqa: E402
from server_process import ServerProcess  # noqa: E402


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def short_voice():
    """Half a second of a voice, and 0.1 s before it (the start of en_question.wav's): "mm", as far as a test's
    fixed ASR can tell (--asr_short_s)."""
    speech = load_wav(fixture("en_question.wav"))
    first = voiced_span(speech)[0]
    return speech[first - 1600:first + 8000]


def run_bench(script: str, out, *flags: str, timeout: float = 600) -> tuple:
    """Run bench/SCRIPT as its users do, writing its JSON to `out`; return (its stdout, that JSON)."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *flags, "--out", str(out)],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout, json.loads(out.read_text())


def saved_file(directory, uid: str, name: str) -> str:
    """The path of a file --save_data wrote for the one session of `uid`: DIR/<time>-<uid hash>-<random>/NAME."""
    folders = glob.glob(os.path.join(directory, f"*-{uid_tag(uid)}-*"))
    assert len(folders) == 1, (folders, os.listdir(directory))
    return os.path.join(folders[0], name)


LONG_ANSWER = ("You asked me something, and here is a long answer. It has several sentences so that it keeps "
               "talking for a while. This lets a test cut in while the audio is still playing. Here is one more "
               "sentence about nothing at all. And another one, to be sure it is long enough. Finally, the end.")


SHORT_ANSWER = "Sure. Here is a short answer, the end."


def long_answer(messages: list) -> str:
    """Names the question it answers, then talks for about fifteen seconds."""
    return f"About {messages[-1]['content']}: {LONG_ANSWER}"


def short_answer(messages: list) -> str:
    """Names the question it answers, then about three seconds of speech."""
    return f"About {messages[-1]['content']}: {SHORT_ANSWER}"


@pytest.fixture(scope="module")
def chat_api():
    with FakeChatAPI(answer=short_answer, first_token_delay_s=0.1, token_delay_s=0.01) as api:
        yield api


@pytest.fixture
def long_answers(chat_api):
    """Answers that keep talking, for tests that cut in."""
    chat_api.answer = long_answer
    yield
    chat_api.answer = short_answer


def start_server(chat_api: FakeChatAPI, *flags: str) -> ServerProcess:
    return ServerProcess("--asr", "fixed", "--asr_latency_ms", "50", "--llm", "openai",
                         "--lm_model_url", chat_api.url, "--lm_model_name", "test-model", *flags,
                         env={"LLM_API_KEY": "test-key"})


@pytest.fixture(scope="module")
def server(chat_api):
    srv = start_server(chat_api)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()
