"""Stand-ins that speak the real protocols over real sockets on 127.0.0.1."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChatAPI:
    """An OpenAI-compatible /v1/chat/completions server that streams Server-Sent Events.

    `answer(messages) -> str` decides the reply; it is sent word by word, `token_delay_s` apart, after
    `first_token_delay_s` (a number, or a function of the messages). `fail_with` makes the next requests answer with that HTTP status instead.
    Every request body is recorded, and so is how many tokens were written before the client hung up."""

    def __init__(self, answer=None, first_token_delay_s: float = 0.05, token_delay_s: float = 0.01):
        self.answer = answer or (lambda messages: "Hello! How can I help you today?")
        self.first_token_delay_s, self.token_delay_s = first_token_delay_s, token_delay_s
        self.fail_with: int | None = None
        self.requests: list = []
        self.streams: list = []  # one dict per streamed reply: tokens_total, tokens_sent, client_closed
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if not self.path.endswith("/chat/completions"):
                    return self._json(404, {"error": {"message": "not found"}})
                if fake.fail_with is not None:
                    return self._json(fake.fail_with, {"error": {"message": "the model is overloaded", "type": "server_error"}})
                self._stream(body)

            def _json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body):
                words = fake.answer(body["messages"]).split(" ")
                tokens = [w + " " for w in words[:-1]] + [words[-1]]
                record = {"tokens_total": len(tokens), "tokens_sent": 0, "client_closed": False}
                with fake.lock:
                    fake.streams.append(record)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                delay = fake.first_token_delay_s
                time.sleep(delay(body["messages"]) if callable(delay) else delay)
                try:
                    for i, tok in enumerate(tokens):
                        if i:
                            time.sleep(fake.token_delay_s)
                        chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0,
                                 "model": body.get("model", "test"),
                                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": tok}, "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        record["tokens_sent"] += 1
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    record["client_closed"] = True
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeChatAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def chat_requests(self) -> list:
        with self.lock:
            return [r["body"] for r in self.requests if r["path"].endswith("/chat/completions")]
