"""Stand-ins that speak the real protocols over real sockets on 127.0.0.1."""
from __future__ import annotations

import contextlib
import email.parser
import email.policy
import functools
import io
import json
import socket
import sys
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


class QuietHTTPServer(ThreadingHTTPServer):
    """A client that resets its kept connection (as an API client does on a reply it cut off) is no error here."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeAPI:
    """An OpenAI-style HTTP server on 127.0.0.1. Subclasses answer POSTs in `handle(request, path, body)`.
    `fail_with = STATUS` answers every request with that error instead; `fail_with = "slow"` answers
    nothing for `slow_s` seconds. Every request is recorded; `wait_for_request()` waits for one. `stop()`
    takes it off the network (connections are refused) and `restart()` brings it back on the same port."""

    slow_s = 5.0

    def __init__(self, port: int = 0):
        self.fail_with = None
        self.requests: list = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.open_connections: set = set()
        self.connections_opened = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with fake.lock:
                    fake.open_connections.add(self.connection)
                    fake.connections_opened += 1

            def finish(self):
                with fake.lock:
                    fake.open_connections.discard(self.connection)
                super().finish()

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                          "content_type": self.headers.get("Content-Type"), "body": body})
                    fake.arrived.notify_all()
                if fake.fail_with == "slow":
                    time.sleep(fake.slow_s)
                elif fake.fail_with is not None:
                    message = "invalid api key" if fake.fail_with == 401 else "the model is overloaded"
                    return self.send_json(fake.fail_with, {"error": {"message": message, "type": "error"}})
                fake.handle(self, self.path, body)

            def send_json(self, status, obj):
                self.send_bytes(status, "application/json", json.dumps(obj).encode())

            def send_bytes(self, status, ctype, data):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.handler_class = Handler
        self._bind(port)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _bind(self, port: int) -> None:
        self.httpd = QuietHTTPServer(("127.0.0.1", port), self.handler_class)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.serving = False

    def handle(self, request, path: str, body: bytes) -> None:
        raise NotImplementedError

    def wait_for_request(self, predicate=lambda request: True, timeout: float = 10.0, count: int = 1) -> dict:
        """The count-th recorded request (old or new) for which predicate(request) is true."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: sum(1 for r in self.requests if predicate(r)) >= count, timeout):
                raise TimeoutError(f"no {count} such requests within {timeout} s")
            return [r for r in self.requests if predicate(r)][count - 1]

    def stop(self) -> None:
        """As if the process behind the API died: no more connections, and the open ones (kept alive) are cut."""
        if self.serving:
            self.httpd.shutdown()
            self.serving = False
        self.httpd.server_close()
        with self.lock:
            for conn in self.open_connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def restart(self) -> None:
        self.stop()
        self._bind(self.httpd.server_address[1])
        self.__enter__()

    def __enter__(self):
        self.thread.start()
        self.serving = True
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeChatAPI(FakeAPI):
    """/v1/chat/completions, streamed as Server-Sent Events.

    `answer(messages) -> str` decides the reply (or a dict {"name": ..., "arguments": ...}: a call of that function,
    its arguments streamed in three pieces, as tool-calling APIs stream them); it is sent word by word, `token_delay_s` apart, after
    `first_token_delay_s` (a number, or a function of the messages). How many tokens were written before
    the client hung up is recorded in `streams`.

    `fault` (one of FAULTS, or a function of the messages returning one or None) breaks a streamed reply,
    sent with chunked framing as real APIs send it: "cut" closes the connection after `fault_after_tokens`
    tokens, "error" sends an error event there (as OpenAI does when a stream fails), "stall" sends nothing
    more for `slow_s` seconds; "not_json" sends SSE lines that are not JSON, "wrong_shape" JSON chunks
    without choices, "not_sse" an HTML page."""

    FAULTS = ("cut", "error", "stall", "not_json", "wrong_shape", "not_sse")

    def __init__(self, answer=None, first_token_delay_s: float = 0.05, token_delay_s: float = 0.01, port: int = 0):
        super().__init__(port)
        self.answer = answer or (lambda messages: "Hello! How can I help you today?")
        self.first_token_delay_s, self.token_delay_s = first_token_delay_s, token_delay_s
        self.fault = None
        self.fault_after_tokens = 3
        self.refuses_stream_options = False
        # one dict per streamed reply: tokens_total, tokens_sent, client_closed, messages, done (an Event)
        self.streams: list = []

    def chat_requests(self) -> list:
        with self.lock:
            return [json.loads(r["body"]) for r in self.requests if r["path"].endswith("/chat/completions")]

    def handle(self, request, path, body):
        if not path.endswith("/chat/completions"):
            return request.send_json(404, {"error": {"message": "not found"}})
        body = json.loads(body)
        if self.refuses_stream_options and "stream_options" in body:  # as an older OpenAI-compatible server does
            return request.send_json(400, {"error": {"message": "Unrecognized request argument supplied: stream_options"}})
        if not body.get("stream"):  # a whole completion in one JSON reply (the server's start-up check)
            text = self.answer(body["messages"])
            return request.send_json(200, {
                "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model", "test"),
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        reply = self.answer(body["messages"])
        if isinstance(reply, dict):
            return self._stream_tool_call(request, body, reply)
        words = reply.split(" ")
        tokens = [w + " " for w in words[:-1]] + [words[-1]]
        record = {"tokens_total": len(tokens), "tokens_sent": 0, "client_closed": False,
                  "messages": body["messages"], "done": threading.Event()}
        with self.lock:
            self.streams.append(record)
        fault = self.fault(body["messages"]) if callable(self.fault) else self.fault
        try:
            if fault is None:
                self._stream_tokens(request, body, tokens, record)
            else:
                self._stream_fault(request, body, tokens, record, fault)
        finally:
            record["done"].set()

    @staticmethod
    def _sse_chunk(body: dict, token: str) -> bytes:
        chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": body.get("model", "test"),
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": token}, "finish_reason": None}]}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    def _stream_tokens(self, request, body, tokens, record):
        """As OpenAI streams: chunked framing, the body ending right after [DONE], the connection kept for the next
        request."""
        request.send_response(200)
        request.send_header("Content-Type", "text/event-stream")
        request.send_header("Cache-Control", "no-cache")
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()
        send = functools.partial(send_chunk, request)
        delay = self.first_token_delay_s
        time.sleep(delay(body["messages"]) if callable(delay) else delay)
        try:
            for i, tok in enumerate(tokens):
                if i:
                    time.sleep(self.token_delay_s)
                send(self._sse_chunk(body, tok))
                record["tokens_sent"] += 1
            if (body.get("stream_options") or {}).get("include_usage"):  # as OpenAI counts: a last chunk, no choices
                asked = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
                counted = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "test", "choices": [],
                           "usage": {"prompt_tokens": asked, "completion_tokens": len(tokens), "total_tokens": asked + len(tokens)}}
                send(f"data: {json.dumps(counted)}\n\n".encode())
            send(b"data: [DONE]\n\n")
            request.wfile.write(b"0\r\n\r\n")
            request.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            record["client_closed"] = True
            request.close_connection = True

    def _stream_tool_call(self, request, body, call):
        with self.lock:
            self.streams.append({"tool_call": call, "messages": body["messages"], "done": threading.Event()})
        request.send_response(200)
        request.send_header("Content-Type", "text/event-stream")
        request.send_header("Connection", "close")
        request.end_headers()
        args, third = call["arguments"], len(call["arguments"]) // 3 + 1
        pieces = [{"index": 0, "id": "call_test1", "type": "function", "function": {"name": call["name"], "arguments": ""}}]
        pieces += [{"index": 0, "function": {"arguments": args[i:i + third]}} for i in range(0, len(args), third)]
        for piece in pieces:
            chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": body.get("model", "test"),
                     "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [piece]}, "finish_reason": None}]}
            request.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            request.wfile.flush()
            time.sleep(self.token_delay_s)
        request.wfile.write(b"data: [DONE]\n\n")
        request.wfile.flush()
        request.close_connection = True

    def _stream_fault(self, request, body, tokens, record, fault):
        assert fault in self.FAULTS, fault
        request.close_connection = True
        html = fault == "not_sse"
        request.send_response(200)
        request.send_header("Content-Type", "text/html; charset=utf-8" if html else "text/event-stream")
        request.send_header("Transfer-Encoding", "chunked")
        request.send_header("Connection", "close")
        request.end_headers()
        send = functools.partial(send_chunk, request)
        try:
            if html:
                send(b"<!DOCTYPE html>\n<html><body><h1>502 Bad Gateway</h1></body></html>\n")
            elif fault == "not_json":
                send(b"data: <html><body>upstream error</body></html>\n\n" * 3)
            elif fault == "wrong_shape":
                for tok in tokens:
                    send(f"data: {json.dumps({'result': tok, 'status': 'ok'})}\n\n".encode())
            else:
                for tok in tokens[:self.fault_after_tokens]:
                    send(self._sse_chunk(body, tok))
                    record["tokens_sent"] += 1
                    time.sleep(self.token_delay_s)
                if fault == "cut":
                    return  # the connection closes without the last chunk: the body is cut short
                if fault == "stall":
                    time.sleep(self.slow_s)
                    return
                send(b'data: {"error": {"message": "the model crashed mid-answer", "type": "server_error"}}\n\n')
            if not html:
                send(b"data: [DONE]\n\n")
            request.wfile.write(b"0\r\n\r\n")
            request.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            record["client_closed"] = True


def send_chunk(request, data: bytes) -> None:
    """One chunk of a body sent with chunked framing, flushed at once."""
    request.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    request.wfile.flush()


def tone_wav(seconds: float, rate: int) -> bytes:
    """A 220 Hz tone as a 16-bit mono WAV."""
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


class FakeSpeechAPI(FakeAPI):
    """/v1/audio/transcriptions (multipart upload) and /v1/audio/speech (audio streamed in pieces).

    Transcription answers with how much audio it received ("heard 1.5 seconds"); speech answers with a tone
    of 0.05 s per character at `rate` Hz, as WAV or raw PCM. `speech_content_type` overrides the content
    type (a server answering HTML where audio was expected)."""

    def __init__(self, rate: int = 24000):
        super().__init__()
        self.rate = rate
        self.speech_content_type = None
        self.uploads: list = []  # (fields, audio seconds) per transcription

    def handle(self, request, path, body):
        if path.endswith("/audio/transcriptions"):
            fields, audio = parse_multipart(request.headers["Content-Type"], body)
            with wave.open(io.BytesIO(audio)) as w:
                seconds = w.getnframes() / w.getframerate()
            self.uploads.append((fields, seconds))
            return request.send_json(200, {"text": f"heard {seconds:.1f} seconds"})
        if path.endswith("/audio/speech"):
            params = json.loads(body)
            wav = tone_wav(0.05 * len(params["input"]), self.rate)
            data = wav[44:] if params.get("response_format") == "pcm" else wav
            ctype = self.speech_content_type or ("audio/pcm" if params.get("response_format") == "pcm" else "audio/wav")
            if ctype.startswith("text/html"):
                data = b"<html><body>Service unavailable</body></html>"
            request.send_response(200)
            request.send_header("Content-Type", ctype)
            request.send_header("Transfer-Encoding", "chunked")
            request.end_headers()
            for i in range(0, len(data), 4001):  # odd-sized pieces: a frame may be split anywhere
                piece = data[i:i + 4001]
                request.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                request.wfile.flush()
            request.wfile.write(b"0\r\n\r\n")
            return None
        request.send_json(404, {"error": {"message": "not found"}})


def parse_multipart(content_type: str, body: bytes) -> tuple:
    """(text fields, bytes of the uploaded file) of a multipart/form-data body."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields, file = {}, b""
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename():
            file = part.get_payload(decode=True)
        else:
            fields[name] = part.get_content().strip()
    return fields, file
