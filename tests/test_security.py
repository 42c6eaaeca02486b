"""Who gets in, TLS, and input limits: the real server in a subprocess, real sockets."""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.datastructures import Headers

from client import ExtendedClient, load_wav
from conftest import fixture, start_server

import s2s_server_pipeline as s2s

TOKEN = "s3cret-Token_0123456789"


def run(coro):
    return asyncio.run(coro)


async def refusal(url: str, **kwargs) -> websockets.frames.Close:
    """Connect, and return the close frame the server sends before anything else."""
    async with connect(url, **kwargs) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    return closed.value.rcvd


async def typed_turn(client: ExtendedClient, text: str = "hello there") -> None:
    await client.send_text(text)
    await client.wait_for(lambda r: r.kind == "answer" and r.data["end"])
    assert client.events("audio"), "no answer audio"


AS_BROWSER = {"subprotocols": ["s2s", f"s2s.token.{TOKEN}"]}  # how a browser presents the token


@pytest.fixture(scope="module")
def guarded(chat_api):
    srv = start_server(chat_api, "--auth_token", TOKEN, "--log_level", "DEBUG",
                       "--allowed_origins", "auto,https://app.example.com", "--idle_timeout_s", "2",
                       "--max_text_chars", "50", "--max_audio_ms_per_message", "200", "--max_messages_per_s", "40",
                       "--max_message_kb", "64")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def test_missing_or_wrong_token_is_refused_on_both_sockets(guarded):
    async def scenario():
        closes = []
        for base in (guarded.recv_url, guarded.send_url):
            closes.append(await refusal(f"{base}/?uid=nobody"))
            closes.append(await refusal(f"{base}/?uid=nobody&token=wrong-token-1234"))
            closes.append(await refusal(f"{base}/?uid=nobody", subprotocols=["s2s", "s2s.token.wrong-token-1234"]))
        return closes

    for close in run(scenario()):
        assert (close.code, close.reason) == (4401, "unauthorized: missing or wrong token")
    assert f"session {s2s.uid_tag('nobody')} opened" not in guarded.log()


def test_token_as_query_or_subprotocol_gets_a_normal_session_and_never_reaches_the_log(guarded):
    async def scenario():
        query = ExtendedClient(guarded.recv_url, guarded.send_url)
        query._recv_url = lambda: f"{guarded.recv_url}/?uid={query.uid}&token={TOKEN}"
        query._send_url = lambda: f"{guarded.send_url}/?uid={query.uid}&token={TOKEN}"
        async with query:
            await typed_turn(query)
        async with ExtendedClient(guarded.recv_url, guarded.send_url, **AS_BROWSER) as browser:
            assert browser.recv.subprotocol == "s2s"
            await typed_turn(browser)

    run(scenario())
    assert "DEBUG" in guarded.log() and "session" in guarded.log()
    assert TOKEN not in guarded.log(), "the token must never reach the log"


def test_the_token_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("S2S_AUTH_TOKEN", TOKEN)
    assert s2s.parse_args([]).auth_token == TOKEN
    assert s2s.parse_args(["--auth_token", "another-token-99"]).auth_token == "another-token-99"
    monkeypatch.delenv("S2S_AUTH_TOKEN")
    assert s2s.parse_args([]).auth_token is None


def test_foreign_origin_is_refused_and_listed_or_same_host_origins_pass(guarded):
    async def scenario():
        foreign = [await refusal(f"{base}/?uid=o1", origin="https://evil.example", **AS_BROWSER)
                   for base in (guarded.recv_url, guarded.send_url)]
        passed = []
        for origin in ("http://127.0.0.1:3000", "https://app.example.com", "http://localhost:9999"):
            async with ExtendedClient(guarded.recv_url, guarded.send_url, origin=origin, **AS_BROWSER) as c:
                await c.wait_for(lambda r: r.kind == "ready", timeout=5)
                passed.append(origin)
        return foreign, passed

    foreign, passed = run(scenario())
    for close in foreign:
        assert close.code == 4403 and close.reason == "origin not allowed: https://evil.example"
    assert passed == ["http://127.0.0.1:3000", "https://app.example.com", "http://localhost:9999"]


def test_limits_answer_with_error_codes_and_keep_the_connection(guarded):
    async def scenario():
        async with ExtendedClient(guarded.recv_url, guarded.send_url, **AS_BROWSER) as c:
            await c.wait_for(lambda r: r.kind == "ready")
            await c.send_text("x" * 51)  # over --max_text_chars 50
            await c.recv.send(np.zeros(int(0.25 * s2s.SAMPLE_RATE), "<i2").tobytes())  # 250 ms > 200 ms
            audio = base64.b64encode(np.zeros(int(0.25 * s2s.SAMPLE_RATE), "<f4").tobytes()).decode()
            await c.recv.send(json.dumps({"type": "audio_input", "uid": c.uid, "audio": audio}))
            await c.recv.send(json.dumps({"type": "playback", "turn": True, "played_ms": 5}))
            await c.recv.send(json.dumps({"type": "playback", "turn": 1, "played_ms": float("nan")}))
            await c.recv.send(json.dumps({"type": 7}))
            await c.recv.send(json.dumps({"type": "audio_input", "is_playing": "maybe", "audio": ""}))
            await c.recv.send("[" * 50000)  # nested past the JSON parser's recursion limit
            expected = ["text_too_long", "audio_too_long", "audio_too_long", "bad_playback", "bad_playback",
                        "bad_message", "bad_message", "bad_json"]
            await c.wait_for(lambda r: len(c.events("error")) >= len(expected), timeout=10)
            codes = [e.data["code"] for e in c.events("error")]
            replies, t0 = len(c.replies), asyncio.get_running_loop().time()
            for _ in range(120):  # 120 messages at once, over --max_messages_per_s 40: read at 40 a second
                await c.recv.send(json.dumps({"type": "keepalive"}))
            await typed_turn(c, "short question")  # behind them, not dropped
            seconds = asyncio.get_running_loop().time() - t0
            rate_errors = [e for e in c.events("error") if e.data["code"] == "rate_limited"]
            return codes, rate_errors, len(c.replies) - replies, seconds

    codes, rate_errors, replies, seconds = run(scenario())
    assert codes == ["text_too_long", "audio_too_long", "audio_too_long", "bad_playback", "bad_playback",
                     "bad_message", "bad_message", "bad_json"]
    assert replies == 121, "every message was read and answered, the typed one too"
    assert seconds >= (121 - 40) / 40 - 0.2, "faster than --max_messages_per_s allows"
    assert 1 <= len(rate_errors) <= seconds + 1, "one rate_limited error a second, not one per message"


def test_audio_sent_faster_than_real_time_is_heard_in_real_time_past_the_allowance(server):
    """Every second of audio costs the server its VAD and turn model: a client that sends a hundred seconds a second
    would cost as much as a hundred people talking. Past --max_audio_ahead_s (5 s) ahead of real time, the server
    reads its audio at real time (TCP slows the client down), with one error a second; nothing of it is lost."""
    second = s2s.SAMPLE_RATE
    speech = load_wav(fixture("en_question.wav"))
    lead_s = 8  # silence first: the question's speech starts 8 s into the audio

    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as c:
            await c.wait_for(lambda r: r.kind == "ready")
            t0 = asyncio.get_running_loop().time()
            for _ in range(lead_s):
                await c.send_audio(np.zeros(second, np.float32))
            for i in range(0, len(speech), second):
                await c.send_audio(speech[i:i + second])
            await c.send_audio(np.zeros(second, np.float32))  # the end of the turn
            heard = await c.wait_for(lambda r: r.kind == "speech_start", timeout=20)
            await c.wait_for(lambda r: r.kind == "answer" and r.data["end"], timeout=20)
            return heard.t - t0, c

    heard_after, c = run(scenario())
    assert heard_after >= lead_s - 5 - 0.2, "heard sooner than real time after the allowance"
    assert heard_after < lead_s, "the allowance was not taken at once"
    assert {e.data["code"] for e in c.events("error")} == {"audio_too_fast"}
    assert [t.data["text"] for t in c.events("transcript") if t.data["final"]] != []  # heard, and answered


def test_oversized_frame_closes_with_1009_and_idle_connection_with_4408(guarded):
    async def scenario():
        async with connect(f"{guarded.recv_url}/?uid=big1&token={TOKEN}", max_size=None) as ws:
            assert json.loads(await ws.recv())["event"] == "ready"
            await ws.send(b"\0" * (65 * 1024))  # over --max_message_kb 64
            with pytest.raises(websockets.ConnectionClosed) as big:
                await asyncio.wait_for(ws.recv(), 5)
        async with connect(f"{guarded.recv_url}/?uid=idle1&token={TOKEN}") as ws:
            assert json.loads(await ws.recv())["event"] == "ready"
            with pytest.raises(websockets.ConnectionClosed) as idle:
                await asyncio.wait_for(ws.recv(), 10)  # --idle_timeout_s 2
        return big.value.rcvd, idle.value.rcvd

    big, idle = run(scenario())
    assert big.code == 1009
    assert idle.code == 4408 and idle.reason == "idle: no message for 2 s"


def test_bad_uids_are_refused(guarded, server):
    async def scenario():
        in_url = await refusal(f"{guarded.recv_url}/?uid=../../etc&token={TOKEN}")
        sender = await refusal(f"{guarded.send_url}/?uid=.hidden&token={TOKEN}")
        async with connect(server.recv_url) as ws:  # a legacy client names its uid in its first message
            await ws.send(json.dumps({"type": "user_input", "uid": "a/b", "text": "hi"}))
            with pytest.raises(websockets.ConnectionClosed) as first:
                await asyncio.wait_for(ws.recv(), 5)
        return in_url, sender, first.value.rcvd

    for close in run(scenario()):
        assert close.code == 1008 and close.reason.startswith("uid must be 1-64 letters")


def test_legacy_clients_are_refused_when_a_token_is_set(guarded):
    """CleanS2S's client cannot keep its session private (every legacy sender hears every legacy session), so a
    server that wants a token refuses it by default (--legacy_clients auto), on both sockets, with 4426."""
    async def scenario():
        return [await refusal(f"{base}/?token={TOKEN}") for base in (guarded.recv_url, guarded.send_url)]

    for close in run(scenario()):
        assert close.code == 4426 and close.reason.startswith("legacy clients are not allowed here")


def test_a_dns_rebinding_page_is_refused(guarded):
    """A page on evil.example whose name the attacker has pointed at this server sends Host and Origin of its own
    name, which agree: auto admits a page only from an IP address, a loopback name, a listed origin, or (with TLS) a
    name this server's certificate proves."""
    port = int(guarded.recv_url.rsplit(":", 1)[1])

    async def scenario():
        sock = socket.create_connection(("127.0.0.1", port))  # where evil.example now resolves
        return await refusal(f"ws://evil.example:{port}/?uid=rebound", sock=sock, origin=f"http://evil.example:{port}",
                             **AS_BROWSER)

    close = run(scenario())
    assert (close.code, close.reason) == (4403, f"origin not allowed: http://evil.example:{port}")
    policy = s2s.AccessPolicy(None, "auto")
    assert not policy.origin_allowed("http://evil.example:9001", "evil.example:9001")
    assert policy.origin_allowed("http://192.0.2.10:9001", "192.0.2.10:9001")
    assert policy.origin_allowed("http://localhost:3000", "127.0.0.1:9001")
    assert not policy.origin_allowed("http://localhost:3000", "192.0.2.10:9001")
    assert policy.origin_allowed("https://gpu-box:9001", "gpu-box:9001", secure=True)  # the certificate proves the name


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


def test_tls_serves_wss_and_the_client_over_https(chat_api, certificate, tmp_path):
    cert, key = certificate
    (tmp_path / "index.html").write_text("<h1>voice agent</h1>")
    srv = start_server(chat_api, "--ssl_certfile", str(cert), "--ssl_keyfile", str(key), "--client_dir", str(tmp_path))
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        page = urllib.request.urlopen(f"https://127.0.0.1:{srv.recv_port}/", context=trust, timeout=10).read()
        config = json.loads(urllib.request.urlopen(f"https://127.0.0.1:{srv.recv_port}/s2s-config.json",
                                                   context=trust, timeout=10).read())

        async def scenario():
            c = ExtendedClient(f"wss://127.0.0.1:{srv.recv_port}", f"wss://127.0.0.1:{srv.send_port}", ssl=trust)
            async with c:
                await typed_turn(c)
            with pytest.raises(ssl.SSLError):  # a client that does not trust the certificate gets nowhere
                await connect(f"wss://127.0.0.1:{srv.recv_port}/?uid=x", ssl=ssl.create_default_context())

        run(scenario())
        assert page == b"<h1>voice agent</h1>" and config["receiver_port"] == srv.recv_port
        assert "ready: receiver wss://" in srv.log() and "browser client: https://" in srv.log()
    finally:
        srv.stop()


@pytest.mark.parametrize("flags, message", [
    (["--auth_token", "short"], "--auth_token must be 8-256"),
    (["--auth_token", "has space in it"], "--auth_token must be 8-256"),
    (["--ssl_certfile", "cert.pem"], "--ssl_certfile and --ssl_keyfile go together"),
    (["--ssl_certfile", "nope.pem", "--ssl_keyfile", "nope.key"], "TLS file nope.pem does not exist"),
    (["--max_text_chars", "0"], "must be positive"),
])
def test_bad_security_flags_stop_start_up_with_one_sentence(flags, message, capsys):
    with pytest.raises(SystemExit):
        s2s.parse_args(flags)
    assert message in capsys.readouterr().err


def test_behind_a_proxy_the_log_names_the_client_not_the_proxy(chat_api):
    """The test client is on 127.0.0.1, a trusted proxy by default: the log takes the client from X-Forwarded-For,
    its last address that no trusted proxy added (the first one here is whatever the client claimed). A server of
    its own: the log shows one refusal of a kind per 10 s, and another test's may have just taken that line."""
    forwarded = {"additional_headers": {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}}
    srv = start_server(chat_api, "--auth_token", TOKEN)

    async def scenario():
        async with ExtendedClient(srv.recv_url, srv.send_url, **AS_BROWSER, **forwarded) as c:
            await typed_turn(c)
        await refusal(f"{srv.recv_url}/?uid=nobody", **forwarded)
        return c

    try:
        c = run(scenario())
    finally:
        srv.stop()
    assert f"session {s2s.uid_tag(c.uid)} opened from 203.0.113.7" in srv.log()
    assert "refused a connection from 203.0.113.7: unauthorized" in srv.log()


def test_an_untrusted_peer_cannot_choose_its_logged_address():
    request = SimpleNamespace(headers=Headers({"X-Forwarded-For": "203.0.113.7"}))
    direct = SimpleNamespace(remote_address=("192.0.2.10", 50000), request=request)
    assert s2s.client_address(direct, frozenset({"127.0.0.1"})) == "192.0.2.10"
    via_proxy = SimpleNamespace(remote_address=("10.0.0.2", 50000), request=request)
    assert s2s.client_address(via_proxy, frozenset({"10.0.0.2"})) == "203.0.113.7"
    assert s2s.client_address(via_proxy, frozenset()) == "10.0.0.2"
