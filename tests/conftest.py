from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fakes import FakeChatAPI  # noqa: E402


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The real server in a subprocess (tests/serve_test_models.py), with its log captured."""

    def __init__(self, *flags: str, env: dict | None = None):
        self.recv_port, self.send_port = free_port(), free_port()
        cmd = [sys.executable, os.path.join(ROOT, "tests", "serve_test_models.py"),
               "--recv_host", "127.0.0.1", "--recv_port", str(self.recv_port),
               "--send_host", "127.0.0.1", "--send_port", str(self.send_port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            self.stop()
            raise RuntimeError("server did not start:\n" + self.log())

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "ready: receiver" in line:
                self.ready.set()

    def log(self) -> str:
        return "".join(self.lines)

    @property
    def recv_url(self) -> str:
        return f"ws://127.0.0.1:{self.recv_port}"

    @property
    def send_url(self) -> str:
        return f"ws://127.0.0.1:{self.send_port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


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
