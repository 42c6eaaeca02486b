#!/usr/bin/env python3
"""The voice agent of s2s_server_pipeline.py, able to look things up: on the web and in your own documents.

    SERPER_API_KEY=... LLM_API_KEY=sk-... python s2s_server_pipeline_rag.py --llm openai \\
        --lm_model_url https://api.deepseek.com --lm_model_name deepseek-chat --kb_dir ~/notes
    python s2s_server_pipeline_rag.py --llm echo --kb_dir ~/notes      # shows what the LLM would be given

Everything but the LLM step is the core server, imported unchanged: same flags, protocol and stages. Around
the LLM call (LLMHandler.respond):

    question ──▶ LLM with tools ──▶ answer                                  (no look-up: one request, as the core)
                      │
                      └─ tool call ──▶ "Let me look that up." (spoken at once)
                                       web_search ∥ search_documents, at most --lookup_budget_ms
                                       ──▶ LLM again with the results ──▶ answer; a `sources` event

Without tool calling (--no-rag_tools, --llm transformers or echo) the documents are searched before every
answer (no LLM call: tens of ms) and the web too with --web_every_turn. A barge-in stops a look-up at once.
Documents (--kb_dir: .txt, .md, .pdf) are split into passages and found by words (BM25, Chinese by character
pairs) and by meaning (a sentence-transformers model), kept in one SQLite file that a restart re-reads;
only added or changed files are embedded again. What a look-up found goes with the next questions too (bounded),
for follow-ups. Web requests go through the proxy that HTTPS_PROXY / HTTP_PROXY name, unless NO_PROXY exempts.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import hashlib
import html.parser
import http.client
import io
import json
import logging
import math
import os
import re
import socket
import sqlite3
import threading
import urllib.request
from collections import Counter, defaultdict
from contextlib import closing
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import numpy as np

import s2s_server_pipeline as s2s
from s2s_server_pipeline import now

logger = logging.getLogger("s2s.rag")

DEFAULT_EMBED_MODEL = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"  # 118 M parameters, 50+ languages
INSTALL = "pip install -r requirements-rag.txt"


# ------------------------------------------------------------------------------------------------
# Configuration: the core's flags plus this group. `python s2s_server_pipeline_rag.py --help` shows both.
# ------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("look-ups (web search and your documents)")
    g.add_argument("--kb_dir", default=None,
                   help="folder of your documents (.txt, .md, .pdf, subfolders too) to search; indexed at start-up, "
                        "re-indexed when files change; none: no document search")
    g.add_argument("--kb_index_dir", default=None, help="where the document index is kept between runs; unset: KB_DIR/.s2s_index")
    g.add_argument("--embed_model", default=DEFAULT_EMBED_MODEL,
                   help="sentence-transformers model for finding passages by meaning: hub id or local directory (runs on --device)")
    g.add_argument("--kb_top_k", type=int, default=3, help="passages of your documents given to the LLM per look-up")
    g.add_argument("--web_search", action=argparse.BooleanOptionalAction, default=True,
                   help="search the web through Serper, key from SERPER_API_KEY (without a key: no web search)")
    g.add_argument("--serper_url", default="https://google.serper.dev/search", help="Serper search endpoint")
    g.add_argument("--web_results", type=int, default=5, help="web results given to the LLM")
    g.add_argument("--web_fetch_pages", type=int, default=2,
                   help="top web results whose page is fetched for its text (within the budget); 0: Serper's snippets only")
    g.add_argument("--lookup_budget_ms", type=int, default=2500,
                   help="the longest a look-up may hold up the answer; what has not arrived by then is left out and the agent answers with what it has")
    g.add_argument("--rag_tools", action=argparse.BooleanOptionalAction, default=True,
                   help="--llm openai: offer web_search and search_documents as tools, so the model looks up only when it needs to; "
                        "--no-rag_tools (APIs without tool calling; always so for --llm transformers and echo): "
                        "search the documents before every answer, and the web too with --web_every_turn")
    g.add_argument("--web_every_turn", action="store_true", help="without tools: search the web before every answer")
    g.add_argument("--filler_en", default="Let me look that up.", help="said once while a look-up runs, to a question without Chinese characters; '' says nothing")
    g.add_argument("--filler_zh", default="我查一下。", help="said once while a look-up runs, to a question with Chinese characters; '' says nothing")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = add_arguments(s2s.build_parser())
    parser.prog = "s2s_server_pipeline_rag.py"
    parser.description = ("Real-time speech-to-speech voice agent server that can search the web and your documents "
                          "(VAD -> ASR -> LLM with look-ups -> TTS over two WebSockets).")
    return parser


# ------------------------------------------------------------------------------------------------
# What a look-up finds, and the event that tells extended clients about it.
# ------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """One thing found: a web result or a passage of a document."""
    title: str  # page title, or the document's file name
    url: str  # the page, or the document's path relative to --kb_dir
    text: str  # what the LLM reads: snippet and page text, or the passage


@dataclass
class LookupResult:
    tool: str  # "web_search" or "search_documents"
    query: str
    sources: list = dataclasses.field(default_factory=list)  # Source
    error: str = ""  # why nothing came back ("" when it worked)

    def for_llm(self) -> str:
        """The result as the LLM reads it (a tool message, or context before the question). No URLs and no numbers:
        what the model is not shown, it cannot read out."""
        if self.error:
            return f"The {TOOL_LABELS[self.tool]} did not work ({self.error}). Answer from what you know and say briefly that the look-up failed."
        if not self.sources:
            return f"The {TOOL_LABELS[self.tool]} found nothing for: {self.query}"
        return "\n\n".join(f"From {s.title}:\n{s.text}" for s in self.sources)


@dataclass
class SourcesEvent(s2s.ServerEvent):
    event: ClassVar[str] = "sources"
    turn: int
    sources: list  # {"title", "url"} of everything the answer was given, web pages and documents


# ------------------------------------------------------------------------------------------------
# Text: words for BM25 (Chinese too), passages, page text, and what the TTS may say.
# ------------------------------------------------------------------------------------------------

WORD_OR_CJK_RUN = re.compile(rf"[{s2s.CJK_CHARS}]+|[^\W_{s2s.CJK_CHARS}]+")
PASSAGE_CHARS = 600  # a passage: a few sentences, small enough that three fit a prompt cheaply
# Words that every question has: matching on them would rank passages by how chatty they are.
STOPWORDS = frozenset(
    "a about an and are as at be but by can could did do does for from had has have how i if in into is it its me my "
    "of on or our please so tell than that the their them then there these they this to us was we were what when "
    "where which who whom why will with would you your 什么 时候 哪里 怎么 请问 一下".split())


def terms(text: str) -> list:
    """Lower-cased words but STOPWORDS; a run of Chinese characters becomes its character pairs (北京大学 -> 北京 京大
    大学), which match Chinese words without a segmenter or a dictionary download."""
    out = []
    for run in WORD_OR_CJK_RUN.findall(text.lower()):
        if s2s.CJK.match(run):
            out.extend([run[i:i + 2] for i in range(len(run) - 1)] or [run])
        else:
            out.append(run)
    return [t for t in out if t not in STOPWORDS]


def split_passages(text: str, max_chars: int = PASSAGE_CHARS) -> list:
    """Paragraphs packed into passages of at most `max_chars` characters, cut at sentence ends."""
    sentences = []  # (paragraph number, sentence)
    for n, para in enumerate(re.split(r"\n\s*\n", text)):
        para, start = " ".join(para.split()), 0
        for end in [m.end() for m in s2s.HARD_BREAK.finditer(para)] + [len(para)]:
            sentence, start = para[start:end].strip(), end
            sentences += [(n, sentence[i:i + max_chars]) for i in range(0, len(sentence), max_chars)]
    passages, current, current_para = [], "", -1
    for n, sentence in sentences:
        sep = " " if n == current_para else "\n"
        if current and len(current) + len(sep) + len(sentence) > max_chars:
            passages.append(current)
            current = ""
        current, current_para = (current + sep + sentence if current else sentence), n
    return passages + [current] if current else passages


class PageText(html.parser.HTMLParser):
    """The readable text of an HTML page: no scripts, styles, navigation or forms; blocks become paragraphs."""

    SKIP = {"script", "style", "noscript", "svg", "nav", "header", "footer", "aside", "form", "template", "iframe"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "blockquote", "pre", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)

    @classmethod
    def of(cls, page: str) -> str:
        parser = cls()
        parser.feed(page)
        parser.close()
        return re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts)).strip()


def best_passages(text: str, query: str, max_chars: int) -> str:
    """The passages of a long text that share most words with the query, in their order, up to max_chars."""
    passages = split_passages(text, 300)
    scores = BM25([terms(p) for p in passages]).scores(terms(query))
    chosen, used = [], 0
    for i in sorted(range(len(passages)), key=lambda i: -scores[i]):
        if used + len(passages[i]) <= max_chars:
            chosen.append(i)
            used += len(passages[i])
    return "\n".join(passages[i] for i in sorted(chosen))


# A link's text stays, the link goes; bare URLs and citation marks ([1], [^2], 【3†source】) go.
MD_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'）)\]】，。]*[^\s<>\"'）)\]】，。.,;:!?]", re.IGNORECASE)
CITATION = re.compile(r"\[\^?\d+(?:[,，\s\-–]*\d+)*\]|【[^】]*】")
# A link or citation not yet closed at the end of the text: "[1", "[the site]", "[the site](https:", "【3", "(see".
OPEN_MARK = re.compile(r"(?:\[[^\]]*\]?(?:\([^)]*)?|【[^】]*|\([^)]*)$")
ASCII_TAIL = re.compile(r"[!-~]*$")  # the ASCII word the stream is in the middle of
HOLD_LIMIT = 300  # chars: an opening bracket that never closes is let through after this much text


def speakable(text: str) -> str:
    text = re.sub(r"\(\s*\)", "", CITATION.sub("", URL.sub("", MD_LINK.sub(r"\1", text))))
    return re.sub(r"[ \t]{2,}", " ", s2s.MARKUP.sub(" ", text))


def hold_from(text: str) -> int:
    """Where the text that may still grow into a link or citation starts; it waits for the next piece."""
    m = OPEN_MARK.search(text)
    if m and len(text) - m.start() < HOLD_LIMIT:
        return m.start()
    tail = ASCII_TAIL.search(text)
    word = tail.group().lower()
    if word and ("https://".startswith(word) or "www.".startswith(word) or URL.match(word)):
        return tail.start()
    return len(text)


def spoken_text(pieces: Iterator[str]) -> Iterator[str]:
    """The model's text without links, citation marks and markdown, so the answer shown and spoken has none.
    Holds back only a piece that may become a link (an open bracket, "htt", "www"); closing it closes `pieces`."""
    held = ""
    try:
        for piece in pieces:
            held += piece
            cut = hold_from(held)
            out, held = speakable(held[:cut]), held[cut:]
            if out:
                yield out
        rest = speakable(held)
        if rest:
            yield rest
    finally:
        if hasattr(pieces, "close"):  # a generator: a barge-in stops the model call behind it
            pieces.close()


# ------------------------------------------------------------------------------------------------
# Retrieval: BM25 by words, embeddings by meaning, fused by rank.
# ------------------------------------------------------------------------------------------------

class BM25:
    """Okapi BM25 over a fixed list of documents (each a list of terms). An inverted index: a query touches only
    the documents that hold its terms."""

    def __init__(self, docs: list, k1: float = 1.2, b: float = 0.75):
        self.n, self.k1 = len(docs), k1
        lengths = np.array([len(d) for d in docs], np.float32)
        avg = float(lengths.mean()) if self.n else 1.0
        self.norm = k1 * (1 - b + b * lengths / max(avg, 1.0))  # (n,): the length penalty of each document
        postings = defaultdict(lambda: ([], []))
        for i, doc in enumerate(docs):
            for term, tf in Counter(doc).items():
                postings[term][0].append(i)
                postings[term][1].append(tf)
        self.postings = {t: (np.array(ids), np.array(tfs, np.float32)) for t, (ids, tfs) in postings.items()}

    def scores(self, query: list) -> np.ndarray:
        """(n,) float32; 0 for a document that shares no term with the query."""
        out = np.zeros(self.n, np.float32)
        for term in set(query):
            if term in self.postings:
                ids, tf = self.postings[term]
                idf = math.log(1 + (self.n - len(ids) + 0.5) / (len(ids) + 0.5))
                out[ids] += idf * tf * (self.k1 + 1) / (tf + self.norm[ids])
        return out


RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009): rank 1 scores 1/61, rank 10 1/70
CANDIDATES = 50  # taken from each ranking before fusing


def fuse(lexical: np.ndarray, dense: np.ndarray, k: int) -> list:
    """Indices of the k best documents by reciprocal rank fusion: each scores the sum of 1 / (RRF_K + rank) over
    the rankings it is in. Only documents that share a word with the question (BM25 > 0) are ranked by words;
    every document is ranked by meaning. Ties go to the earlier document."""
    score: dict = defaultdict(float)
    lexical_order = [i for i in np.argsort(-lexical, kind="stable")[:CANDIDATES] if lexical[i] > 0]
    for ranking in (lexical_order, np.argsort(-dense, kind="stable")[:CANDIDATES]):
        for rank, i in enumerate(ranking, start=1):
            score[int(i)] += 1 / (RRF_K + rank)
    return sorted(score, key=lambda i: (-score[i], i))[:k]


class Embedder:
    """A sentence-transformers model: texts -> unit-length float32 vectors, so a dot product is the cosine."""

    def __init__(self, model: str, device: str):
        self.model_name, self.device = os.path.expanduser(model), device
        self.lock = threading.Lock()  # sessions ask at once; one forward pass at a time on a shared model

    def setup(self) -> None:
        st = s2s.require("sentence_transformers", INSTALL)
        try:
            self.model = st.SentenceTransformer(self.model_name, device=self.device)
        except Exception as exc:
            raise SystemExit(f"--embed_model {self.model_name} cannot be loaded ({type(exc).__name__}: {exc})") from None

    def encode(self, texts: list) -> np.ndarray:  # (len(texts), dim) float32
        with self.lock:
            vectors = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, np.float32).reshape(len(texts), -1)


@dataclass
class Passage:
    path: str  # relative to the documents folder, "/"-separated
    position: int  # its order in the file
    text: str

    def indexed(self) -> str:
        """What BM25 and the embedder see: the file name counts, so "my packing list" finds packing_list.md."""
        return f"{os.path.splitext(os.path.basename(self.path))[0].replace('_', ' ')}\n{self.text}"


@dataclass
class Snapshot:
    """What a search reads; a refresh builds a new one and swaps it in whole."""
    passages: list
    vectors: np.ndarray  # (n, dim) float32, unit length
    bm25: BM25


INDEX_VERSION = "1"  # bump when the passage splitting or the tables change: the index is rebuilt


class DocumentIndex:
    """Your documents as passages, found by words and by meaning. The embedded vector store is one SQLite file
    (`index_dir`/index.sqlite3: files with size, mtime and hash; passages with their vectors) that needs no
    server; searches run on an in-memory copy. A refresh embeds only files whose content changed, drops removed
    ones, and starts by itself in the background when a search finds the last scan older than `refresh_s`."""

    EXTENSIONS = (".txt", ".md", ".markdown", ".pdf")

    def __init__(self, docs_dir: str, index_dir: str, embedder: Any, top_k: int = 3, refresh_s: float = 10.0):
        self.docs_dir, self.index_dir = os.path.abspath(docs_dir), os.path.abspath(index_dir)
        self.embedder, self.top_k, self.refresh_s = embedder, top_k, refresh_s
        self.db_path = os.path.join(self.index_dir, "index.sqlite3")
        self.snapshot = Snapshot([], np.zeros((0, 0), np.float32), BM25([]))
        self.refreshing = threading.Lock()  # one refresh at a time
        self.last_scan = -math.inf
        self.refresher: Optional[threading.Thread] = None  # the latest background refresh

    # ---- keeping the store in step with the folder ----

    def scan(self) -> dict:
        """{relative path: (absolute path, size, mtime_ns)} of every document; hidden files and folders (the index) are skipped."""
        found = {}
        for root, dirs, files in os.walk(self.docs_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(root, d) != self.index_dir)
            for name in files:
                if not name.startswith(".") and name.lower().endswith(self.EXTENSIONS):
                    path = os.path.join(root, name)
                    st = os.stat(path)
                    found[os.path.relpath(path, self.docs_dir).replace(os.sep, "/")] = (path, st.st_size, st.st_mtime_ns)
        return found

    def refresh(self) -> dict:
        """Bring the store up to date with the folder, then reload the in-memory copy. Returns counts."""
        with self.refreshing:
            os.makedirs(self.index_dir, exist_ok=True)
            counts = {"files": 0, "embedded": 0, "removed": 0}
            with closing(sqlite3.connect(self.db_path)) as db, db:
                self._open_tables(db)
                stored = {row[0]: row[1:] for row in db.execute("SELECT path, size, mtime_ns, sha256 FROM files")}
                found = self.scan()
                for rel in stored.keys() - found.keys():
                    db.execute("DELETE FROM files WHERE path = ?", (rel,))
                    db.execute("DELETE FROM passages WHERE path = ?", (rel,))
                    counts["removed"] += 1
                for rel, (path, size, mtime_ns) in sorted(found.items()):
                    old = stored.get(rel)
                    if old and tuple(old[:2]) == (size, mtime_ns):
                        continue
                    with open(path, "rb") as f:
                        data = f.read()
                    sha = hashlib.sha256(data).hexdigest()
                    if not old or old[2] != sha:  # touched but unchanged files are not embedded again
                        counts["embedded"] += self._store_file(db, rel, data)
                    db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (rel, size, mtime_ns, sha))
                counts["files"] = len(found)
            self._load()
            self.last_scan = now()
            return counts

    def _open_tables(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS passages (path TEXT, position INTEGER, text TEXT, vector BLOB, PRIMARY KEY (path, position))")
        wanted = {"version": INDEX_VERSION, "embed_model": self.embedder.model_name}
        if dict(db.execute("SELECT key, value FROM meta").fetchall()) != wanted:  # another model: every vector is stale
            for table in ("meta", "files", "passages"):
                db.execute(f"DELETE FROM {table}")
            db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())

    def _store_file(self, db: sqlite3.Connection, rel: str, data: bytes) -> int:
        """Split one file into passages, embed them and store them; returns how many."""
        db.execute("DELETE FROM passages WHERE path = ?", (rel,))
        try:
            passages = [Passage(rel, i, t) for i, t in enumerate(split_passages(read_document(rel, data)))]
        except Exception as exc:  # a broken file is skipped (until it changes), not fatal
            logger.warning("document %s cannot be read, skipped: %s", rel, exc)
            return 0
        if passages:
            vectors = self.embedder.encode([p.indexed() for p in passages])
            db.executemany("INSERT INTO passages VALUES (?, ?, ?, ?)",
                           [(p.path, p.position, p.text, v.tobytes()) for p, v in zip(passages, vectors)])
        return len(passages)

    def _load(self) -> None:
        with closing(sqlite3.connect(self.db_path)) as db:
            rows = db.execute("SELECT path, position, text, vector FROM passages ORDER BY path, position").fetchall()
        passages = [Passage(path, position, text) for path, position, text, _ in rows]
        vectors = np.stack([np.frombuffer(v, np.float32) for *_, v in rows]) if rows else np.zeros((0, 0), np.float32)
        self.snapshot = Snapshot(passages, vectors, BM25([terms(p.indexed()) for p in passages]))

    def _refresh_if_due(self) -> None:
        if now() - self.last_scan > self.refresh_s and not self.refreshing.locked():
            self.last_scan = now()  # the searches that come while it starts do not start another
            self.refresher = threading.Thread(target=self._refresh_quietly, name="kb-refresh", daemon=True)
            self.refresher.start()

    def _refresh_quietly(self) -> None:
        try:
            counts = self.refresh()
            if counts["embedded"] or counts["removed"]:
                logger.info("documents re-indexed: %s", counts)
        except Exception:
            logger.exception("re-indexing %s failed", self.docs_dir)

    # ---- searching ----

    def search(self, query: str, k: Optional[int] = None) -> list:
        """The k passages that best answer `query`, best first, as Sources."""
        self._refresh_if_due()
        snap = self.snapshot
        if not snap.passages:
            return []
        lexical = snap.bm25.scores(terms(query))
        dense = snap.vectors @ self.embedder.encode([query])[0]
        return [Source(os.path.basename(p.path), p.path, p.text)
                for p in (snap.passages[i] for i in fuse(lexical, dense, k or self.top_k))]

    def describe(self) -> str:
        return f"{len({p.path for p in self.snapshot.passages})} documents, {len(self.snapshot.passages)} passages in {self.db_path}"


def read_document(name: str, data: bytes) -> str:
    if name.lower().endswith(".pdf"):
        pypdf = s2s.require("pypdf", INSTALL)
        return "\n\n".join(page.extract_text() or "" for page in pypdf.PdfReader(io.BytesIO(data)).pages)
    return data.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------
# Web search: Serper, plus the text of the top pages, within a deadline; stoppable from another thread.
# ------------------------------------------------------------------------------------------------

class LookupStopped(Exception):
    """The turn went stale or the budget ran out while the request was under way."""


@dataclass
class HTTPReply:
    status: int
    content_type: str
    body: bytes


# The sockets' own timeout runs this long past the deadline, as a backstop: the deadline is kept by settling `stop`
# (LookupRun does, at the deadline), so a look-up cut off there reads "no answer within the budget", never a
# socket timeout racing it to the same instant.
SOCKET_GRACE_S = 0.5


@dataclass
class Proxy:
    """The forward proxy a request goes through, from HTTP_PROXY / HTTPS_PROXY, NO_PROXY exempting hosts, as urllib
    reads them (lower-case names too; on macOS and Windows also the system settings). The proxy is spoken to in
    plain HTTP, as urllib does: an absolute URI for an http:// URL, a CONNECT tunnel for an https:// one."""
    host: str
    port: int
    headers: dict  # {"Proxy-Authorization": "Basic ..."} when the proxy URL names a user, else {}

    @classmethod
    def for_url(cls, parts: SplitResult) -> Optional[Proxy]:
        """The proxy for a URL; None when it is reached directly."""
        url = urllib.request.getproxies().get(parts.scheme)
        if not url or urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2]):
            return None
        proxy = urlsplit(url if "://" in url else f"http://{url}")
        if proxy.scheme not in ("http", "https") or not proxy.hostname:
            raise ValueError(f"{parts.scheme}_proxy is not an http:// proxy URL: {url[:100]}")
        headers = {}
        if proxy.username is not None:
            user = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        return cls(proxy.hostname, proxy.port or (443 if proxy.scheme == "https" else 80), headers)


def connection_for(parts: SplitResult, timeout_s: float) -> tuple:
    """(an unconnected HTTP(S) connection for the URL, directly or through its proxy; the request target to send
    on it; headers the proxy wants)."""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy = Proxy.for_url(parts)
    if parts.scheme == "https":
        if proxy is None:
            return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout_s), path, {}
        conn = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=timeout_s)
        conn.set_tunnel(parts.hostname, parts.port, headers=proxy.headers)  # TLS runs to the site, through the tunnel
        return conn, path, {}
    if proxy is None:
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s), path, {}
    origin = f"http://{parts.netloc.rpartition('@')[2]}"
    return http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout_s), origin + path, proxy.headers


def http_request(url: str, deadline: float, stop: concurrent.futures.Future, body: Optional[bytes] = None,
                 headers: Optional[dict] = None, max_bytes: int = 1 << 20, redirects: int = 3) -> HTTPReply:
    """One HTTP(S) request (POST with a body, else GET, following redirects), through the proxy the environment
    names (Proxy), given up as soon as `stop` resolves: its socket is shut down, so a blocked read returns at once
    and the server (or the proxy) sees the client go away. None starts after `deadline` (monotonic seconds), and a
    socket waits at most SOCKET_GRACE_S past it."""
    for _ in range(redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url[:100]}")
        left = deadline - now()
        if left <= 0 or stop.done():
            raise LookupStopped()
        conn, target, proxy_headers = connection_for(parts, left + SOCKET_GRACE_S)
        try:
            conn.connect()
            stop.add_done_callback(lambda _, conn=conn: shut_down(conn))  # runs at once if already stopped
            conn.request("POST" if body is not None else "GET", target, body=body,
                         headers={"User-Agent": "s2s-voice-agent", **proxy_headers, **(headers or {})})
            reply = conn.getresponse()
            location = reply.getheader("Location")
            if reply.status in (301, 302, 303, 307, 308) and location and body is None:
                url = urljoin(url, location)
                continue
            return HTTPReply(reply.status, reply.getheader("Content-Type", ""), reply.read(max_bytes))
        except OSError as exc:
            if stop.done():
                raise LookupStopped() from exc
            raise
        finally:
            conn.close()
    raise ValueError(f"too many redirects: {url[:100]}")


def shut_down(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:  # the plain socket's shutdown, also under TLS: SSLSocket's own would race the reading thread
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


PAGE_CHARS = 1500  # text kept of a fetched page: the passages that best match the query
PAGE_MARGIN_S = 0.15  # pages still loading this long before the deadline are left out, so the search returns in time


class WebSearch:
    """Google results through Serper (serper.dev), key from SERPER_API_KEY. The text of the top pages is fetched
    in parallel, and only what has arrived shortly before the deadline is used; otherwise Serper's snippets."""

    def __init__(self, url: str, api_key: str, results: int = 5, fetch_pages: int = 2):
        self.url, self.api_key, self.results, self.fetch_pages = url, api_key, results, fetch_pages
        self.pages = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="web-page")

    def search(self, query: str, deadline: float, stop: concurrent.futures.Future) -> list:
        reply = http_request(self.url, deadline, stop, body=json.dumps({"q": query, "num": self.results}).encode(),
                             headers={"X-API-KEY": self.api_key, "Content-Type": "application/json"})
        if reply.status != 200:
            raise RuntimeError(f"Serper answered {reply.status}: {reply.body[:200].decode('utf-8', 'replace')}")
        found = json.loads(reply.body)
        sources = []
        box = found.get("answerBox") or {}
        if box.get("answer") or box.get("snippet"):
            sources.append(Source(box.get("title", "answer"), box.get("link", ""), box.get("answer") or box["snippet"]))
        for item in found.get("organic", [])[:self.results]:
            sources.append(Source(item.get("title", ""), item.get("link", ""), item.get("snippet", "")))
        pages = {i: self.pages.submit(self.page_text, s.url, query, deadline, stop)
                 for i, s in enumerate(sources) if s.url and i < self.fetch_pages}
        concurrent.futures.wait(list(pages.values()), timeout=max(0.0, deadline - PAGE_MARGIN_S - now()))
        for i, page in pages.items():
            if page.done() and not page.exception() and page.result():
                sources[i].text = f"{sources[i].text}\n{page.result()}".strip()
        return sources

    def page_text(self, url: str, query: str, deadline: float, stop: concurrent.futures.Future) -> str:
        reply = http_request(url, deadline, stop, max_bytes=512 * 1024)
        kind = reply.content_type.lower()
        if reply.status != 200 or not kind.startswith(("text/html", "text/plain", "application/xhtml")):
            return ""
        charset = re.search(r"charset=([\w-]+)", kind)
        page = reply.body.decode(charset.group(1) if charset else "utf-8", errors="replace")
        return best_passages(PageText.of(page) if "html" in kind else page, query, PAGE_CHARS)


# ------------------------------------------------------------------------------------------------
# Look-ups of one turn: in parallel, under one deadline, stopped by a barge-in.
# ------------------------------------------------------------------------------------------------

def all_of(futures: list) -> concurrent.futures.Future:
    """A future resolved when every one of `futures` is."""
    joined, left, lock = concurrent.futures.Future(), [len(futures)], threading.Lock()

    def one_done(_: Any) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            s2s.settle(joined)
    for f in futures:
        f.add_done_callback(one_done)
    if not futures:
        s2s.settle(joined)
    return joined


class LookupRun:
    """The look-ups of one turn, each a (tool, query) run by `tools[tool](query, deadline, stop)`. They stop
    when the turn goes stale (Turn.cancelled) or at the deadline: nothing waits past the budget."""

    def __init__(self, pool: concurrent.futures.Executor, tools: dict, calls: list, budget_s: float, turn: s2s.Turn):
        self.turn, self.calls, self.start = turn, calls, now()
        self.deadline = self.start + budget_s
        self.stop = concurrent.futures.Future()
        turn.cancelled.add_done_callback(lambda _: s2s.settle(self.stop))
        self.futures = [pool.submit(tools[tool], query, self.deadline, self.stop) if tool in tools else None
                        for tool, query in calls]
        self.done = all_of([f for f in self.futures if f is not None])

    def wait(self, timeout_s: float) -> bool:
        """Wait until every look-up is done, the turn is stale, or timeout_s passed; True when all are done."""
        concurrent.futures.wait([self.done, self.turn.cancelled], timeout=max(0.0, timeout_s),
                                return_when=concurrent.futures.FIRST_COMPLETED)
        return self.done.done()

    def results(self) -> Optional[list]:
        """Wait (up to the deadline) and return a LookupResult per call; None when the turn went stale."""
        self.wait(self.deadline - now())
        finished = [f is not None and f.done() for f in self.futures]  # before the stop makes the rest fail
        s2s.settle(self.stop)  # whatever still runs is abandoned: its sockets close now
        self.turn.times.extra_ms["lookup_ms"] = round((now() - self.start) * 1000, 1)
        if self.turn.cancelled.done():
            return None
        results = []
        for (tool, query), f, done in zip(self.calls, self.futures, finished):
            if f is None:
                results.append(LookupResult(tool, query, error="no such tool"))
            elif not done:
                results.append(LookupResult(tool, query, error=f"no answer within {self.deadline - self.start:g} s"))
            elif f.exception() is not None:
                logger.warning("%s failed for %r: %s", tool, query, f.exception())
                error = f.exception()
                results.append(LookupResult(tool, query, error=s2s.short_error(error) or type(error).__name__))
            else:
                results.append(LookupResult(tool, query, f.result()))
        return results


# ------------------------------------------------------------------------------------------------
# What earlier look-ups found: carried into the next turns' requests, for follow-up questions.
# ------------------------------------------------------------------------------------------------

FOUND_CHARS_PER_TURN = 1000  # of what one turn's look-ups gave the model: its best-ranked sources, which come first
FOUND_CHARS = 3000  # of all turns' findings together (about 750 tokens of English), the newest kept first
FOUND_HEADING = "Found by look-ups earlier in this conversation (for follow-up questions):"


def clip(text: str, max_chars: int) -> str:
    """The text cut to at most max_chars, at a space when there is one in its second half (Chinese has none)."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars - 1]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > max_chars // 2 else cut).rstrip() + "…"


class EarlierFindings:
    """What each conversation's look-ups found, given again with its next questions, so that a follow-up ("and how
    tall is it?") still has the facts the answer left out and need not look them up again. Kept with the turn that
    looked them up (Turn.notes), so they last while its exchange is in what the LLM sees (the core's --chat_size
    window; a new topic clears it); all of them together are bounded by total_chars.

    The findings go into the new question's message, as the results do without tools ("Information found for the
    question below"), not back into the history as tool calls and tool messages: every OpenAI-compatible server
    and chat template takes a user message, also a server that refuses tools and the paths without tools
    (--no-rag_tools, transformers); a turn cut off mid-answer cannot leave a tool call without its result; and
    the request is unchanged up to the last question, so what servers cache of a conversation's prompt (and
    the transformers prefix cache) still serves it."""

    def __init__(self, turn_chars: int = FOUND_CHARS_PER_TURN, total_chars: int = FOUND_CHARS):
        self.turn_chars, self.total_chars = turn_chars, total_chars

    def add(self, turn: s2s.Turn, results: list) -> None:
        given = "\n\n".join(r.for_llm() for r in results if r.sources)
        if given:
            turn.notes["found"] = clip(given, self.turn_chars)

    def note(self, conversation: s2s.ChatHistory) -> str:
        """The findings of the past exchanges the LLM sees, newest first up to total_chars, in the order asked; ""
        when none."""
        chosen, used = [], 0
        for t in reversed(conversation.past()):
            if "found" not in t.notes:
                continue
            part = f"Asked: {t.question}\n{t.notes['found']}"
            if used + len(part) > self.total_chars:
                break
            chosen.insert(0, part)
            used += len(part)
        return "\n\n".join([FOUND_HEADING, *chosen]) if chosen else ""


def with_context(messages: list, context: list, question: str) -> list:
    """`messages` with the new question (the last message) preceded by `context` (texts; "" skipped) in its message."""
    context = [c for c in context if c]
    if not context:
        return messages
    return messages[:-1] + [{"role": "user", "content": "\n\n".join([*context, f"Question: {question}"])}]


# ------------------------------------------------------------------------------------------------
# The LLM step with look-ups. Wraps the core's LLM handler: the model call is the core's, or, with tools,
# the same OpenAI client with tools added.
# ------------------------------------------------------------------------------------------------

TOOL_LABELS = {"web_search": "web search", "search_documents": "document search"}
TOOL_SPECS = {
    "web_search": {"type": "function", "function": {
        "name": "web_search",
        "description": "Search the web. Use it for current events, prices, weather, schedules, or facts you are not sure of.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "search terms"}},
                       "required": ["query"]}}},
    "search_documents": {"type": "function", "function": {
        "name": "search_documents",
        "description": "Search the user's own documents (their notes, manuals and files). Use it when the question may be about them.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}},
                       "required": ["query"]}}},
}
SPOKEN_SOURCES = ("Say what you found in your own words: never read out links, file names, or source numbers, "
                  "and use no brackets.")
TOOLS_PROMPT = " You can look things up with your tools when you need to. " + SPOKEN_SOURCES
CONTEXT_PROMPT = " A question may come with information found for it; use it when it is relevant. " + SPOKEN_SOURCES
TOOL_CALL = object()  # yielded by _chat when the model starts calling a tool
FILLER_AFTER_S = 0.3  # without tools: a document search still running after this long gets the filler
TOOLS_NAMED = re.compile(r"tool[_ ]?choice|\btools\b", re.IGNORECASE)  # in a server's reason for refusing a request


def refuses_tools(exc: BaseException) -> bool:
    """Whether a chat request failed because the server does not take its `tools` or `tool_choice`: HTTP 400 or
    422 with a reason that names them. The core's APIError is raised from the client's error, which it keeps
    as its context, with the status code."""
    for error in (exc, exc.__cause__, exc.__context__):
        if getattr(error, "status_code", None) in (400, 422):
            return bool(TOOLS_NAMED.search(f"{s2s.short_error(error)} {exc}"))
    return False


class ToolChoiceSupport:
    """Whether the chat server takes the tools again, with tool_choice="none", in the request that answers from
    the look-up results: sent so that servers that want the tools declared when the messages hold tool calls
    get them, and so that the model answers instead of calling another tool. Some servers refuse tool_choice
    (400 or 422); learned once per process: from the first refusal on, that request goes without them."""

    def __init__(self):
        self.taken = True
        self.lock = threading.Lock()  # sessions are answered on several LLM threads; the first refusal logs

    def refused(self, exc: BaseException) -> bool:
        """Whether `exc` is the server refusing them; the first time, stop sending them and say so."""
        if not refuses_tools(exc):
            return False
        with self.lock:
            first, self.taken = self.taken, False
        if first:
            logger.warning('the chat API does not take tools with tool_choice="none" (%s): answers after a look-up '
                           "are asked for without them from now on", exc)
        return True


class RAGLLMHandler(s2s.LLMHandler):
    """The core LLM handler (`llm`) plus look-ups. With tools, the model sees web_search/search_documents and
    decides; a turn that needs no look-up costs one request, as in the core. Without tools, the documents are
    searched before every answer (and the web with `web_every_turn`), and the results go before the question."""

    name = "rag"

    def __init__(self, llm: s2s.LLMHandler, index: Optional[DocumentIndex], web: Optional[WebSearch],
                 budget_s: float = 2.5, use_tools: bool = True, web_every_turn: bool = False,
                 fillers: tuple = ("Let me look that up.", "我查一下。"), **kwargs):
        self.use_tools = use_tools and llm.takes_tools
        kwargs["system_prompt"] = (kwargs.get("system_prompt", "") + (TOOLS_PROMPT if self.use_tools else CONTEXT_PROMPT)).strip()
        super().__init__(**kwargs)
        self.llm, self.index, self.web = llm, index, web
        self.budget_s, self.web_every_turn, self.fillers = budget_s, web_every_turn, fillers
        self.found = EarlierFindings()
        self.tool_choice = ToolChoiceSupport()
        self.tools = {}
        if web is not None:
            self.tools["web_search"] = web.search
        if index is not None:
            self.tools["search_documents"] = lambda query, deadline, stop: index.search(query)

    @classmethod
    def around(cls, llm: s2s.LLMHandler, args: argparse.Namespace) -> RAGLLMHandler:
        """The core's handler for --llm, with the look-ups the flags ask for."""
        if min(args.kb_top_k, args.web_results, args.lookup_budget_ms) <= 0 or args.web_fetch_pages < 0:
            raise SystemExit("--kb_top_k, --web_results and --lookup_budget_ms must be positive, --web_fetch_pages at least 0")
        index = None
        if args.kb_dir:
            if not os.path.isdir(os.path.expanduser(args.kb_dir)):
                raise SystemExit(f"--kb_dir {args.kb_dir} is not a folder")
            docs = os.path.expanduser(args.kb_dir)
            embedder = Embedder(args.embed_model, s2s.resolve_device(args.device))
            index = DocumentIndex(docs, os.path.expanduser(args.kb_index_dir or os.path.join(docs, ".s2s_index")),
                                  embedder, args.kb_top_k)
        web, key = None, os.environ.get("SERPER_API_KEY", "")
        if args.web_search and key:
            web = WebSearch(args.serper_url, key, args.web_results, args.web_fetch_pages)
        elif args.web_search:
            logger.warning("SERPER_API_KEY is not set: no web search (--no-web_search turns it off without this warning)")
        if args.web_every_turn and (args.rag_tools and args.llm == "openai"):
            logger.warning("--web_every_turn applies without tools (--no-rag_tools); the model decides when to search")
        return cls(llm, index, web, args.lookup_budget_ms / 1000, args.rag_tools, args.web_every_turn,
                   (args.filler_en, args.filler_zh), **cls.common_args(args))

    def setup(self) -> None:
        self.llm.setup()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="lookup")
        if self.index is not None:
            self.index.embedder.setup()
            counts = self.index.refresh()
            logger.info("documents in %s: %d files, %d passages embedded now, %d files removed from the index",
                        self.index.docs_dir, counts["files"], counts["embedded"], counts["removed"])
        if not self.tools:
            logger.warning("nothing to look up: set SERPER_API_KEY and/or --kb_dir")

    def warmup(self) -> None:
        self.llm.warmup()
        if self.index is not None:
            self.index.search("warm-up")  # the embedder's first call pays for lazy initialisation

    def describe(self) -> str:
        when = "when the model calls a tool" if self.use_tools else "before every answer"
        web = self.web is not None and (self.use_tools or self.web_every_turn)  # without tools, only with web_every_turn
        parts = ["web search (Serper)" if web else "", f"documents ({self.index.describe()})" if self.index else ""]
        return f"{self.llm.describe()}; looks up {when}: {', '.join(p for p in parts if p) or 'nothing'}"

    def stream(self, messages: list) -> Iterator[str]:
        return self.llm.stream(messages)

    def filler(self, question: str) -> str:
        """The filler for the question's language; its trailing space lets the chunker cut it off at once."""
        text = (self.fillers[1] if s2s.CJK.search(question) else self.fillers[0]).strip()
        return f"{text} " if text else ""

    def respond(self, msg: s2s.UserText, turn: s2s.Turn, messages: list) -> Iterator[str]:
        if not self.tools:
            return spoken_text(self.llm.stream(messages))
        answer = self._answer_with_tools if self.use_tools else self._answer_with_context
        return spoken_text(answer(msg, turn, messages))

    def _answer_with_tools(self, msg: s2s.UserText, turn: s2s.Turn, messages: list) -> Iterator[str]:
        messages = with_context(messages, [self.found.note(msg.session.history)], msg.text)
        calls: dict = {}  # index -> {"id", "name", "arguments"}, as the stream spells them out
        said = []  # what the model wrote before (or instead of) calling tools
        for piece in self._chat(messages, calls, tools=[TOOL_SPECS[t] for t in self.tools]):
            if piece is TOOL_CALL:
                if not said:  # the model said nothing yet: the filler covers the wait
                    yield self.filler(msg.text)
                continue
            said.append(piece)
            yield piece
        if not calls:
            return  # answered without looking anything up: one request, as in the core
        calls = [{**calls[i], "id": calls[i]["id"] or f"call_{i}"} for i in sorted(calls)]  # some servers send no id
        results = LookupRun(self.pool, self.tools, [(c["name"], tool_query(c["arguments"], msg.text)) for c in calls],
                            self.budget_s, turn).results()
        if results is None:
            return  # barge-in: the user said something new
        self._send_sources(msg, results)
        self.found.add(turn, results)
        followup = messages + [
            {"role": "assistant", "content": "".join(said) or None, "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]},
            *({"role": "tool", "tool_call_id": c["id"], "content": r.for_llm()} for c, r in zip(calls, results))]
        yield from self._answer_from_results(followup)

    def _answer_from_results(self, followup: list) -> Iterator[str]:
        """The answer to a request that holds the look-up results: with the tools and tool_choice="none" while the
        server takes them; when it refuses them (before any text), the same request again without them."""
        if self.tool_choice.taken:
            answered = False
            try:
                with closing(self._chat(followup, None, tools=[TOOL_SPECS[t] for t in self.tools], tool_choice="none")) as pieces:
                    for piece in pieces:
                        answered = True
                        yield piece
                return
            except s2s.APIError as exc:
                if answered or not self.tool_choice.refused(exc):
                    raise
        yield from self._chat(followup, None)

    def _answer_with_context(self, msg: s2s.UserText, turn: s2s.Turn, messages: list) -> Iterator[str]:
        web = self.web is not None and self.web_every_turn
        calls = [(tool, msg.text) for tool in self.tools if web or tool == "search_documents"]
        if not calls:  # web search only, and not every turn: nothing is ever looked up
            yield from self.llm.stream(messages)
            return
        earlier = self.found.note(msg.session.history)
        run = LookupRun(self.pool, self.tools, calls, self.budget_s, turn)
        if web or not run.wait(FILLER_AFTER_S):  # a web search is slow; a document search usually is not
            yield self.filler(msg.text)
        results = run.results()
        if results is None:
            return
        self._send_sources(msg, results)
        self.found.add(turn, results)
        found = "\n\n".join(r.for_llm() for r in results)
        context = [earlier, f"Information found for the question below:\n\n{found}"]
        yield from self.llm.stream(with_context(messages, context, msg.text))

    def _chat(self, messages: list, calls: Optional[dict], **request: Any) -> Iterator[Any]:
        """One streamed chat request through the core handler: yields the answer's text, and TOOL_CALL once when
        the model starts calling tools, whose parts are gathered into `calls` (None: ignored). Closing it (a
        barge-in) closes the HTTP stream."""
        with closing(self.llm.deltas(messages, **request)) as deltas:
            for delta in deltas:
                if delta.get("content"):
                    yield delta["content"]
                for index, call_id, name, arguments in s2s.tool_call_pieces(delta) if calls is not None else []:
                    if not calls:
                        yield TOOL_CALL
                    call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
                    call["id"] = call_id or call["id"]
                    call["name"] += name
                    call["arguments"] += arguments

    def _send_sources(self, msg: s2s.UserText, results: list) -> None:
        sources, seen = [], set()
        for r in results:
            for s in r.sources:
                if (s.title, s.url) not in seen:
                    seen.add((s.title, s.url))
                    sources.append({"title": s.title, "url": s.url})
        if sources:
            msg.session.send_event(SourcesEvent(msg.turn, sources))


def tool_query(arguments: str, fallback: str) -> str:
    """The `query` of a tool call's JSON arguments; the user's question when the model wrote none or bad JSON."""
    try:
        query = json.loads(arguments or "{}").get("query")
    except (json.JSONDecodeError, AttributeError):
        query = None
    return query if isinstance(query, str) and query.strip() else fallback


# ------------------------------------------------------------------------------------------------
# Main: the core's, with this file's flags and LLM handler.
# ------------------------------------------------------------------------------------------------

def build_handlers(args: argparse.Namespace) -> tuple:
    asr, llm, tts = s2s.build_handlers(args)
    return asr, RAGLLMHandler.around(llm, args), tts


def main(argv: Optional[list] = None, parser: Optional[argparse.ArgumentParser] = None) -> None:
    s2s.main(argv, parser=parser or build_parser(), handlers=build_handlers)


if __name__ == "__main__":
    main()
