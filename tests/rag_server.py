"""The RAG agent's server in a subprocess (tests/serve_rag_test_models.py), driven like ServerProcess drives the core."""
from __future__ import annotations

from server_process import ServerProcess


class RAGServerProcess(ServerProcess):
    """tests/serve_rag_test_models.py on free ports, offline for the hub (the test builds its embedder)."""

    SCRIPT = "serve_rag_test_models.py"

    def __init__(self, *flags: str, env: dict | None = None, ready_timeout_s: float = 90):
        super().__init__(*flags, env={"HF_HUB_OFFLINE": "1", **(env or {})}, ready_timeout_s=ready_timeout_s)
