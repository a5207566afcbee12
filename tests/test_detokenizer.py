"""Incremental detokenization and stop strings with hold-back, on small real tokenizers.

Two tokenizers are built here, offline: a GPT-2 style byte-level BPE (SmolLM2's kind) and a
SentencePiece style one with byte fallback and a leading-space-stripping decoder (Llama's kind).
Multi-byte characters split over several tokens must come out whole, in any chunking.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! How are you today?",
    "naïve café déjà vu — ünïcödé",
    "日本語のテキストです。東京へ行きます。",
    "emoji 🤖🚀✨ and more 🎉",
    "def main():\n    return 42\n",
] * 4
SPECIAL = ["<|endoftext|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def sentencepiece_like() -> Tokenizer:
    # ASCII letters and a few merges; everything else falls back to <0xNN> byte tokens.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", *string.ascii_letters, *string.digits, *".,!?'", "▁t", "▁th", "▁the", "he", "ll", "llo"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("h", "e"), ("l", "l"), ("ll", "o")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


TEXTS = st.text(alphabet=st.sampled_from(list("abc xyz.,éü日本語🤖🚀\n")), min_size=1, max_size=40)


def detokenize_in_chunks(tok: Tokenizer, prompt_ids: list[int], ids: list[int], cuts: list[int],
                         skip_special_tokens: bool = True) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens)
    bounds = [0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)]
    pieces = [detok.update(ids[a:b]) for a, b in zip(bounds, bounds[1:])]
    return "".join(pieces), pieces


def expected_continuation(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """What the output adds to the prompt's text when both are decoded in one piece."""
    whole = tok.decode(prompt_ids + ids)
    prompt = tok.decode(prompt_ids)
    assert whole.startswith(prompt)
    return whole[len(prompt):]


@pytest.mark.parametrize("which", ["byte_level", "sentencepiece_like"])
@settings(max_examples=60, deadline=None)
@given(prompt=TEXTS, output=TEXTS, cuts=st.lists(st.integers(0, 1000), max_size=6))
def test_any_chunking_gives_the_text_of_a_one_piece_decode(request, which, prompt, output, cuts):
    tok = request.getfixturevalue(which)
    prompt_ids = tok.encode(prompt).ids
    ids = tok.encode(output, add_special_tokens=False).ids
    text, pieces = detokenize_in_chunks(tok, prompt_ids, ids, cuts)
    assert text == expected_continuation(tok, prompt_ids, ids)
    assert all("\ufffd" not in piece for piece in pieces), "a partial character was emitted"


def test_multibyte_character_is_held_until_complete(byte_level):
    ids = byte_level.encode("🤖", add_special_tokens=False).ids
    assert len(ids) > 1, "the test needs a character split over several tokens"
    detok = IncrementalDetokenizer(byte_level, byte_level.encode("hi").ids, True)
    pieces = [detok.update([i]) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🤖"


def test_first_output_token_keeps_its_leading_space(sentencepiece_like):
    prompt_ids = sentencepiece_like.encode("hello").ids
    ids = sentencepiece_like.encode("the", add_special_tokens=False).ids
    assert sentencepiece_like.id_to_token(ids[0]) == "▁the"
    assert IncrementalDetokenizer(sentencepiece_like, prompt_ids, True).update(ids) == " the"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(byte_level, skip):
    special = byte_level.token_to_id("<|im_end|>")
    ids = byte_level.encode("Hello world", add_special_tokens=False).ids + [special]
    text, _ = detokenize_in_chunks(byte_level, byte_level.encode("x").ids, ids, [1, 2], skip_special_tokens=skip)
    assert text == ("Hello world" if skip else "Hello world<|im_end|>")


def test_empty_update_is_empty(byte_level):
    assert IncrementalDetokenizer(byte_level, [], True).update([]) == ""


# ---------------------------------------------------------------- stop strings


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Character by character: the first stop string to be complete, the longest on a tie."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[:end if include else end - len(stop)], stop
    return text, None


def run_matcher(text: str, stops: list[str], include: bool, cuts: list[int]) -> tuple[list[str], str | None]:
    matcher = StopStringMatcher(stops, include)
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    released = []
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        piece, stop = matcher.update(text[a:b], final=n == len(bounds) - 2)
        released.append(piece)
        if stop is not None:
            return released, stop
    return released, None


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="abc", max_size=30),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
       include=st.booleans(), cuts=st.lists(st.integers(0, 100), max_size=10))
def test_stop_strings_match_a_char_by_char_scan_and_are_never_partly_released(text, stops, include, cuts):
    released, stop = run_matcher(text, stops, include, cuts)
    expected_text, expected_stop = reference_stop(text, stops, include)
    assert "".join(released) == expected_text
    assert stop == expected_stop
    # Every release is a prefix of the final text: nothing of a stop string (which the final
    # text excludes) ever went out early.
    sent = ""
    for piece in released:
        sent += piece
        assert expected_text.startswith(sent)


def test_hold_back_is_only_the_longest_stop_minus_one():
    matcher = StopStringMatcher(["STOP", "no"], include_stop_str_in_output=False)
    assert matcher.update("hello wor", final=False) == ("hello ", None)  # 3 = len("STOP") - 1 held
    assert matcher.update("ld", final=False) == ("wo", None)
    assert matcher.update(" ST", final=False) == ("rld", None)
    assert matcher.update("OP and more", final=False) == (" ", "STOP")


def test_include_stop_str_in_output_streams_without_hold_back():
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert matcher.update("go ST", final=False) == ("go ST", None)
    assert matcher.update("OP!", final=False) == ("OP", "STOP")


def test_final_update_releases_what_was_held():
    matcher = StopStringMatcher(["xyz"], include_stop_str_in_output=False)
    assert matcher.update("abcxy", final=False) == ("abc", None)
    assert matcher.update("", final=True) == ("xy", None)
