"""Token-aware splitting of a document into overlapping chunks with exact character offsets.

How a chunk is cut: the text is tokenized a block at a time (one tiktoken call covers many
chunks), and a chunk ends at the best boundary in the second half of its token budget: the last
paragraph break, else the last line break, else the last sentence end, else the last gap between
words, else at the token limit itself (on a character boundary). Whitespace at either end of a
chunk is trimmed, and its tokens are then counted exactly, so
`token_count == count_tokens(text) <= chunk_tokens` always holds. The next chunk starts at a
word boundary (a token boundary in text without spaces) at most `overlap_tokens` tokens before
the end of the previous one.

Offsets come from token positions, never from searching the text, so a document that repeats a
passage still gets exact spans. Memory is bounded by one block, whatever the document size.

Why not langchain-text-splitters (measured in benchmarks/bench_chunking.py): its
`RecursiveCharacterTextSplitter.from_tiktoken_encoder` returns strings, not spans, and its
`start_index` is a forward `str.find` that misses or misplaces chunks once they overlap (312 of
4,361 chunks of the benchmark's prose had no offset) or a passage repeats. It calls the
tokenizer on every piece at every level, down to single characters for text without spaces
(753 chunks/s on CJK text against 4,500 here; 3,700 against 4,700 on prose), and by default it
raises on text such as `<|endoftext|>`.
"""

from __future__ import annotations

import functools
import itertools
import re
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from docqueue.workers.tokens import count_tokens, encoding

# Where a chunk may end, best first; the last group that matched is the zone a cut may fall in.
_PARAGRAPH = re.compile(r"(\n[^\S\n]*\n\s*)")
_LINE = re.compile(r"(\n\s*)")
# Latin punctuation needs whitespace after it ("3.14" is no sentence end); CJK needs none.
_SENTENCE = re.compile(r"[.!?…][\"'”’)\]]*(\s+)|[。！？][」』”’)]*(\s*)")
_ZONES = (_PARAGRAPH, _LINE, _SENTENCE)

_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 bytes that never start a character
MIN_CHUNK_TOKENS = 4  # a character is at most 4 bytes, so at most 4 tokens
_BLOCK_CHARS = 1 << 16  # text tokenized per tiktoken call: many chunks, bounded memory
_MARGIN_TOKENS = 16  # tokens near a block's end may change when the text goes on
_NON_SPACE = re.compile(r"\S")
_OVERLAP_TRIES = 4  # an overlap that does not fit after this many starts is dropped


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk: `text == document[char_start:char_end]`, `token_count == count_tokens(text)`."""

    seq: int
    text: str
    char_start: int
    char_end: int
    token_count: int


@functools.cache
def _char_starts() -> list[int]:
    """Per token id, how many characters start in its bytes (0 for ids that are no token).

    Summing these gives the character offset of every token; it is much faster than decoding.
    A token may begin inside a multi-byte character: its offset is then the next character
    boundary, still a valid place to cut, and the exact count of each chunk settles the rest.
    """
    enc = encoding()
    counts: list[int] = []
    for token in range(enc.max_token_value + 1):
        try:
            piece = enc.decode_single_token_bytes(token)
        except KeyError:  # a gap between the ordinary and the special tokens
            piece = b""
        counts.append(len(piece.translate(None, _CONTINUATION)))
    return counts


class _Block:
    """A stretch of the document, tokenized, with the character offset of every token start."""

    __slots__ = ("final", "offset", "starts", "text")

    def __init__(self, document: str, offset: int, size: int) -> None:
        self.text = document[offset : offset + size]
        self.offset = offset
        self.final = offset + size >= len(document)
        ids = encoding().encode_ordinary(self.text)
        self.starts = list(accumulate(map(_char_starts().__getitem__, ids), initial=0))

    @property
    def n_tokens(self) -> int:
        return len(self.starts) - 1

    def is_gap(self, k: int) -> bool:
        """Whether token boundary `k` touches whitespace (a gap between words)."""
        c = self.starts[k]
        return self.text[c - 1].isspace() or self.text[c : c + 1].isspace()


class Chunker:
    """Splits text into chunks of at most `chunk_tokens` tokens overlapping by `overlap_tokens`.

    Raises:
        ValueError: chunk_tokens below 4, or overlap_tokens outside [0, chunk_tokens).
    """

    def __init__(self, chunk_tokens: int, overlap_tokens: int) -> None:
        if chunk_tokens < MIN_CHUNK_TOKENS:
            raise ValueError(
                f"chunk_tokens must be at least {MIN_CHUNK_TOKENS}, got {chunk_tokens}"
            )
        if not 0 <= overlap_tokens < chunk_tokens:
            raise ValueError(
                f"overlap_tokens must be between 0 and chunk_tokens - 1 ({chunk_tokens - 1}),"
                f" got {overlap_tokens}"
            )
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens

    def split(self, text: str) -> list[ChunkSpan]:
        """The chunks of `text` in order; an empty or whitespace-only text has none."""
        spans: list[ChunkSpan] = []
        block = self._block(text, 0)
        start = 0  # the token boundary in `block` where the next chunk begins
        done = 0  # where the last chunk ended, in characters from the start of `text`
        while ahead := _NON_SPACE.search(text, done):
            if not block.final and block.n_tokens - start < self.chunk_tokens + _MARGIN_TOKENS:
                block = self._block(text, block.offset + block.starts[start])
                start = 0
            # A chunk must reach past the first non-space character that no chunk holds yet.
            end = self._chunk(block, start, ahead.start() - block.offset, spans)
            if end is not None:
                done = block.offset + block.starts[end]
                start = self._next_start(block, start, end)
            elif block.offset + block.starts[start] < ahead.start():
                # Only an overlap or blank text lies before the next character to hold: skip it.
                block, start = self._block(text, ahead.start()), 0
            else:
                # No token boundary fits (characters split across many tokens): take one character.
                done = ahead.start() + 1
                self._append(spans, text, ahead.start(), done)
                block, start = self._block(text, done, 16 * self.chunk_tokens), 0
        return spans

    def _block(self, text: str, offset: int, size: int = _BLOCK_CHARS) -> _Block:
        """Tokenize the text from `offset`: at least one chunk and a margin, or to the end."""
        while True:
            block = _Block(text, offset, size)
            if block.final or block.n_tokens >= self.chunk_tokens + _MARGIN_TOKENS:
                return block
            size *= 2

    def _chunk(self, block: _Block, start: int, floor: int, spans: list[ChunkSpan]) -> int | None:
        """Append the chunk that begins at token boundary `start` and holds character `floor`.

        Returns the token boundary where it ends, or None when no such chunk fits.
        """
        first = bisect_right(block.starts, floor)  # the first end allowed
        hard = start + self.chunk_tokens
        if block.final and block.n_tokens <= hard:
            end = block.n_tokens
        elif first > hard:
            return None
        else:
            end = self._best_end(block, max(first, start + self.chunk_tokens // 2 + 1), hard)
        while True:
            tokens = self._append(
                spans, block.text, block.starts[start], block.starts[end], block.offset
            )
            if tokens <= self.chunk_tokens:
                return end
            # Tokenized on its own the chunk came out longer than inside the block: end earlier.
            hard = end - (tokens - self.chunk_tokens)
            if hard < first:
                return None
            end = self._best_end(block, max(first, start + (hard - start) // 2 + 1), hard)

    def _append(
        self, spans: list[ChunkSpan], text: str, begin: int, end: int, offset: int = 0
    ) -> int:
        """Append text[begin:end], trimmed, if it fits; returns its token count (0 if blank)."""
        piece = text[begin:end]
        body = piece.strip()
        if not body:
            return 0
        tokens = count_tokens(body)
        if tokens <= self.chunk_tokens:
            char_start = offset + begin + len(piece) - len(piece.lstrip())
            spans.append(ChunkSpan(len(spans), body, char_start, char_start + len(body), tokens))
        return tokens

    def _best_end(self, block: _Block, lo: int, hard: int) -> int:
        """The token boundary in [lo, hard] where a chunk should end: the best break, or hard."""
        first, last = block.starts[lo], block.starts[hard]
        for pattern in _ZONES:
            best = 0
            for m in pattern.finditer(block.text, first, min(len(block.text), last + 2)):
                zone_start, zone_end = m.span(m.lastindex or 0)
                k = bisect_right(block.starts, zone_end, lo, hard + 1) - 1
                if k >= lo and block.starts[k] >= zone_start:
                    best = k
            if best:
                return best
        for k in range(hard, lo - 1, -1):
            if block.is_gap(k):
                return k
        return hard

    def _next_start(self, block: _Block, start: int, end: int) -> int:
        """Where the chunk after (start, end) begins: at most `overlap_tokens` tokens back.

        The overlap starts between words if it can, else (text without spaces) between tokens.
        """
        candidates = range(max(start + 1, end - self.overlap_tokens), end)
        gaps = filter(block.is_gap, candidates)
        first_gap = next(gaps, None)
        tries = 0
        for k in candidates if first_gap is None else itertools.chain([first_gap], gaps):
            begin = block.starts[k]
            if not _NON_SPACE.search(block.text, block.starts[start], begin):
                continue  # the next chunk would begin where this one does
            shared = block.text[begin : block.starts[end]].strip()
            if shared and count_tokens(shared) <= self.overlap_tokens:
                return k
            tries += 1
            if tries == _OVERLAP_TRIES:
                break
        return end
