"""The provider's prompt cache, as OpenAI describes it: a prompt's leading tokens that an
earlier request already sent are read from the cache and billed at the cached rate.

A prompt of at least `MIN_TOKENS` tokens is cached in blocks of `STEP_TOKENS`: what a request
finds is the largest multiple of `STEP_TOKENS` that is a common prefix with an earlier request
in the same bucket (the model and the request's `prompt_cache_key`), and only if that is at least
`MIN_TOKENS`. A request is looked up and stored as it is admitted, so only the first request of
a bucket misses, however many arrive together (a real provider also misses on the ones sent
before the first one's prefix is written).

Memory is bounded: each block is kept as one 16-byte hash chained over every token before it
(a block's hash stands for the whole prefix it ends), in least-recently-used order, up to
`capacity` blocks; the least recently used are forgotten first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

MIN_TOKENS = 1024
STEP_TOKENS = 128
DEFAULT_CAPACITY_BLOCKS = 32_768  # 4M tokens of prefixes in about 5 MB


class PrefixCache:
    """Prefixes seen, per bucket; `capacity` blocks at most (0: nothing is ever cached)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def read_and_store(self, bucket: str, ids: Sequence[int]) -> int:
        """The tokens of `ids` found in the cache (0, or a multiple of STEP_TOKENS of at least
        MIN_TOKENS); its blocks are stored for the requests after it."""
        if self.capacity <= 0 or len(ids) < MIN_TOKENS:
            return 0
        digest = hashlib.blake2b(bucket.encode(), digest_size=16).digest()
        found, matching = 0, True
        for start in range(0, len(ids) - STEP_TOKENS + 1, STEP_TOKENS):
            block = array("q", ids[start:start + STEP_TOKENS]).tobytes()
            digest = hashlib.blake2b(digest + block, digest_size=16).digest()
            matching = matching and digest in self._blocks
            found += STEP_TOKENS if matching else 0
            self._blocks[digest] = None
            self._blocks.move_to_end(digest)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
        return found if found >= MIN_TOKENS else 0

    def clear(self) -> None:
        self._blocks.clear()
