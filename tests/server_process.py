"""The real server (tests/serve_test_models.py) in a subprocess, for end-to-end tests and benchmarks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The real server in a subprocess (tests/serve_test_models.py, or the SCRIPT of a subclass), with its log
    captured: each line, when it was read (time.monotonic()), and a way to wait for a line to be written."""

    SCRIPT = "serve_test_models.py"

    def __init__(self, *flags: str, env: dict | None = None, ready_timeout_s: float = 60):
        # A port free when picked can be taken before the server binds it (another test's server, or any client's
        # outgoing connection): then the server exits at once, and it starts again on other ports.
        for attempt in range(3):
            self._start(flags, env)
            self.done.wait(ready_timeout_s)  # it listens once every model is loaded and warmed up
            if self.ready.is_set():
                return
            self.stop()
            if "already in use" not in self.log():
                break
        raise RuntimeError("server did not start:\n" + self.log())

    def _start(self, flags: tuple, env: dict | None) -> None:
        self.recv_port, self.send_port = free_port(), free_port()
        cmd = [sys.executable, os.path.join(ROOT, "tests", self.SCRIPT),
               "--recv_host", "127.0.0.1", "--recv_port", str(self.recv_port),
               "--send_host", "127.0.0.1", "--send_port", str(self.send_port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list = []
        self.times: list = []  # when each line was read
        self.changed = threading.Condition()  # notified at every line
        self.ready = threading.Event()
        self.done = threading.Event()  # ready, or its output ended (it exited)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.times.append(time.monotonic())
                self.lines.append(line)
                self.changed.notify_all()
            if "ready: receiver" in line:
                self.ready.set()
                self.done.set()
        self.done.set()

    def wait_until(self, predicate, timeout: float = 10.0, what: str = "") -> object:
        """predicate(log lines), once it is true (not None or False), waiting for the log to grow."""
        with self.changed:
            result = self.changed.wait_for(lambda: predicate(self.lines), timeout)
            if not result:
                raise TimeoutError(f"{what or predicate} not logged within {timeout} s:\n{self.log()[-3000:]}")
            return result

    def wait_for_log(self, text: str, timeout: float = 10.0, after: int = 0) -> str:
        """The first log line from line `after` on that contains `text`, waiting for it to be written."""
        def found(lines):
            return next((line for line in lines[after:] if text in line), None)
        return self.wait_until(found, timeout, repr(text))

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
        return stop_process(self.proc, 15)


def stop_process(proc: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM, then SIGKILL if it has not exited within timeout_s; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
