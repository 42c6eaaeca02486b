"""Stand-ins for the RAG agent's tests, on 127.0.0.1: Serper and the pages it links to, and a chat API that can
answer with a tool call. Both are real HTTP servers (tests/fakes.py)."""
from __future__ import annotations

import json
import select
import socket
import socketserver
import threading
import time
from urllib.parse import urlsplit

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
    to answer with text as FakeChatAPI does (through `answer(messages)`). `tool_choice_refusal = MESSAGE` answers
    every request that sets tool_choice with HTTP 400 and that message, as some OpenAI-compatible servers do."""

    def __init__(self, decide=None, **kwargs):
        super().__init__(**kwargs)
        self.decide = decide or (lambda messages, tools: None)
        self.tool_choice_refusal = None

    def handle(self, request, path, body):
        params = json.loads(body)
        if self.tool_choice_refusal is not None and "tool_choice" in params:
            return request.send_json(400, {"error": {"message": self.tool_choice_refusal, "type": "invalid_request_error",
                                                     "param": "tool_choice"}})
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


class ForwardProxy:
    """An HTTP forward proxy on 127.0.0.1, as a corporate network has. A request with an absolute URI is passed on
    to its server; CONNECT host:port opens a tunnel there (502 when it cannot). Either way bytes are then relayed
    both ways until one side closes, and the other is closed too: the server sees a client that hangs up.
    `hosts` maps a host name to the (address, port) to reach it at, as the proxy's own DNS would. Every request
    is recorded in `requests` as (method, target, its Proxy-Authorization header or None)."""

    def __init__(self):
        self.requests: list = []
        self.hosts: dict = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy.serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(65536)
            if not data:
                return
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ", 2)
        headers = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in header_lines)]
        auth = next((value for name, value in headers if name.lower() == "proxy-authorization"), None)
        with self.lock:
            self.requests.append((method, target, auth))
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            address, first = self.hosts.get(host, (host, int(port))), rest
        else:
            url = urlsplit(target)
            address = self.hosts.get(url.hostname, (url.hostname, url.port or 80))
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            kept = [f"{name}: {value}" for name, value in headers
                    if name.lower() not in ("proxy-authorization", "proxy-connection", "connection")]
            first = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""]).encode("latin-1") + rest
        try:
            upstream = socket.create_connection(address, timeout=5)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        if method == "CONNECT":
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with upstream:
            upstream.settimeout(None)
            relay(client, upstream, first)


def relay(client: socket.socket, upstream: socket.socket, first: bytes) -> None:
    """Send `first` upstream, then copy bytes both ways until either side closes; then shut both down."""
    try:
        upstream.sendall(first)
        peers = {client: upstream, upstream: client}
        while True:
            readable, _, _ = select.select(list(peers), [], [])
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)
    except OSError:
        return
    finally:
        for sock in (client, upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
