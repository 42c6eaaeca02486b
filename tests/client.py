"""WebSocket clients for tests and benchmarks: they stream WAV speech in real time, as a microphone would."""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect

SAMPLE_RATE = 16000
CHUNK = 1024  # samples per message (64 ms), as CleanS2S's browser client sends


def load_wav(path: str) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    assert rate == SAMPLE_RATE and audio.ndim == 1, path
    return audio


@dataclass
class Received:
    t: float  # time.monotonic() on arrival
    kind: str  # an event name, "audio" (extended binary), or "legacy"
    data: dict = field(default_factory=dict)
    pcm: bytes = b""


class Client:
    """Base: two sockets, a reader task collecting everything the sender socket says."""

    def __init__(self, recv_url: str, send_url: str, uid: str | None = None, **connect_kwargs):
        self.uid = uid or str(uuid.uuid4())
        self.recv_url, self.send_url = recv_url, send_url
        self.connect_kwargs = connect_kwargs  # for websockets' connect(): subprotocols, origin, ssl
        self.received: list = []
        self.replies: list = []  # what the receiver socket answered
        self.new_item = asyncio.Event()
        self.speech_onsets: list = []  # time.monotonic() when non-silent audio was first sent, per stream_wav

    async def __aenter__(self) -> Client:
        self.recv = await connect(self._recv_url(), max_size=None, **self.connect_kwargs)
        await self.on_receiver_open()
        self.send = await connect(self._send_url(), max_size=None, **self.sender_kwargs())
        self.readers = [asyncio.create_task(self._read_sender()), asyncio.create_task(self._read_replies())]
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self.readers:
            task.cancel()
        await self.recv.close()
        await self.send.close()

    async def _read_replies(self) -> None:
        async for msg in self.recv:
            self.replies.append(json.loads(msg))
            self.on_reply(self.replies[-1])

    def on_reply(self, reply: dict) -> None:
        pass

    async def on_receiver_open(self) -> None:
        pass

    def sender_kwargs(self) -> dict:
        return self.connect_kwargs

    async def _read_sender(self) -> None:
        async for msg in self.send:
            self.received.append(self.parse(msg))
            self.new_item.set()

    async def wait_for(self, predicate, timeout: float = 20.0) -> Received:
        """The first received item (old or new) for which predicate(item) is true."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for item in self.received[seen:]:
                if predicate(item):
                    return item
            seen = len(self.received)
            self.new_item.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"nothing matched within {timeout}s; received: {[(r.kind, r.data) for r in self.received][-10:]}")
            try:
                await asyncio.wait_for(self.new_item.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def stream_wav(self, path: str, trailing_silence_s: float = 1.0) -> None:
        """Send speech in real time, then silence, so the VAD hears the end of the turn."""
        audio = np.concatenate([load_wav(path), np.zeros(int(trailing_silence_s * SAMPLE_RATE), np.float32)])
        start = time.monotonic()
        onset = None
        for i in range(0, len(audio), CHUNK):
            chunk = audio[i:i + CHUNK]
            if onset is None and np.abs(chunk).max() > 0.01:
                onset = time.monotonic()
                self.speech_onsets.append(onset)
            await self.send_audio(chunk)
            await asyncio.sleep(max(0.0, start + (i + CHUNK) / SAMPLE_RATE - time.monotonic()))  # microphone pace


class ExtendedClient(Client):
    """Speaks the extended protocol: ?uid= on both sockets, binary int16 frames both ways. The receiver opens
    first; its ready event holds the session key, which the sender presents as a subprotocol."""

    async def on_receiver_open(self) -> None:
        self.ready = json.loads(await asyncio.wait_for(self.recv.recv(), 10))
        assert self.ready["event"] == "ready", self.ready
        self.key = self.ready["session_key"]

    def sender_kwargs(self) -> dict:
        return {**self.connect_kwargs, "subprotocols": with_key(self.connect_kwargs.get("subprotocols"), self.key)}

    def _recv_url(self) -> str:
        return f"{self.recv_url}/?uid={self.uid}"

    def _send_url(self) -> str:
        return f"{self.send_url}/?uid={self.uid}"

    def parse(self, msg) -> Received:
        if isinstance(msg, bytes):
            turn, seq = struct.unpack("<II", msg[:8])
            return Received(time.monotonic(), "audio", {"turn": turn, "seq": seq}, msg[8:])
        data = json.loads(msg)
        return Received(time.monotonic(), data["event"], data)

    async def send_audio(self, chunk: np.ndarray) -> None:
        await self.recv.send((np.clip(chunk, -1, 1) * 32767).astype("<i2").tobytes())

    async def send_text(self, text: str) -> None:
        await self.recv.send(json.dumps({"type": "user_input", "uid": self.uid, "text": text}))

    def events(self, kind: str, turn: int | None = None) -> list:
        return [r for r in self.received if r.kind == kind and (turn is None or r.data.get("turn") == turn)]


def with_key(subprotocols: list | None, key: str) -> list:
    """The subprotocols a client offers to present a session key (and "s2s", which the server selects)."""
    offered = [p for p in (subprotocols or ["s2s"]) if not p.startswith("s2s.key.")]
    return (offered if "s2s" in offered else ["s2s", *offered]) + [f"s2s.key.{key}"]


class LegacyClient(Client):
    """CleanS2S's browser client, message for message: base64 float32 audio with is_playing, no uid on the
    sender socket, and the same counting: +1 per "VAD detected" reply and per text sent. It keeps only
    sender messages whose uid and user_input_count match its own, as that client does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.question_count = 0
        self.is_playing = False

    def _recv_url(self) -> str:
        return self.recv_url

    def _send_url(self) -> str:
        return self.send_url

    def on_reply(self, reply: dict) -> None:
        if reply.get("return_info"):
            self.question_count += 1

    def parse(self, msg) -> Received:
        data = json.loads(msg)
        kept = data.get("uid") == self.uid and int(data.get("user_input_count")) == self.question_count
        return Received(time.monotonic(), "legacy" if kept else "dropped", data)

    async def send_audio(self, chunk: np.ndarray) -> None:
        await self.recv.send(json.dumps({
            "type": "audio_input", "uid": self.uid, "is_playing": str(self.is_playing).lower(),
            "audio": base64.b64encode(chunk.astype("<f4").tobytes()).decode()}))

    async def send_text(self, text: str) -> None:
        await self.recv.send(json.dumps({"type": "user_input", "uid": self.uid, "text": text}))
        self.question_count += 1
