"""The RAG agent (s2s_server_pipeline_rag.py), offline: a tiny random-weight sentence-transformers model built here,
a folder of documents with known facts, a local Serper with result pages, and a local chat API that records its
requests and can answer with a tool call. In process: retrieval, the index on disk, web search and its budget,
the spoken-text filter. End to end: the real server in a subprocess, a WebSocket client, fixed-latency ASR/TTS."""
from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import os
import re
import ssl
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from client import ExtendedClient
from conftest import ROOT, fixture
from fake_search import FakeSerper, ForwardProxy, ToolChatAPI, tool_results
from rag_server import RAGServerProcess
from tiny_embedder import build_tiny_embedder

import s2s_server_pipeline as s2s
import s2s_server_pipeline_rag as rag

# ---- the user's documents: one fact per file, among passages that share no word with the questions ----

FESTIVAL_FACT = "The Zorblat festival takes place every March in Kelmora, with drums in every street."
BOOKING_FACT = "Visitors book rooms a year ahead."  # next to the festival's date, but not what its question asks
CAT_FACT = "我家的猫名字叫雪球，它今年三岁了，最喜欢在窗边晒太阳。"
LIGHTHOUSE_FACT = "The Brimwell lighthouse was painted green in 1911."


def filler_paragraph(topic: str) -> str:
    """About 400 characters on `topic` that share no word with the test questions."""
    return " ".join(f"Notes on {topic}, part {i}: a quiet walk along old stone paths, past small houses and tall trees."
                    for i in range(4))


DOCUMENTS = {
    "festivals.md": f"# Kelmora\n\n{FESTIVAL_FACT} {BOOKING_FACT}\n\n"
                    "The lantern festival of Orvale is held in late autumn, when nights grow long.\n\n"
                    + filler_paragraph("Kelmora markets"),
    "rivers.txt": "\n\n".join(filler_paragraph(t) for t in ("the Quenby river", "the Dask canals", "harbour boats")),
    "garden/notes.md": "\n\n".join(filler_paragraph(t) for t in ("tomatoes", "roses", "apple trees")),
    "家.md": f"{CAT_FACT}\n\n上海的冬天又湿又冷，出门要多穿衣服。北方的冬天干燥，暖气很足。",
}


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica (what pypdf reads back as the page's text)."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


def write_documents(folder) -> str:
    for name, text in DOCUMENTS.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(folder, "lighthouse.pdf"), "wb") as f:
        f.write(tiny_pdf(LIGHTHOUSE_FACT))
    return str(folder)


# ---- the web: Serper's results and the pages behind them ----

WEATHER_FACT = "Today in Dask: sunny, 21 degrees, a light wind from the west."
PAGES = {
    "dask-weather": ("<html><head><title>Dask weather</title><script>var tracking = 'do not read';</script></head><body>"
                     "<nav>Home | News | Login</nav><p>Forecast for the city of Dask.</p>"
                     f"<p>{WEATHER_FACT}</p><footer>Copyright the weather site</footer></body></html>"),
}


def web_results(query: str) -> list:
    return [("Dask weather today", "dask-weather", "Weather forecast for Dask, updated hourly."),
            ("Dask city guide", "gone", "Everything about visiting Dask.")]


class CountingEmbedder:
    """An Embedder that remembers every text it was asked to embed."""

    def __init__(self, embedder):
        self.inner, self.model_name, self.texts = embedder, embedder.model_name, []

    def encode(self, texts: list) -> np.ndarray:
        self.texts += texts
        return self.inner.encode(texts)


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory) -> str:
    return build_tiny_embedder(tmp_path_factory.mktemp("embedder"))


@pytest.fixture(scope="module")
def embedder(embedder_dir):
    e = rag.Embedder(embedder_dir, "cpu")
    e.setup()
    return e


@pytest.fixture
def docs(tmp_path) -> str:
    return write_documents(tmp_path / "docs")


# ------------------------------------------------------------------------------------------------
# In process
# ------------------------------------------------------------------------------------------------

def test_bm25_matches_chinese_by_character_pairs_and_ignores_question_words():
    assert rag.terms("When is the Zorblat festival?") == ["zorblat", "festival"]
    assert rag.terms("北京大学在哪里") == ["北京", "京大", "大学", "学在", "在哪"]
    passages = ["上海的冬天又湿又冷。", CAT_FACT, "The cat sleeps all day."]
    scores = rag.BM25([rag.terms(p) for p in passages]).scores(rag.terms("我家的猫叫什么名字？"))
    assert scores.argmax() == 1 and scores[0] == 0 and scores[2] == 0


def test_fusion_ranks_by_words_and_meaning_together():
    lexical = np.array([0.0, 0.0, 5.0, 0.0, 1.0])  # passage 2 holds the question's rare word, 4 a common one
    dense = np.array([0.9, 0.8, 0.1, 0.7, 0.2])  # the embedder prefers 0, 1 and 3
    # 2: 1/61 + 1/65; 4: 1/62 + 1/64; 0: 1/61. A word match counts, but so does meaning.
    assert rag.fuse(lexical, dense, 3) == [2, 4, 0]
    assert rag.fuse(np.array([3.0, 1.0, 0.0]), np.array([0.9, 0.1, 0.5]), 1) == [0]  # first in both: first
    assert rag.fuse(np.zeros(3), np.array([0.1, 0.9, 0.5]), 3) == [1, 2, 0]  # no word in common: meaning alone


def test_index_finds_facts_in_english_chinese_and_pdf(docs, embedder, tmp_path):
    index = rag.DocumentIndex(docs, tmp_path / "index", embedder, top_k=3)
    counts = index.refresh()
    assert counts == {"files": 5, "embedded": len(index.snapshot.passages), "removed": 0}
    assert len(index.snapshot.passages) >= 8  # well more than the 3 given to the LLM
    for question, fact, path in [("When is the Zorblat festival?", FESTIVAL_FACT, "festivals.md"),
                                 ("我家的猫叫什么名字？", CAT_FACT, "家.md"),
                                 ("What colour is the Brimwell lighthouse?", LIGHTHOUSE_FACT, "lighthouse.pdf")]:
        found = index.search(question)
        assert len(found) == 3
        holder = [s for s in found if fact in s.text]
        assert holder and holder[0].url == path and holder[0].title == os.path.basename(path), (question, found)


def test_index_persists_between_runs_and_follows_changed_files(docs, embedder, tmp_path):
    counting = CountingEmbedder(embedder)
    first = rag.DocumentIndex(docs, tmp_path / "index", counting)
    first.refresh()
    passages = len(first.snapshot.passages)
    assert os.path.isfile(tmp_path / "index" / "index.sqlite3") and len(counting.texts) == passages

    counting.texts.clear()  # a restart: everything is read back, nothing embedded again
    second = rag.DocumentIndex(docs, tmp_path / "index", counting)
    assert second.refresh() == {"files": 5, "embedded": 0, "removed": 0}
    assert counting.texts == [] and len(second.snapshot.passages) == passages
    assert any(FESTIVAL_FACT in s.text for s in second.search("When is the Zorblat festival?"))

    festivals = os.path.join(docs, "festivals.md")
    with open(festivals, "w", encoding="utf-8") as f:
        f.write(DOCUMENTS["festivals.md"].replace("every March", "every October"))
    rivers = os.path.join(docs, "rivers.txt")
    os.utime(rivers, ns=(os.stat(rivers).st_atime_ns, os.stat(rivers).st_mtime_ns + 10**9))  # touched, not changed
    os.remove(os.path.join(docs, "garden", "notes.md"))
    counting.texts.clear()
    counts = second.refresh()
    assert counts["files"] == 4 and counts["removed"] == 1 and counts["embedded"] == len(counting.texts) > 0
    assert all(text.startswith("festivals\n") for text in counting.texts)  # only the changed file was embedded again
    texts = " ".join(p.text for p in second.snapshot.passages)
    assert "every March" not in texts and "tomatoes" not in texts
    assert any("every October" in s.text for s in second.search("When is the Zorblat festival?"))


def test_a_search_brings_in_new_files_by_itself(docs, embedder, tmp_path):
    index = rag.DocumentIndex(docs, tmp_path / "index", embedder, refresh_s=0.0)
    index.refresh()
    with open(os.path.join(docs, "bridges.md"), "w", encoding="utf-8") as f:
        f.write("The Quillon bridge opened in 1887 after nine years of work.")
    index.search("warm-up")  # finds the last scan stale: re-scans in the background, this search is not held up
    index.refresher.join(30)
    assert any("1887" in s.text for s in index.search("When did the Quillon bridge open?"))
    index.refresher.join(30)


def test_spoken_text_has_no_links_citations_or_markup():
    pieces = ["**Paris** is the capital [1", "]. See htt", "ps://example.com/a-page. ", "Read [the guide](https://exa",
              "mple.com/g) or www.example.org today.", " 北京是首都【2†source】。"]
    said = list(rag.spoken_text(iter(pieces)))
    text = "".join(said)
    assert re.sub(r"\s+", " ", text).strip() == "Paris is the capital . See . Read the guide or today. 北京是首都。"
    assert said[0] == " Paris is the capital "  # held back only from the bracket that may be a citation
    assert list(rag.spoken_text(iter(["Let me look that up. "]))) == ["Let me look that up. "]  # a filler passes at once


def test_filler_follows_the_question_language_and_tools_need_a_chat_api():
    h = rag.RAGLLMHandler(s2s.EchoLLMHandler(), None, None, use_tools=True)
    assert not h.use_tools  # echo and transformers cannot call tools: documents are searched before every answer
    assert h.filler("北京今天天气怎么样？") == "我查一下。 " and h.filler("Weather in Paris?") == "Let me look that up. "
    quiet = rag.RAGLLMHandler(s2s.EchoLLMHandler(), None, None, fillers=("", ""))
    assert quiet.filler("Weather in Paris?") == ""


def test_web_search_reads_the_top_pages_within_the_deadline():
    with FakeSerper(web_results, PAGES) as serper:
        web = rag.WebSearch(serper.search_url, "serper-key", results=5, fetch_pages=2)
        found = web.search("weather in Dask", s2s.now() + 5, concurrent.futures.Future())
    assert serper.queries == ["weather in Dask"] and serper.keys == ["serper-key"]
    assert [s.title for s in found] == ["Dask weather today", "Dask city guide"]
    assert found[0].url == serper.page_url("dask-weather")
    assert WEATHER_FACT in found[0].text  # from the page, not the snippet
    assert "tracking" not in found[0].text and "Login" not in found[0].text and "Copyright" not in found[0].text
    assert found[1].text == "Everything about visiting Dask."  # its page is missing: the snippet alone
    assert sorted(serper.page_requests) == ["dask-weather", "gone"]


def lookup(serper: FakeSerper, budget_s: float, turn: s2s.Turn) -> list:
    web = rag.WebSearch(serper.search_url, "serper-key", fetch_pages=1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return rag.LookupRun(pool, {"web_search": web.search}, [("web_search", "news today")], budget_s, turn).results()


def test_a_slow_search_is_given_up_at_the_budget_and_a_failed_one_reported():
    with FakeSerper(web_results, PAGES, delay_s=10) as serper:
        turn, t0 = s2s.Turn(1, spoken=False), time.monotonic()
        results = lookup(serper, 0.5, turn)
        elapsed = time.monotonic() - t0
        assert 0.5 <= elapsed < 1.0, elapsed
        assert results[0].error == "no answer within 0.5 s" and results[0].sources == []
        assert "did not work" in results[0].for_llm()
        assert serper.hung_up.wait(2) and serper.hangups[0] - t0 < 1.0  # its connection was closed, not left waiting
        assert 500 <= turn.times.extra_ms["lookup_ms"] < 1000
    with FakeSerper(web_results, PAGES) as serper:
        serper.fail_with = 500
        results = lookup(serper, 5.0, s2s.Turn(1, spoken=False))
        assert results[0].error.startswith("Serper answered 500") and results[0].sources == []


def test_a_cancelled_turn_stops_its_lookup_at_once():
    with FakeSerper(web_results, PAGES, delay_s=10) as serper:
        turn, t0 = s2s.Turn(1, spoken=False), time.monotonic()
        threading.Timer(0.3, turn.cancel).start()  # the user cuts in 0.3 s into a 10 s budget
        assert lookup(serper, 10.0, turn) is None
        assert time.monotonic() - t0 < 1.0
        assert serper.hung_up.wait(2) and serper.hangups[0] - t0 < 1.0


@pytest.fixture
def proxy_env(monkeypatch):
    """No proxy settings from the environment the tests run in; the test sets its own."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_web_search_goes_through_the_proxy_the_environment_names(proxy_env):
    with FakeSerper(web_results, PAGES) as serper, ForwardProxy() as proxy:
        proxy_env.setenv("HTTP_PROXY", f"http://alice:s%40cret@127.0.0.1:{proxy.port}")
        web = rag.WebSearch(serper.search_url, "serper-key", results=5, fetch_pages=2)
        found = web.search("weather in Dask", s2s.now() + 5, concurrent.futures.Future())
        assert WEATHER_FACT in found[0].text and serper.keys == ["serper-key"]
        auth = "Basic " + base64.b64encode(b"alice:s@cret").decode()
        assert proxy.requests[0] == ("POST", serper.search_url, auth)  # the search and both pages, through the proxy
        assert sorted(proxy.requests[1:]) == [("GET", serper.page_url(name), auth) for name in ("dask-weather", "gone")]

        proxy_env.setenv("NO_PROXY", "localhost,127.0.0.1")  # hosts that are reached directly
        found = web.search("weather in Dask", s2s.now() + 5, concurrent.futures.Future())
        assert WEATHER_FACT in found[0].text and len(proxy.requests) == 3 and len(serper.queries) == 2


def test_an_https_search_tunnels_through_the_proxy(proxy_env):
    with FakeSerper(web_results, PAGES) as serper, ForwardProxy() as proxy:
        proxy.hosts["serper.test"] = ("127.0.0.1", int(serper.root.rsplit(":", 1)[1]))  # only the proxy can find it
        proxy_env.setenv("HTTPS_PROXY", proxy.url)
        web = rag.WebSearch("https://serper.test/search", "serper-key")
        with pytest.raises(ssl.SSLError):  # TLS starts through the tunnel: the fake Serper answers in plain HTTP
            web.search("weather in Dask", s2s.now() + 5, concurrent.futures.Future())
    assert proxy.requests == [("CONNECT", "serper.test:443", None)]


def test_a_search_through_the_proxy_is_still_given_up_at_the_budget(proxy_env):
    with FakeSerper(web_results, PAGES, delay_s=10) as serper, ForwardProxy() as proxy:
        proxy_env.setenv("HTTP_PROXY", proxy.url)
        turn, t0 = s2s.Turn(1, spoken=False), time.monotonic()
        results = lookup(serper, 0.5, turn)
        assert results[0].error == "no answer within 0.5 s" and time.monotonic() - t0 < 1.0
        assert serper.hung_up.wait(2) and serper.hangups[0] - t0 < 1.0  # the proxy passed the hang-up on
        assert [method for method, _, _ in proxy.requests] == ["POST"]


def test_findings_are_bounded_and_leave_with_their_question():
    found, history = rag.EarlierFindings(turn_chars=200, total_chars=500), s2s.ChatHistory(2)
    for n in range(4):
        turn = s2s.Turn(n + 1, spoken=False, question=f"question {n}?", answer_chunks=[(0.0, f"answer {n}.")])
        history.add(turn)
        found.add(turn, [rag.LookupResult("web_search", turn.question, [
            rag.Source(f"page {n}", "https://example.com", f"fact {n}. " + "more words " * 50)])])
    note = found.note(history)
    assert "fact 3." in note and "fact 2." in note and "question 1?" not in note  # the two exchanges the request holds
    assert note.count("words…") == 2 and len(note) < 500 + len(rag.FOUND_HEADING) + 10  # each clipped, all bounded
    history.clear()  # a new topic
    assert found.note(history) == ""


# ------------------------------------------------------------------------------------------------
# End to end: the real server, a WebSocket client, typed questions and spoken barge-in
# ------------------------------------------------------------------------------------------------

FILLER = "Let me look that up."
BUDGET_MS = 3000


def question_of(messages: list) -> str:
    """The user's new question, without what the agent put before it ("... Question: ...")."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user").rpartition("Question: ")[2]


def decide(messages: list, tools: list):
    """The fake model's choice: the festival is in the documents, weather and news are on the web."""
    question = question_of(messages).lower()
    if "festival" in question and "search_documents" in tools:
        return "search_documents", "Zorblat festival date"
    if ("weather" in question or "news" in question) and "web_search" in tools:
        return "web_search", question
    return None


def answer(messages: list) -> str:
    """Quotes what it was given that answers the question (the festival's date and Dask's weather; to a question
    on booking, the rooms), with a link and a citation mark the agent must not say."""
    given = tool_results(messages) or messages[-1]["content"]
    wanted = ("Visitors book",) if "book" in question_of(messages) else ("Zorblat festival takes", "Today in Dask")
    facts = [s for s in re.split(r"(?<=[.])\s+", given) if any(w in s for w in wanted)]
    if facts:
        return f"Here is what I found. {' '.join(facts)} More at https://example.com/more [1]."
    if "did not work" in given:
        return "Sorry, the search did not answer in time."
    return "Hello! How can I help you today?"


@pytest.fixture(scope="module")
def world(tmp_path_factory, embedder_dir):
    """Documents, a chat API and Serper, shared by the servers of this module."""
    root = tmp_path_factory.mktemp("rag")
    with ToolChatAPI(decide, answer=answer, first_token_delay_s=0.1, token_delay_s=0.01) as chat, \
            FakeSerper(web_results, PAGES) as serper:
        yield {"docs": write_documents(root / "docs"), "index": str(root / "index"), "embedder": embedder_dir,
               "chat": chat, "serper": serper}


@contextlib.contextmanager
def rag_server(world: dict, *flags: str):
    """The RAG server on the module's documents and fakes; its log must hold no traceback when it stops."""
    srv = RAGServerProcess("--asr", "fixed", "--tts", "fixed", "--tts_latency_ms", "50", "--playback_lead_ms", "0",
                           "--llm", "openai", "--lm_model_url", world["chat"].url, "--lm_model_name", "test-model",
                           "--device", "cpu", "--kb_dir", world["docs"], "--kb_index_dir", world["index"],
                           "--embed_model", world["embedder"], "--serper_url", world["serper"].search_url,
                           "--lookup_budget_ms", str(BUDGET_MS), *flags,
                           env={"LLM_API_KEY": "test-key", "SERPER_API_KEY": "serper-key"})
    try:
        yield srv
    finally:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def server(world):
    with rag_server(world) as srv:
        yield srv


def ask(server, question: str, then=None, last_turn: int = 1):
    """Type a question (then run `then(client)`); return the client, once turn `last_turn` is answered and its
    metrics are in, and when the question was sent."""
    async def scenario():
        async with ExtendedClient(server.recv_url, server.send_url) as c:
            await c.wait_for(lambda r: r.kind == "ready")
            sent = time.monotonic()
            await c.send_text(question)
            if then is not None:
                await then(c)
            await c.wait_for(lambda r: r.kind == "answer" and r.data["end"] and r.data["turn"] == last_turn, timeout=30)
            await c.wait_for(lambda r: r.kind == "metrics" and r.data["turn"] == last_turn)
            return c, sent
    return asyncio.run(scenario())


def new_requests(chat: ToolChatAPI, before: int) -> list:
    return chat.chat_requests()[before:]


def answer_text(c: ExtendedClient, turn: int) -> str:
    return "".join(a.data["text"] for a in c.events("answer", turn=turn))


def after_filler(c: ExtendedClient, turn: int) -> list:
    """The answer events of the real answer: every chunk after the filler (seq 0)."""
    return [a for a in c.events("answer", turn=turn) if a.data["seq"] >= 1]


def test_tool_call_round_trip_speaks_the_document_fact(server, world):
    chat, before = world["chat"], len(world["chat"].chat_requests())
    c, _ = ask(server, "When is the Zorblat festival?")
    first, second = new_requests(chat, before)
    assert [t["function"]["name"] for t in first["tools"]] == ["web_search", "search_documents"]
    call = first["messages"][-1]
    assert call == {"role": "user", "content": "When is the Zorblat festival?"}
    tool_message = second["messages"][-1]
    assert tool_message["role"] == "tool" and FESTIVAL_FACT in tool_message["content"]  # the passage reached the LLM
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "search_documents"
    answers = c.events("answer", turn=1)
    assert answers[0].data["text"].strip() == FILLER  # said at once, before the look-up's answer
    spoken = answer_text(c, 1)
    assert "every March in Kelmora" in spoken and "http" not in spoken and "[1]" not in spoken
    real = [a for a in c.events("audio", turn=1) if a.data["seq"] >= 1]
    assert sum(len(a.pcm) for a in real) > 16000  # more than half a second of answer audio after the filler
    sources = c.events("sources", turn=1)
    assert len(sources) == 1 and {"title": "festivals.md", "url": "festivals.md"} in sources[0].data["sources"]
    assert c.received.index(sources[0]) < c.received.index(after_filler(c, 1)[0])
    metrics = c.events("metrics", turn=1)[-1].data["metrics"]
    assert 0 < metrics["lookup_ms"] < 1000  # a local document search


def test_a_follow_up_is_answered_from_what_the_lookup_found(server, world):
    chat, before = world["chat"], len(world["chat"].chat_requests())

    async def follow_up(c: ExtendedClient) -> None:
        await c.wait_for(lambda r: r.kind == "answer" and r.data["end"] and r.data["turn"] == 1, timeout=30)
        await c.send_text("Do visitors have to book early?")
    c, _ = ask(server, "When is the Zorblat festival?", then=follow_up, last_turn=2)
    first, second, follow = new_requests(chat, before)  # a look-up and its answer, then the follow-up alone
    assert "every March" in answer_text(c, 1) and BOOKING_FACT not in answer_text(c, 1)  # found, not said
    assert any(BOOKING_FACT in m["content"] for m in follow["messages"] if m["role"] != "assistant")
    assert sum(len(m["content"] or "") for m in follow["messages"]) < 2000  # what is kept is bounded
    spoken = answer_text(c, 2)
    assert BOOKING_FACT in spoken and not spoken.strip().startswith(FILLER) and not c.events("sources", turn=2)


def test_web_search_round_trip_reads_the_page_and_sends_its_link(server, world):
    chat, serper, before = world["chat"], world["serper"], len(world["chat"].chat_requests())
    c, _ = ask(server, "What is the weather in Dask today?")
    first, second = new_requests(chat, before)
    assert serper.queries[-1] == "what is the weather in dask today?"
    assert WEATHER_FACT in second["messages"][-1]["content"]  # the fetched page's text, not only the snippet
    assert "http" not in second["messages"][-1]["content"]  # the model is not given links it could read out
    spoken = answer_text(c, 1)
    assert spoken.strip().startswith(FILLER) and "sunny, 21 degrees" in spoken and "http" not in spoken
    sources = c.events("sources", turn=1)[0].data["sources"]
    assert sources[0] == {"title": "Dask weather today", "url": serper.page_url("dask-weather")}


def test_a_question_without_lookup_costs_one_request_and_no_filler(server, world):
    chat, before = world["chat"], len(world["chat"].chat_requests())
    c, _ = ask(server, "Hello there, how are you?")
    (request,) = new_requests(chat, before)
    assert request["tools"]  # offered, not used
    assert answer_text(c, 1).strip() == "Hello! How can I help you today?"
    assert not c.events("sources") and "lookup_ms" not in c.events("metrics", turn=1)[-1].data["metrics"]


def test_a_slow_search_still_answers_within_the_budget(server, world):
    chat, serper, before = world["chat"], world["serper"], len(world["chat"].chat_requests())
    serper.delay_s, serper.hung_up = 20.0, threading.Event()
    try:
        c, sent = ask(server, "What is the news today?")
    finally:
        serper.delay_s = 0.0
    first, second = new_requests(chat, before)
    assert "did not work" in second["messages"][-1]["content"]
    answers = c.events("answer", turn=1)
    assert answers[0].data["text"].strip() == FILLER and answers[0].t - sent < 1.0  # the filler comes at once
    after = after_filler(c, 1)[0].t - sent  # the first real answer: budget + two LLM first tokens (0.1 s each) + TTS
    assert BUDGET_MS / 1000 <= after < BUDGET_MS / 1000 + 1.0, after
    assert "did not answer in time" in answer_text(c, 1)
    assert serper.hung_up.wait(2)  # the abandoned search's connection was closed
    assert BUDGET_MS <= c.events("metrics", turn=1)[-1].data["metrics"]["lookup_ms"] < BUDGET_MS + 500


def test_barge_in_during_a_lookup_cancels_it(server, world):
    chat, serper, before = world["chat"], world["serper"], len(world["chat"].chat_requests())
    serper.delay_s, serper.hung_up = 20.0, threading.Event()

    async def cut_in(c: ExtendedClient) -> None:
        await c.wait_for(lambda r: r.kind == "audio" and r.data["turn"] == 1)  # the filler plays, the search runs
        await c.stream_wav(fixture("en_interrupt.wav"))
    try:
        c, sent = ask(server, "What is the news today?", then=cut_in, last_turn=2)
    finally:
        serper.delay_s = 0.0
    interrupt = c.events("interrupt")[0]
    assert interrupt.data["turn"] == 1
    assert serper.hung_up.is_set() and serper.hangups[0] - interrupt.t < 1.0  # stopped at the barge-in
    assert serper.hangups[0] - sent < BUDGET_MS / 1000  # long before the budget would have ended it
    requests = new_requests(chat, before)
    assert not any(m["role"] == "tool" for r in requests for m in r["messages"])  # no answer made from the lookup
    assert c.events("transcript", turn=2) and c.events("answer", turn=2)  # the new turn is answered


def test_a_server_that_refuses_tool_choice_is_asked_without_it_from_then_on(world):
    chat = world["chat"]
    chat.tool_choice_refusal = "tool_choice 'none' is not supported by this model"
    try:
        with rag_server(world) as srv:
            before = len(chat.chat_requests())
            festival, _ = ask(srv, "When is the Zorblat festival?")
            middle = len(chat.chat_requests())
            weather, _ = ask(srv, "What is the weather in Dask today?")  # another session, the same server process
            log = srv.log()
    finally:
        chat.tool_choice_refusal = None
    requests = chat.chat_requests()
    shape = [[(bool(r.get("tools")), r.get("tool_choice")) for r in turn]
             for turn in (requests[before:middle], requests[middle:])]
    assert shape == [[(True, None), (True, "none"), (False, None)],  # refused (400), then asked again without
                     [(True, None), (False, None)]]  # remembered: no refused request any more
    assert "every March in Kelmora" in answer_text(festival, 1) and "sunny, 21 degrees" in answer_text(weather, 1)
    assert not festival.events("error") and not weather.events("error")
    assert log.count('does not take tools with tool_choice="none"') == 1, log


def test_without_tools_the_documents_and_the_web_go_before_every_question(world):
    chat = world["chat"]
    with rag_server(world, "--no-rag_tools", "--web_every_turn") as srv:
        before = len(chat.chat_requests())  # after the start-up check
        c, _ = ask(srv, "When is the Zorblat festival?")
    (request,) = new_requests(chat, before)  # no tools, no second request
    assert "tools" not in request
    question = request["messages"][-1]["content"]
    assert FESTIVAL_FACT in question and WEATHER_FACT in question and question.endswith("Question: When is the Zorblat festival?")
    assert answer_text(c, 1).strip().startswith(FILLER)  # a web search runs every turn: the filler covers it
    titles = [s["title"] for s in c.events("sources", turn=1)[0].data["sources"]]
    assert "festivals.md" in titles and "Dask weather today" in titles


# ------------------------------------------------------------------------------------------------
# Command line and README
# ------------------------------------------------------------------------------------------------

def test_help_lists_the_lookup_flags_and_import_does_nothing():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "s2s_server_pipeline_rag.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: s2s_server_pipeline_rag.py") and "--min_silence_ms" in out
    for flag in ("--kb_dir", "--embed_model", "--lookup_budget_ms", "--no-rag_tools", "--web_every_turn", "--filler_zh"):
        assert flag in out
    probe = ("import logging, sys; import s2s_server_pipeline_rag; assert not logging.getLogger().handlers; "
             "assert not {'torch', 'sentence_transformers', 'openai', 'pypdf'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Web search and your documents (RAG)"):readme.index("## Benchmark")]
    table = {flag for row in re.findall(r"^\| (`--.*?) \|", section, re.M) for flag in re.findall(r"`(--[\w-]+)`", row)}
    ours = {option for action in rag.add_arguments(argparse.ArgumentParser())._actions for option in action.option_strings}
    assert table == ours - {"-h", "--help"}  # the README's flag table is this file's flags, all of them
    for flag in set(re.findall(r"(?<![\w-])--[a-z][\w-]*", section)) - {"--dev"}:  # setup.sh --dev is a script's flag
        assert re.search(re.escape(flag) + r"(?![\w-])", out), f"the README's RAG section names {flag}, which --help does not know"
    assert "requirements-rag.txt" in section and "SERPER_API_KEY" in section
    with open(os.path.join(ROOT, "docs", "protocol.md"), encoding="utf-8") as f:
        protocol = f.read()
    assert f"| `{rag.SourcesEvent.event}` |" in protocol and "| `lookup_ms` |" in protocol


def test_requirements_are_pinned():
    with open(os.path.join(ROOT, "requirements-rag.txt"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", line) for line in lines), lines
    assert any(line.startswith("sentence-transformers==") for line in lines)
