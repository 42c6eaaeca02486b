"""The RAG agent's server in a subprocess (tests/serve_rag_test_models.py), driven like ServerProcess drives the core."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

from server_process import ROOT, ServerProcess, free_port


class RAGServerProcess(ServerProcess):
    """tests/serve_rag_test_models.py on free ports; log, stop() and the URLs are ServerProcess's."""

    def __init__(self, *flags: str, env: dict | None = None, ready_timeout_s: float = 90):
        self.recv_port, self.send_port = free_port(), free_port()
        ports = ["--recv_host", "127.0.0.1", "--recv_port", str(self.recv_port),
                 "--send_host", "127.0.0.1", "--send_port", str(self.send_port)]
        self.lines, self.ready = [], threading.Event()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "serve_rag_test_models.py"), *ports, *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(ready_timeout_s):  # _read() sets it at the server's "ready" line
            self.stop()
            raise RuntimeError("the RAG server did not start:\n" + self.log())
