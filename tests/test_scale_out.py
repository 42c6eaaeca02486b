"""Scale-out: two real server processes behind nginx, configured by deploy/nginx.conf itself (only its ports are
changed), all on 127.0.0.1. A session's two sockets must reach the same process, sessions must spread over both
processes, and one process's restart must leave the other's sessions alone.

Which process holds a session: each server logs `session UID opened` when the session's receiver socket opens it.
That its sender socket reached the same process shows in the answer: a process sends a session's answer only on
sender sockets connected to it, so a session split over two processes never hears one."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.protocol import State

from client import ExtendedClient, LegacyClient, load_wav
from conftest import ROOT, fixture, start_server
from test_browser import ARTIFACTS, BUILT, check_ran, receiver_readies, run_page, silence, write_mic
from test_browser import MISSING as BROWSER_MISSING
from server_process import free_port, stop_process

from s2s_server_pipeline import uid_tag

# Debian installs it in /usr/sbin, which is not on the PATH of users other than root.
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup.sh --dev installs it)")

SITE_CONF = os.path.join(ROOT, "deploy", "nginx.conf")
# Answers arrive as fast as the TTS makes them (no pacing to playback), so each turn takes a fraction of a second.
SERVER_FLAGS = ("--max_sessions", "32", "--playback_lead_ms", "60000")


def render_site(a_ports: tuple, b_ports: tuple, front_ports: tuple, log_dir) -> str:
    """deploy/nginx.conf with the test's ports for its example ones (process 1 is A, process 2 is B), and its access
    log in log_dir."""
    text = "\n".join(line.split("#", 1)[0].rstrip() for line in open(SITE_CONF).read().splitlines())  # no comments
    (a_recv, a_send), (b_recv, b_send), (front_recv, front_send) = a_ports, b_ports, front_ports
    for old, new in (("127.0.0.1:9101", f"127.0.0.1:{a_recv}"), ("127.0.0.1:9201", f"127.0.0.1:{a_send}"),
                     ("127.0.0.1:9102", f"127.0.0.1:{b_recv}"), ("127.0.0.1:9202", f"127.0.0.1:{b_send}"),
                     ("listen 9001;", f"listen 127.0.0.1:{front_recv};"),
                     ("listen 9002;", f"listen 127.0.0.1:{front_send};")):
        assert text.count(old) == 1, f"deploy/nginx.conf should have {old!r} once"
        text = text.replace(old, new)
    return text.replace("/var/log/nginx/s2s_access.log", os.path.join(str(log_dir), "s2s_access.log"))


class Nginx:
    """nginx in the foreground, as whoever runs the tests: every path it writes is under `directory`."""

    def __init__(self, directory, site: str, ports: tuple):
        d = str(directory)
        self.error_log = os.path.join(d, "error.log")
        with open(os.path.join(d, "s2s.conf"), "w") as f:
            f.write(site)
        # nginx creates every temporary folder at start-up, by default under /var/lib/nginx.
        temp = "".join(f"    {kind}_temp_path {d}/{kind}_temp;\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"pid {d}/nginx.pid;\nerror_log {self.error_log} info;\nworker_processes 1;\n"
                    f"events {{ worker_connections 512; }}\n"
                    f"http {{\n    access_log {d}/access.log;\n{temp}    include {d}/s2s.conf;\n}}\n")
        cmd = [NGINX, "-p", d, "-c", conf]
        version = re.search(r"/(\d+)\.(\d+)\.(\d+)", subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr)
        if version and tuple(map(int, version.groups())) >= (1, 19, 5):
            cmd += ["-e", self.error_log]  # even start-up messages stay out of the system-wide error log
        check = subprocess.run(cmd + ["-t"], capture_output=True, text=True)
        assert check.returncode == 0, f"nginx -t rejects deploy/nginx.conf:\n{check.stderr}"
        with open(os.path.join(d, "stderr.log"), "w") as stderr:
            self.proc = subprocess.Popen(cmd + ["-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 10
        for port in ports:  # bounded: nginx listens within milliseconds, or has failed
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"nginx did not start:\n{self.log()}") from None
                    time.sleep(0.05)

    def log(self) -> str:
        text = ""
        for name in (self.error_log, os.path.join(os.path.dirname(self.error_log), "stderr.log")):
            if os.path.exists(name):
                with open(name) as f:
                    text += f.read()
        return text

    def stop(self) -> None:
        stop_process(self.proc, 10)


class Cluster:
    """Processes A and B behind one nginx. B can be stopped and started again on its ports."""

    def __init__(self, chat_api, site_dir, tmp_dir):
        # nginx's ports, which the processes tell pages about: the receiver's as a whole URL, the sender's as a port
        # on the page's own host (the two forms of the --public_* flags)
        front = (free_port(), free_port())
        self.site_dir = str(site_dir)
        self.flags = (*SERVER_FLAGS, "--client_dir", self.site_dir, "--public_receiver_url", f"ws://127.0.0.1:{front[0]}/",
                      "--public_sender_url", f":{front[1]}")
        self.chat_api = chat_api
        servers: dict = {}
        failures: list = []

        def start(name):
            try:
                servers[name] = self.start_server()
            except Exception as exc:  # noqa: BLE001 (reported below, with the server's log)
                failures.append(exc)

        threads = [threading.Thread(target=start, args=(name,)) for name in "AB"]
        for t in threads:  # both load their models at once
            t.start()
        for t in threads:
            t.join()
        try:
            if failures:
                raise failures[0]
            self.a, self.b = servers["A"], servers["B"]
            self.old_b: list = []  # B before its restarts, for their logs
            site = render_site((self.a.recv_port, self.a.send_port), (self.b.recv_port, self.b.send_port), front, tmp_dir)
            self.nginx = Nginx(tmp_dir, site, front)
        except BaseException:
            for server in servers.values():
                server.stop()
            raise
        self.front_recv, self.front_send = front
        self.recv_url, self.send_url = f"ws://127.0.0.1:{front[0]}", f"ws://127.0.0.1:{front[1]}"

    def start_server(self, *ports: str):
        return start_server(self.chat_api, *self.flags, *ports)

    def restart_b(self) -> None:
        """Starts B again on its old ports (the later --recv_port/--send_port flags win); returns when it listens."""
        old = self.b
        new = self.start_server("--recv_port", str(old.recv_port), "--send_port", str(old.send_port))
        new.recv_port, new.send_port = old.recv_port, old.send_port
        self.old_b.append(old)
        self.b = new

    def where(self, uid: str, timeout: float = 5.0) -> str:
        """Which process opened the session: "A" or "B" (the current B). Fails if none or both did."""
        opened = f"session {uid_tag(uid)} opened"
        deadline = time.monotonic() + timeout
        while True:  # bounded: the log line is written before the answer the caller already has
            found = [name for name, s in (("A", self.a), ("B", self.b)) if opened in s.log()]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(found) == 1, f"session {uid} opened on {found or 'no process'}"
        return found[0]

    def stop(self) -> None:
        self.nginx.stop()
        for s in (self.a, self.b):
            s.stop()


@pytest.fixture(scope="module")
def cluster(chat_api, tmp_path_factory):
    """The browser client when it is built, so a real browser can load it through nginx; else a stand-in page."""
    site = BUILT
    if BROWSER_MISSING:
        site = tmp_path_factory.mktemp("site")
        (site / "index.html").write_text("<html>s2s page</html>")
    c = Cluster(chat_api, site, tmp_path_factory.mktemp("nginx"))
    yield c
    c.stop()
    for s in (c.a, c.b, *c.old_b):
        assert "Traceback" not in s.log(), s.log()


def run(coro):
    return asyncio.run(coro)


def answer_text(c, turn: int) -> str:
    return "".join(r.data["text"] for r in c.received if r.kind == "answer" and r.data["turn"] == turn)


def audio_s(c, turn: int) -> float:
    return sum(len(r.pcm) for r in c.received if r.kind == "audio" and r.data["turn"] == turn) / 2 / 16000


async def open_session(cluster, uid: str) -> ExtendedClient:
    """Both sockets connected through nginx, and the sender socket's `ready` received."""
    c = await ExtendedClient(cluster.recv_url, cluster.send_url, uid=uid).__aenter__()
    await c.wait_for(lambda r: r.kind == "ready")
    return c


async def ask(c: ExtendedClient, text: str, turn: int, timeout: float = 20) -> None:
    """A typed turn, answered in full (text and audio) on the client's sender socket."""
    await c.send_text(text)
    await c.wait_for(lambda r: r.kind == "answer" and r.data["turn"] == turn and r.data["end"], timeout)
    assert text in answer_text(c, turn) and audio_s(c, turn) > 1, (answer_text(c, turn), audio_s(c, turn))


def test_each_session_stays_on_one_process_and_sessions_spread(cluster):
    uids = [f"spread-{i:02d}" for i in range(20)]

    async def session(uid):
        async with ExtendedClient(cluster.recv_url, cluster.send_url, uid=uid) as c:
            await c.wait_for(lambda r: r.kind == "ready")
            await ask(c, f"question from {uid}", 1)

    async def scenario():
        await asyncio.gather(*map(session, uids))

    run(scenario())  # every session heard its own answer: its sender socket is on its receiver's process
    where = {uid: cluster.where(uid) for uid in uids}  # and each session opened on exactly one process
    counts = {name: sum(1 for p in where.values() if p == name) for name in "AB"}
    assert counts["A"] and counts["B"], f"all 20 sessions on one process: {where}"


def test_spoken_turn_and_legacy_client_through_nginx(cluster):
    async def scenario():
        async with ExtendedClient(cluster.recv_url, cluster.send_url, uid="spoken-1") as c:
            await c.stream_wav(fixture("en_question.wav"))
            await c.wait_for(lambda r: r.kind == "answer" and r.data["end"])
        # CleanS2S's client: no uid in either URL, so both sockets are placed by the client's address.
        async with LegacyClient(cluster.recv_url, cluster.send_url, uid="legacy-1") as lc:
            await lc.send_text("a legacy question")
            await lc.wait_for(lambda r: r.kind == "legacy" and r.data["end_flag"])
        return c, lc

    c, lc = run(scenario())
    transcript = c.events("transcript")[0].data["text"]
    assert transcript.startswith("heard ") and answer_text(c, 1).startswith(f"About {transcript}:")
    assert audio_s(c, 1) > 1
    legacy = [r.data for r in lc.received if r.kind == "legacy"]
    assert "a legacy question" in "".join(m["answer_text"] for m in legacy)
    assert sum(len(m["answer_audio"]) for m in legacy) * 3 / 4 / 2 / 16000 > 1  # base64 int16: over a second
    assert cluster.where("spoken-1") in "AB" and cluster.where("legacy-1") in "AB"


def test_page_and_its_config_through_nginx(cluster):
    def get(path: str) -> tuple:
        conn = http.client.HTTPConnection("127.0.0.1", cluster.front_recv, timeout=10)
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    with open(os.path.join(cluster.site_dir, "index.html"), "rb") as f:
        assert get("/") == (200, f.read())
    status, body = get("/s2s-config.json")
    # The page opens its sockets on the ports named here: nginx's (the processes' --public_* flags), not their own.
    assert status == 200 and json.loads(body) == {
        "protocol": 3, "sample_rate": 16000, "receiver_url": f"ws://127.0.0.1:{cluster.front_recv}/",
        "receiver_port": cluster.front_recv, "sender_port": cluster.front_send}


@pytest.mark.skipif(BROWSER_MISSING is not None, reason=BROWSER_MISSING or "")
def test_the_browser_client_talks_through_nginx(cluster, tmp_path):
    """The page loaded from nginx's port asks a process where its sockets are, is told nginx's ports, and holds a
    spoken and a typed turn through nginx, both sockets on one process."""
    mic_wav, screenshot = str(tmp_path / "mic.wav"), os.path.join(ARTIFACTS, "browser_nginx.png")
    os.makedirs(ARTIFACTS, exist_ok=True)
    write_mic(mic_wav, silence(1.0), load_wav(fixture("en_question.wav")), silence(6.0))
    page = run_page("proxied", f"http://127.0.0.1:{cluster.front_recv}/", mic_wav, screenshot)
    check_ran(page, cluster.a.log() + cluster.b.log())
    spoken = page["spoken"][0]
    assert re.fullmatch(r"heard \d+\.\d seconds", spoken["user"]) and spoken["answer"].startswith(f"About {spoken['user']}:")
    assert page["typed"][-1]["answer"].startswith("About through the proxy:"), page["typed"]
    fronts = [f"ws://127.0.0.1:{port}/" for port in (cluster.front_recv, cluster.front_send)]  # receiver, sender
    assert [s["url"].split("?")[0] for s in page["sockets"]] == fronts, page["sockets"]
    uid = receiver_readies(page)[0]["uid"]
    cluster.where(uid)  # exactly one process opened the session, and it answered on its own sender socket


def test_restarting_one_process_leaves_the_other_alone(cluster):
    async def session_on(process: str, prefix: str) -> ExtendedClient:
        """A connected session that landed on `process`, found by trying uids, with its first turn answered."""
        for i in range(40):
            c = await open_session(cluster, f"{prefix}-{i}")
            await ask(c, "hello", 1)
            if cluster.where(c.uid) == process:
                return c
            await c.__aexit__(None, None, None)
        raise AssertionError(f"none of 40 uids landed on {process}")

    async def refused(uid: str) -> None:
        """Both sockets of a new session whose process is down fail cleanly: 502 from nginx, no other process."""
        for url in (cluster.recv_url, cluster.send_url):
            with pytest.raises(InvalidStatus) as refusal:
                async with connect(f"{url}/?uid={uid}"):
                    pass
            assert refusal.value.response.status_code == 502
        assert f"session {uid_tag(uid)} opened" not in cluster.a.log()

    async def scenario():
        on_a = await session_on("A", "keep")
        on_b = await session_on("B", "restart")
        await asyncio.to_thread(cluster.b.stop)
        await asyncio.wait_for(on_b.send.wait_closed(), 10)  # B's sessions end with it...
        await on_b.__aexit__(None, None, None)
        await ask(on_a, "while B is down", 2)  # ...A's goes on, turn after turn
        await refused(on_b.uid)
        restart = asyncio.create_task(asyncio.to_thread(cluster.restart_b))
        await ask(on_a, "while B starts", 3)
        assert not restart.done(), "B started again before A answered: nothing was checked during the restart"
        await restart
        await ask(on_a, "after B is back", 4)
        assert on_a.recv.state is State.OPEN and on_a.send.state is State.OPEN  # the same two sockets all along
        # B's keys work again, on the new B: the same uid as before, both of its sockets there.
        again = await open_session(cluster, on_b.uid)
        await ask(again, "B is back", 1)
        await again.__aexit__(None, None, None)
        await on_a.__aexit__(None, None, None)
        return on_a, on_b

    on_a, on_b = run(scenario())
    assert cluster.where(on_b.uid) == "B"
    assert cluster.a.log().count(f"session {uid_tag(on_a.uid)} opened") == 1  # one session on A throughout
