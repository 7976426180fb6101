"""Token-aware chunking: exact offsets, token bounds, order, overlap, boundaries, odd text."""

from __future__ import annotations

import itertools
import random

import pytest

from docqueue.workers.ingest.chunking import Chunker, ChunkSpan
from docqueue.workers.tokens import count_tokens

WORDS = [
    *("the", "queue", "holds", "batches", "of", "chunks", "while", "workers", "call", "model"),
    *("and", "write", "results", "to", "store", "so", "that", "a", "lost", "broker", "loses"),
    *("nothing", "every", "task", "can", "run", "twice", "without", "harm"),
]


def prose(rng: random.Random, paragraphs: int, sentences: tuple[int, int] = (3, 7)) -> str:
    """Paragraphs of sentences of ordinary words, separated by blank lines."""
    out = []
    for _ in range(paragraphs):
        body = []
        for _ in range(rng.randint(*sentences)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 20))]
            body.append(" ".join(words).capitalize() + rng.choice(".?!"))
        out.append(" ".join(body))
    return "\n\n".join(out)


def assert_well_formed(text: str, spans: list[ChunkSpan], chunk_tokens: int, overlap: int) -> None:
    """What a user of the chunks relies on, checked on every chunk."""
    for i, span in enumerate(spans):
        assert span.seq == i
        assert text[span.char_start : span.char_end] == span.text
        assert span.text == span.text.strip() != ""
        assert span.token_count == count_tokens(span.text) <= chunk_tokens
    for before, after in itertools.pairwise(spans):
        assert before.char_start < after.char_start and before.char_end < after.char_end
        shared = text[after.char_start : before.char_end]
        if overlap == 0:
            assert after.char_start >= before.char_end
        elif after.char_start < before.char_end:
            assert count_tokens(shared.strip()) <= overlap
    covered = bytearray(len(text))
    for span in spans:
        covered[span.char_start : span.char_end] = b"\x01" * (span.char_end - span.char_start)
    missing = [i for i, c in enumerate(text) if not covered[i] and not c.isspace()]
    assert missing == [], f"characters in no chunk: {missing[:10]}"


def test_chunks_of_prose_are_exact_bounded_ordered_and_overlapping() -> None:
    # Given a document of a few thousand tokens
    text = prose(random.Random(1), 40)
    # When it is split into chunks of 200 tokens overlapping by 30
    spans = Chunker(200, 30).split(text)
    # Then every chunk is an exact, bounded slice, in order, covering all the text
    assert len(spans) > 5
    assert_well_formed(text, spans, 200, 30)
    # And consecutive chunks do share text, up to the overlap
    overlaps = [a.char_end - b.char_start for a, b in itertools.pairwise(spans)]
    assert all(o > 0 for o in overlaps)


def test_no_overlap_when_overlap_is_zero() -> None:
    # Given a document
    text = prose(random.Random(2), 30)
    # When it is split without overlap
    spans = Chunker(150, 0).split(text)
    # Then the chunks tile the text without sharing any character
    assert_well_formed(text, spans, 150, 0)
    assert all(a.char_end <= b.char_start for a, b in itertools.pairwise(spans))


def test_chunks_end_at_paragraph_breaks_when_paragraphs_fit() -> None:
    # Given paragraphs of roughly 60 to 130 tokens
    text = prose(random.Random(3), 30, sentences=(3, 6))
    # When chunks of 300 tokens are cut
    spans = Chunker(300, 0).split(text)
    # Then each chunk ends where a paragraph ends (or at the end of the text)
    for span in spans:
        assert text[span.char_end : span.char_end + 2] in ("\n\n", "")
    # And the chunks are still reasonably full
    assert sum(s.token_count for s in spans) / len(spans) > 150


def test_a_long_paragraph_is_cut_at_sentence_ends() -> None:
    # Given one paragraph of many sentences, far longer than a chunk
    text = prose(random.Random(4), 1, sentences=(60, 60))
    # When it is split
    spans = Chunker(120, 0).split(text)
    # Then every chunk but the last ends with a sentence's punctuation
    assert len(spans) > 3
    assert all(span.text[-1] in ".?!" for span in spans)


def test_repeated_passages_get_their_own_offsets() -> None:
    # Given a document that repeats the same paragraph many times
    paragraph = "The same passage comes back again and again in this report. " * 6
    text = "\n\n".join([paragraph.strip()] * 40)
    # When it is split with overlap
    spans = Chunker(100, 20).split(text)
    # Then the offsets advance through the whole document instead of pointing at the first copy
    assert_well_formed(text, spans, 100, 20)
    assert spans[-1].char_end == len(text)
    assert len({s.char_start for s in spans}) == len(spans)


def test_periodic_text_without_sentence_breaks() -> None:
    # Given a text that is one short pattern repeated (every occurrence looks alike)
    text = "ab cd " * 3000
    # When it is split
    spans = Chunker(64, 16).split(text)
    # Then the chunks still march forward with exact offsets
    assert_well_formed(text, spans, 64, 16)
    assert spans[-1].char_end == len(text.rstrip())


@pytest.mark.parametrize(
    "text",
    [
        "中文字符测试，日本語のテキスト。" * 400,
        "🦜👩‍👩‍👧🇫🇷 café naïve e\u0301 " * 300,
        "Ωμέγα κείμενο. Русский текст тоже. " * 200,
        "x" * 20_000,
        "1234567890" * 2_000,
    ],
    ids=["cjk", "emoji-combining", "greek-cyrillic", "one-long-word", "digits"],
)
def test_unicode_and_text_without_spaces(text: str) -> None:
    # Given text in other scripts, with emoji and combining marks, or with no spaces at all
    # When it is split
    spans = Chunker(50, 10).split(text)
    # Then every chunk is still an exact, bounded slice and all the text is covered
    assert spans
    assert_well_formed(text, spans, 50, 10)


def test_text_that_looks_like_a_special_token_is_ordinary_text() -> None:
    # Given a document quoting tiktoken's special tokens
    text = "A document may contain <|endoftext|> or <|fim_prefix|> as plain text. " * 50
    # When it is split
    spans = Chunker(40, 5).split(text)
    # Then nothing raises and the markers are counted like any text
    assert_well_formed(text, spans, 40, 5)
    assert any("<|endoftext|>" in s.text for s in spans)


def test_a_document_longer_than_one_tokenized_block() -> None:
    # Given a document of well over 64 KiB of characters
    text = prose(random.Random(5), 600)
    assert len(text) > 200_000
    # When it is split
    spans = Chunker(400, 40).split(text)
    # Then chunks across the block seams are as good as the others
    assert_well_formed(text, spans, 400, 40)
    assert spans[-1].char_end == len(text)


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t \n"])
def test_empty_or_blank_text_has_no_chunks(text: str) -> None:
    # Given an empty or whitespace-only text / When split / Then there is no chunk
    assert Chunker(100, 10).split(text) == []


def test_a_short_text_is_one_chunk_without_its_surrounding_whitespace() -> None:
    # Given a short text with blank lines around it
    text = "\n\n  Hello there, world.  \n"
    # When it is split
    [span] = Chunker(100, 10).split(text)
    # Then the single chunk is the trimmed text with its true offsets
    assert span == ChunkSpan(0, "Hello there, world.", 4, 23, count_tokens("Hello there, world."))


def test_random_mixtures_keep_every_promise() -> None:
    # Given many random texts mixing words, spaces, newlines, punctuation and odd characters
    rng = random.Random(42)
    alphabet = [
        *("word ", "the ", "x", " ", "  ", "\n", "\n\n", ". ", "!", "3.14", "é", "中"),
        *("。", "🦜", "\u0301", "<|endoftext|>", "\r\n", "\t", "1234567", "𝔘"),
    ]
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.choice([1, 30, 400, 1500])))
        chunk_tokens = rng.choice([4, 7, 16, 60])
        overlap = rng.randint(0, chunk_tokens - 1)
        # When each is split with small, odd limits
        spans = Chunker(chunk_tokens, overlap).split(text)
        # Then every chunk is exact, bounded, in order, and all the text is covered
        assert_well_formed(text, spans, chunk_tokens, overlap)


@pytest.mark.parametrize(
    ("chunk_tokens", "overlap", "message"),
    [(3, 0, "at least 4"), (100, 100, "between 0 and"), (100, -1, "between 0 and")],
)
def test_impossible_limits_are_refused(chunk_tokens: int, overlap: int, message: str) -> None:
    # Given limits that cannot work / When a chunker is made / Then it says why
    with pytest.raises(ValueError, match=message):
        Chunker(chunk_tokens, overlap)


def test_split_ends_even_when_no_token_boundary_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a tokenizer that counts every text of two or more characters as too long on its own
    from docqueue.workers.ingest import chunking

    monkeypatch.setattr(chunking, "count_tokens", lambda s: 1 if len(s) == 1 else 99)
    text = "ab c"
    # When a text is split
    spans = Chunker(8, 2).split(text)
    # Then the chunker falls back to one character per chunk instead of looping forever
    assert [(s.text, s.char_start, s.char_end) for s in spans] == [
        ("a", 0, 1),
        ("b", 1, 2),
        ("c", 3, 4),
    ]
