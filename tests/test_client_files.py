"""The server serves the built browser client over HTTP on the receiver port, beside the WebSocket."""
from __future__ import annotations

import asyncio
import http.client
import json

import pytest

from client import ExtendedClient
from conftest import start_server

import s2s_server_pipeline as s2s


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "out").mkdir()
    (root / "out" / "index.html").write_text("<html>home</html>")
    (root / "out" / "settings.html").write_text("<html>settings</html>")
    (root / "out" / "_next" / "static").mkdir(parents=True)
    (root / "out" / "_next" / "static" / "app-1a2b.js").write_text("console.log(1)")
    (root / "secret.txt").write_text("outside the client folder")
    return root / "out"


@pytest.fixture(scope="module")
def site_server(chat_api, client_dir):
    srv = start_server(chat_api, "--client_dir", str(client_dir))
    yield srv
    srv.stop()


def get(port: int, path: str) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def test_pages_and_assets_are_served(site_server):
    status, headers, body = get(site_server.recv_port, "/")
    assert (status, body) == (200, b"<html>home</html>")
    assert headers["Content-Type"].startswith("text/html")
    assert get(site_server.recv_port, "/settings")[2] == b"<html>settings</html>"  # Next.js export: page.html
    status, headers, body = get(site_server.recv_port, "/_next/static/app-1a2b.js?v=1")
    assert status == 200 and body == b"console.log(1)"
    assert "javascript" in headers["Content-Type"] and "immutable" in headers["Cache-Control"]


def test_config_tells_the_page_where_the_sender_is(site_server):
    status, headers, body = get(site_server.recv_port, "/s2s-config.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"protocol": 3, "sample_rate": 16000,
                                "receiver_port": site_server.recv_port, "sender_port": site_server.send_port}


@pytest.mark.parametrize("path", ["/missing.js", "/../secret.txt", "/%2e%2e/secret.txt", "/_next/../../secret.txt"])
def test_nothing_outside_the_client_folder(site_server, path):
    status, _, body = get(site_server.recv_port, path)
    assert status == 404 and b"outside" not in body


def test_websocket_on_the_same_port_still_works(site_server):
    async def scenario():
        async with ExtendedClient(site_server.recv_url, site_server.send_url) as c:
            await c.send_text("hello there")
            return await c.wait_for(lambda r: r.kind == "answer" and r.data["end"])

    assert asyncio.run(scenario()).data["turn"] == 1
    assert site_server.alive()


def test_client_dir_without_a_build_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        s2s.parse_args(["--client_dir", str(tmp_path)])
    assert "npm run build" in capsys.readouterr().err


def test_auto_serves_nothing_when_the_client_is_not_built(monkeypatch, tmp_path):
    monkeypatch.setattr(s2s, "__file__", str(tmp_path / "s2s_server_pipeline.py"))
    assert s2s.parse_args([]).client_dir is None
    (tmp_path / "frontend_nextjs" / "out").mkdir(parents=True)
    (tmp_path / "frontend_nextjs" / "out" / "index.html").write_text("x")
    assert s2s.parse_args([]).client_dir == str(tmp_path / "frontend_nextjs" / "out")



def test_behind_a_proxy_the_config_names_where_clients_reach_the_sockets():
    args = s2s.parse_args(["--client_dir", "", "--public_receiver_url", "wss://voice.example.com/recv",
                           "--public_sender_url", ":9443"])
    assert s2s.page_config(args) == {"protocol": 3, "sample_rate": 16000, "receiver_url": "wss://voice.example.com/recv",
                                     "receiver_port": 443, "sender_port": 9443}
    for wrong in ("https://voice.example.com", "9001", ":0", "ws://voice.example.com/?token=x", "ws:///recv"):
        with pytest.raises(SystemExit):
            s2s.parse_args(["--client_dir", "", "--public_receiver_url", wrong])
