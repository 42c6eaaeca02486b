"""The OpenAI-compatible LLM handler, through the real openai client, against a local SSE server."""
import concurrent.futures
import threading
import time

import pytest

from fakes import FakeChatAPI

import s2s_server_pipeline as s2s


def handler(api, timeout_s=5.0):
    h = s2s.OpenAILLMHandler(api.url, "test-model", 0.3, 64, timeout_s, system_prompt="Be brief.")
    h.setup()
    return h


def test_streams_tokens_and_sends_the_conversation(monkeypatch):
    monkeypatch.setenv("LLM_API_KEY", "sk-test")
    with FakeChatAPI(answer=lambda m: "Paris is the capital of France.") as api:
        h = handler(api)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "capital of France?"}]
        tokens = list(h.stream(messages))
        assert "".join(tokens) == "Paris is the capital of France."
        assert len(tokens) == 6  # streamed, not one block
        assert api.requests[-1]["auth"] == "Bearer sk-test"
        body = api.chat_requests()[-1]
        assert body["messages"] == messages and body["stream"] is True
        assert body["model"] == "test-model" and body["max_tokens"] == 64


def test_answers_one_after_another_keep_their_connection_and_a_cut_one_gives_it_up():
    """The fake ends each reply's body right after [DONE], as OpenAI's API does. Read to that end, a connection serves
    the next request, also after the user's next turn took a while: a remote API's first token then comes without a
    TCP and a TLS handshake first (the SDK's own stream reader closed it at [DONE], so every turn opened a new one,
    and its pool drops an idle one after 5 s). A reply cut off mid-answer, as at a barge-in,
    closes its connection: the server stops generating."""
    with FakeChatAPI(answer=lambda m: "Paris is the capital of France.", token_delay_s=0.02) as api:
        h = handler(api)
        asked = [{"role": "user", "content": "capital of France?"}]
        for _ in range(3):
            assert "".join(h.stream(asked)) == "Paris is the capital of France."
        time.sleep(5.5)  # the user listens to the answer, then speaks: past the SDK's own keep-alive (5 s)
        assert "".join(h.stream(asked)) == "Paris is the capital of France."
        assert api.connections_opened == 1
        cut = h.stream(asked)
        next(cut)
        cut.close()
        assert "".join(h.stream(asked)) == "Paris is the capital of France."
        assert api.connections_opened == 2 and api.streams[-2]["done"].wait(5) and api.streams[-2]["client_closed"]


def test_token_counts_are_asked_for_and_a_server_that_refuses_them_still_answers(caplog):
    with FakeChatAPI(answer=lambda m: "Two words.") as api:
        h = handler(api)
        asked = [{"role": "user", "content": "count"}]
        usage: dict = {}
        assert "".join(d["content"] for d in h.deltas(asked, usage=usage) if d.get("content")) == "Two words."
        assert usage == {"input_tokens": 1, "output_tokens": 2}
        assert api.chat_requests()[-1]["stream_options"] == {"include_usage": True}
        api.refuses_stream_options = True  # an older OpenAI-compatible server: 400 for the unknown argument
        with caplog.at_level("WARNING", logger="s2s"):
            for _ in range(2):
                usage = {}
                assert "".join(d["content"] for d in h.deltas(asked, usage=usage) if d.get("content")) == "Two words."
                assert usage == {}
        assert ["stream_options" in body for body in api.chat_requests()[-3:]] == [True, False, False]
        assert [r.getMessage() for r in caplog.records].count(
            "the chat API refuses stream_options (Unrecognized request argument supplied: stream_options): "
            "token counts are not reported") == 1


def test_server_error_raises_a_clear_exception():
    with FakeChatAPI() as api:
        api.fail_with = 503
        with pytest.raises(s2s.APIError, match=r"LLM API at .* answered 503: the model is overloaded"):
            list(handler(api).stream([{"role": "user", "content": "hi"}]))


def test_start_up_check_asks_for_one_token_and_stops_on_a_bad_key():
    with FakeChatAPI() as api:
        h = handler(api)
        s2s.load("LLM", h)
        assert api.chat_requests()[-1]["max_tokens"] == 1 and not api.chat_requests()[-1].get("stream")
        api.fail_with = 401
        with pytest.raises(SystemExit, match=r"^LLM could not start: APIError: LLM API at .* refused the API key \(401\)"):
            s2s.load("LLM", handler(api))


def test_unreachable_server_fails_fast():
    h = s2s.OpenAILLMHandler("http://127.0.0.1:9/v1", "m", 0.3, 64, 2.0)
    h.setup()
    t0 = time.monotonic()
    with pytest.raises(s2s.APIError, match="cannot be reached"):
        list(h.stream([{"role": "user", "content": "hi"}]))
    assert time.monotonic() - t0 < 3


def test_cancel_mid_stream_closes_the_connection():
    words = " ".join(f"word{i}." for i in range(300))
    with FakeChatAPI(answer=lambda m: words, token_delay_s=0.01) as api:
        stream = handler(api).stream([{"role": "user", "content": "talk"}])
        got = [next(stream) for _ in range(5)]
        stream.close()
        deadline = time.monotonic() + 2
        while not api.streams[-1]["client_closed"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got[0] == "word0. "
        assert api.streams[-1]["client_closed"]
        assert api.streams[-1]["tokens_sent"] < 50  # the server stopped early: not drained to 300


class SlowSource:
    """A model's stream: the first token after `first_s`, each next one after `next_s`; says when it was closed."""

    def __init__(self, first_s, next_s, tokens=100):
        self.first_s, self.next_s, self.tokens = first_s, next_s, tokens
        self.made, self.closed = 0, threading.Event()

    def __iter__(self):
        try:
            for i in range(self.tokens):
                time.sleep(self.first_s if i == 0 else self.next_s)
                self.made += 1
                yield f"t{i} "
        finally:
            self.closed.set()


def test_a_turn_cut_off_before_its_first_token_frees_its_worker_at_once():
    source, cancelled = SlowSource(first_s=1.0, next_s=0.01), concurrent.futures.Future()
    threading.Timer(0.1, cancelled.cancel).start()
    started = time.monotonic()
    assert list(s2s.until_cancelled(iter(source), cancelled)) == []
    assert time.monotonic() - started < 0.5  # not the second the model takes to its first token
    assert source.closed.wait(2) and source.made == 1  # closed once its first token came, not drained


def test_a_turn_cut_off_mid_answer_gets_no_more_tokens_and_its_stream_closes_at_the_next():
    source, cancelled = SlowSource(first_s=0.01, next_s=0.05), concurrent.futures.Future()
    got = []
    for token in s2s.until_cancelled(iter(source), cancelled):
        got.append(token)
        if len(got) == 3:
            cancelled.cancel()
    assert got == ["t0 ", "t1 ", "t2 "]  # none handed on after the cut
    assert source.closed.wait(1) and source.made <= 4  # closed at its next token, not drained


def test_echo_llm_answers_in_the_language_heard():
    h = s2s.EchoLLMHandler()
    assert "".join(h.stream([{"role": "user", "content": "hello there"}])) == "You said: hello there"
    assert "".join(h.stream([{"role": "user", "content": "你好"}])) == "你说的是：你好"


def test_a_full_history_drops_its_older_half_at_once_so_the_prompt_start_holds():
    history = s2s.ChatHistory(4)
    firsts, sizes = [], []
    for n in range(1, 12):
        history.add(s2s.Turn(n, False, question=f"question {n}", answer_chunks=[(0.0, f"answer {n}")]))
        past = [m["content"] for m in history.messages("system", "Be brief.", "next")[1:-1]]
        firsts.append(past[0])
        sizes.append(len(past) // 2)  # a question and its answer each
    assert sizes == [1, 2, 3, 4, 3, 4, 3, 4, 3, 4, 3]  # never more than 4, never fewer than 3 once full
    # The prompt starts with the same question for two turns at a time, then moves on by two.
    assert firsts == ["question 1"] * 4 + ["question 3"] * 2 + ["question 5"] * 2 + ["question 7"] * 2 + ["question 9"]
    assert s2s.ChatHistory(0).messages("system", "p", "q") == [{"role": "system", "content": "p"}, {"role": "user", "content": "q"}]


def test_an_exchange_without_an_answer_is_left_out_so_roles_alternate():
    history = s2s.ChatHistory(8)
    history.add(s2s.Turn(1, False, question="failed", state=s2s.TurnState.FAILED))  # its model call raised: nothing was said
    history.add(s2s.Turn(2, False, question="cut off", state=s2s.TurnState.INTERRUPTED))  # cut off before a word: the mark remains
    history.add(s2s.Turn(3, False, question="answered", answer_chunks=[(0.0, "an answer")]))
    roles = [m["role"] for m in history.messages("system", "p", "next")]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "failed" not in [m["content"] for m in history.messages("system", "p", "next")]
