"""How an answer is cut for CleanS2S's client (LegacyAnswer): a message per chunk, the end on the last chunk, the
turn's first audio at once. No sockets: items as the TTS stage hands them on."""
import s2s_server_pipeline as s2s


def piece(seq: int, text: str = "", ms: int = 200, last: bool = False, turn: int = 1) -> s2s.AnswerAudio:
    return s2s.AnswerAudio(None, turn, seq, text, bytes(2 * 16 * ms), last)


def chunk_end(seq: int, last: bool = False, text: str = "", turn: int = 1) -> s2s.AnswerAudio:
    return s2s.AnswerAudio(None, turn, seq, text, b"", last)


def cut(items: list) -> list:
    """(text, ms of audio, end_flag) of every message, flushing a waiting chunk at the end as the sender would."""
    answer, out = s2s.LegacyAnswer(), []
    for item in items:
        out += answer.push(item)
    out += answer.flush()
    return [(m.text, len(m.pcm) // 32, m.last) for m in out]


def test_a_chunk_in_one_piece_is_one_message_and_the_last_one_carries_the_end():
    assert cut([piece(0, "Sure,"), chunk_end(0), piece(1, " here it is."), chunk_end(1, last=True)]) == [
        ("Sure,", 200, False), (" here it is.", 200, True)]


def test_an_end_just_after_the_last_sentence_still_rides_on_it():
    """A Chinese answer ends with its last sentence mark; the LLM's end, an empty chunk, comes a token later."""
    items = [piece(0, "好的。"), chunk_end(0), piece(1, "明天见。"), chunk_end(1), chunk_end(2, last=True)]
    assert cut(items) == [("好的。", 200, False), ("明天见。", 200, True)]
    answer = s2s.LegacyAnswer()  # the end did not come in time: the chunk goes without it when the sender flushes
    assert answer.push(piece(0, "好的。")) == [] and answer.push(chunk_end(0)) == [] and answer.waiting is not None
    assert [m.text for m in answer.flush()] == ["好的。"] and answer.flush() == []


def test_a_chunk_in_pieces_goes_whole_but_the_turns_first_audio_goes_at_once():
    answer = s2s.LegacyAnswer()
    assert answer.push(piece(0, "Sure, here is a longer answer.")) == []  # one piece: maybe the whole chunk
    first = answer.push(piece(0))  # a second piece: the first may wait no longer
    assert [(m.text, len(m.pcm) // 32) for m in first] == [("", 200)]
    assert answer.push(piece(0)) == [] and answer.push(piece(0)) == []
    rest = answer.push(chunk_end(0))  # the rest of the chunk, with its text (it ends a sentence: it waits)
    assert rest == [] and answer.waiting.text == "Sure, here is a longer answer." and len(answer.waiting.pcm) == 3 * 6400
    assert cut([piece(0, "Hi,"), piece(0), chunk_end(0), piece(1, " there."), piece(1), chunk_end(1, last=True)]) == [
        ("", 200, False), ("Hi,", 200, False), (" there.", 400, True)]


def test_text_without_sound_and_a_failed_answer_still_end():
    assert cut([piece(0, "Look:"), chunk_end(0), chunk_end(1, text="😀")]) == [("Look:", 200, False), ("😀", 0, False)]
    assert cut([chunk_end(s2s.FAILED_SEQ, last=True)]) == [("", 0, True)]


def test_a_new_turn_forgets_the_old_one():
    answer = s2s.LegacyAnswer()
    answer.push(piece(0, "Old."))
    answer.push(chunk_end(0))  # waiting for its end
    assert [(m.turn, m.text) for m in answer.push(piece(0, "New,", turn=2)) + answer.push(chunk_end(0, turn=2))] == [
        (2, "New,")]
