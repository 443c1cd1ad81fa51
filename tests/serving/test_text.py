"""TextStream: incremental detokenizing with held-back incomplete characters and stop strings."""

from __future__ import annotations

import random

import pytest

from transfuse.errors import InputError
from transfuse.serving.byte_tokenizer import ByteTokenizer
from transfuse.serving.text import MAX_PENDING, REPLACEMENT, TextStream, check_stop_strings

BYTES = ByteTokenizer()


def run(stream: TextStream, ids: list[int]) -> list[str]:
    """Push every id (until a stop); the deltas, then flush() last."""
    deltas = []
    for i in ids:
        delta, stopped = stream.push(i)
        deltas.append(delta)
        if stopped:
            break
    deltas.append(stream.flush())
    return deltas


# -- incomplete UTF-8 characters ----------------------------------------------------------------


def test_multibyte_characters_split_across_tokens_are_held_until_complete():
    text = "héllo 🎉 wörld"
    ids = BYTES.encode(text)
    stream = TextStream(BYTES)
    deltas = run(stream, ids)
    assert "".join(deltas) == text == stream.text
    assert not any(REPLACEMENT in d for d in deltas)
    # the emoji is 4 bytes = 4 tokens: nothing shows until its last byte
    start = len("héllo ".encode())
    assert deltas[start:start + 3] == ["", "", ""] and deltas[start + 3] == "🎉"


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    stream = TextStream(BYTES)
    ids = BYTES.encode("ok ") + list("€".encode())[:2]  # a 3-byte character cut after 2
    deltas = run(stream, ids)
    assert "".join(deltas[:-1]) == "ok "
    assert deltas[-1] == REPLACEMENT


def test_garbage_bytes_are_released_after_a_bounded_wait():
    stream = TextStream(BYTES)
    shown = [stream.push(0xFF)[0] for _ in range(MAX_PENDING + 4)]
    assert shown[:MAX_PENDING - 1] == [""] * (MAX_PENDING - 1)
    released = "".join(shown)
    assert released and set(released) == {REPLACEMENT}
    assert len(released + stream.flush()) == MAX_PENDING + 4  # one U+FFFD per invalid byte


def test_special_tokens_are_skipped_by_default_and_named_otherwise():
    eos = BYTES.eos_token_id
    assert "".join(run(TextStream(BYTES), BYTES.encode("hi") + [eos])) == "hi"
    shown = "".join(run(TextStream(BYTES, skip_special_tokens=False), BYTES.encode("hi") + [eos]))
    assert shown == "hi<|endoftext|>"


class LeadingSpaceTokenizer:
    """SentencePiece-like: a token's leading space is dropped when it starts the decoded text
    (so decoding one token alone loses the space the whole sequence has)."""

    pieces = ["▁Hello", "▁world", "!", "▁ça", "▁va"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")


def test_tokens_are_decoded_in_context_so_leading_spaces_survive():
    stream = TextStream(LeadingSpaceTokenizer())
    deltas = run(stream, [0, 1, 2, 3, 4])
    assert deltas[:5] == ["Hello", " world", "!", " ça", " va"]
    assert stream.text == "Hello world! ça va"


def test_a_real_byte_level_bpe_round_trips_random_multilingual_text():
    tokenizers = pytest.importorskip("tokenizers")
    corpus = ["naïve café crème brûlée", "日本語のテキスト", "emoji 🎉🚀🙂 mix", "plain ascii text"]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 20, vocab_size=300, min_frequency=2, show_progress=False)

    class Wrapped:  # the decode signature Hugging Face tokenizers have
        def decode(self, ids, skip_special_tokens=True):
            return bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    rng = random.Random(0)
    alphabet = "aé日本🎉🚀 xç"
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = bpe.encode(text).ids
        stream = TextStream(Wrapped())
        deltas = run(stream, ids)
        assert "".join(deltas) == bpe.decode(ids) == text
        assert not any(REPLACEMENT in d for d in deltas), (text, deltas)


# -- stop strings -------------------------------------------------------------------------------


def test_stop_string_spanning_tokens_ends_the_stream_before_it():
    stream = TextStream(BYTES, ["STOP"])
    deltas = run(stream, BYTES.encode("abc STOP def"))
    assert deltas[:4] == ["a", "b", "c", " "]
    assert deltas[4:7] == ["", "", ""]      # S, T, O held: they may start "STOP"
    assert deltas[7] == ""                  # P completes it: nothing of it is shown
    assert deltas[-1] == ""                 # flush after a stop shows nothing
    assert stream.stopped and stream.stop_string == "STOP" and stream.text == "abc "
    assert stream.push(BYTES.encode("x")[0]) == ("", True)


def test_held_back_text_is_released_when_the_stop_string_does_not_follow():
    stream = TextStream(BYTES, ["STOP"])
    deltas = run(stream, BYTES.encode("a STX b"))
    assert deltas[2:5] == ["", "", "STX"]
    assert "".join(deltas) == "a STX b" and not stream.stopped


def test_partial_stop_string_at_the_end_comes_out_on_flush():
    stream = TextStream(BYTES, ["STOP"])
    deltas = run(stream, BYTES.encode("end ST"))
    assert deltas[-1] == "ST" and "".join(deltas) == "end ST"


def test_stop_string_with_multibyte_characters_split_across_tokens():
    stream = TextStream(BYTES, ["é!"])
    deltas = run(stream, BYTES.encode("café! more"))
    assert "".join(deltas) == "caf" and stream.stopped


def test_earliest_stop_string_wins_and_overlapping_prefixes_are_held():
    stream = TextStream(BYTES, ["bcd", "abcdef"])
    assert "".join(run(stream, BYTES.encode("xabcdefg"))) == "xa"
    assert stream.stop_string == "bcd"
    # "aab": the held "a" is released once "aa" shows it cannot start "ab" any more
    stream = TextStream(BYTES, ["ab"])
    assert run(stream, BYTES.encode("aab"))[:2] == ["", "a"]
    assert stream.text == "a" and stream.stopped


def test_stop_string_inside_one_multi_character_token():
    stream = TextStream(LeadingSpaceTokenizer(), ["lo w"])
    assert "".join(run(stream, [0, 1, 2])) == "Hel" and stream.stopped


def test_push_many_stops_at_the_stop_string():
    stream = TextStream(BYTES, ["\n"])
    assert stream.push_many(BYTES.encode("line one\nline two")) == ("line one", True)


# -- checks -------------------------------------------------------------------------------------


def test_bad_stop_strings_and_tokenizers_are_refused():
    with pytest.raises(InputError, match=r"stop_strings\[1\] must be a non-empty string"):
        TextStream(BYTES, ["ok", ""])
    with pytest.raises(InputError, match=r"stop\[0\]"):
        check_stop_strings([3])
    assert check_stop_strings("x") == ("x",) and check_stop_strings(None) == ()
    with pytest.raises(InputError, match="decode"):
        TextStream(object())


def test_byte_tokenizer_round_trip_save_and_load(tmp_path):
    text = "a€🎉"
    assert BYTES.decode(BYTES.encode(text)) == text
    assert BYTES.vocab_size == 258 and BYTES.eos_token_id == 256
    with pytest.raises(InputError, match="outside the vocabulary"):
        BYTES.decode([999])
    BYTES.save(tmp_path)
    assert ByteTokenizer.load(tmp_path).vocab_size == 258
    (tmp_path / "byte_tokenizer.json").write_text('{"kind": "other"}')
    from transfuse.errors import ArtifactError

    with pytest.raises(ArtifactError, match="not a transfuse byte tokenizer"):
        ByteTokenizer.load(tmp_path)
