"""Stand-ins for the RAG agent's tests, on 127.0.0.1: Serper and the pages it links to, and a chat API that can
answer with a tool call. Both are real HTTP servers (tests/fakes.py)."""
from __future__ import annotations

import json
import select
import socket
import threading
import time

from fakes import FakeChatAPI, FakeAPI


class FakeSerper(FakeAPI):
    """Serper's search endpoint (POST, any path) and the result pages it links to (GET /page/NAME).

    `results(query) -> [(title, page name, snippet)]` decides the results; `pages` maps a page name to its HTML.
    `delay_s` holds every search reply that long, watching the socket: a client that hangs up meanwhile is
    recorded in `hangups` (monotonic time) and gets no reply. `fail_with` (FakeAPI) answers an HTTP error."""

    def __init__(self, results=None, pages: dict | None = None, delay_s: float = 0.0):
        super().__init__()
        self.root = self.url[:-len("/v1")]
        self.search_url = f"{self.root}/search"
        self.results = results or (lambda query: [])
        self.pages, self.delay_s = pages or {}, delay_s
        self.queries: list = []  # the "q" of every search
        self.keys: list = []  # the X-API-KEY of every search
        self.page_requests: list = []  # page names fetched
        self.hangups: list = []
        self.hung_up = threading.Event()
        self.httpd.RequestHandlerClass.do_GET = lambda request: self.serve_page(request)

    def page_url(self, name: str) -> str:
        return f"{self.root}/page/{name}"

    def handle(self, request, path, body):
        params = json.loads(body)
        with self.lock:
            self.queries.append(params["q"])
            self.keys.append(request.headers.get("X-API-KEY"))
        if self.delay_s and client_hangs_up(request.connection, self.delay_s):
            self.hangups.append(time.monotonic())
            self.hung_up.set()
            request.close_connection = True
            return
        organic = [{"title": title, "link": self.page_url(name), "snippet": snippet, "position": i + 1}
                   for i, (title, name, snippet) in enumerate(self.results(params["q"]))]
        request.send_json(200, {"searchParameters": {"q": params["q"]}, "organic": organic[:params.get("num", 10)]})

    def serve_page(self, request) -> None:
        name = request.path.rsplit("/", 1)[-1]
        with self.lock:
            self.page_requests.append(name)
        if name not in self.pages:
            return request.send_bytes(404, "text/plain", b"not found")
        request.send_bytes(200, "text/html; charset=utf-8", self.pages[name].encode())


def client_hangs_up(conn: socket.socket, within_s: float) -> bool:
    """Whether the client closes the connection within `within_s` (it has sent its whole request already, so
    the socket turning readable means it hung up)."""
    readable, _, _ = select.select([conn], [], [], within_s)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class ToolChatAPI(FakeChatAPI):
    """FakeChatAPI that may answer with a tool call. For a streamed request that offers tools (tool_choice not
    "none") and holds no tool results yet, `decide(messages, tool names)` returns a (tool, query) to call, or None
    to answer with text as FakeChatAPI does (through `answer(messages)`)."""

    def __init__(self, decide=None, **kwargs):
        super().__init__(**kwargs)
        self.decide = decide or (lambda messages, tools: None)

    def handle(self, request, path, body):
        params = json.loads(body)
        offered = [t["function"]["name"] for t in params.get("tools", [])]
        fresh = not any(m["role"] == "tool" for m in params.get("messages", []))
        call = (self.decide(params["messages"], offered)
                if params.get("stream") and offered and params.get("tool_choice") != "none" and fresh else None)
        if call is None:
            return super().handle(request, path, body)
        name, query = call
        arguments = json.dumps({"query": query})
        half = len(arguments) // 2
        deltas = [  # how OpenAI streams a call: id and name first, then the arguments in pieces
            {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                  "function": {"name": name, "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]},
        ]
        request.send_response(200)
        request.send_header("Content-Type", "text/event-stream")
        request.send_header("Connection", "close")
        request.end_headers()
        delay = self.first_token_delay_s
        time.sleep(delay(params["messages"]) if callable(delay) else delay)
        for i, delta in enumerate(deltas + [{}]):
            chunk = {"id": "chatcmpl-tool", "object": "chat.completion.chunk", "created": 0, "model": params.get("model", "test"),
                     "choices": [{"index": 0, "delta": delta, "finish_reason": "tool_calls" if i == len(deltas) else None}]}
            request.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        request.wfile.write(b"data: [DONE]\n\n")
        request.wfile.flush()
        request.close_connection = True


def tool_results(messages: list) -> str:
    """The text of the tool messages of a request, joined."""
    return "\n".join(m["content"] for m in messages if m["role"] == "tool")
