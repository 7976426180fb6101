"""The ids a stream has met: a compact table, so memory per id stays at 16 bytes.

Guarantees: `SeenIds.add` tells whether an id was used before and where (a locator packing the
kind of first use, an index and a position in 64 bits). Ids are kept as 64-bit digests; a
collision, about one chance in 10^7 with a million ids, would reject a document as a duplicate.
"""

from __future__ import annotations

import hashlib
from array import array

# Where an id was first used, packed in 64 bits: kind, index, position.
AS_ID, UNDER_ROOT, LINE, RECORD = range(4)


def locator(kind: int, index: int = 0, position: int = 0) -> int:
    return kind << 62 | (index & 0x3FFFFFFF) << 32 | (position & 0xFFFFFFFF)


class SeenIds:
    """Ids met so far: 64-bit digests in an open-addressing table (16 bytes a slot, at most two
    thirds full), each with the locator of its first use. A digest collision, about one chance
    in 10^7 with a million ids, would reject a document as a duplicate."""

    def __init__(self) -> None:
        self._keys = array("Q", bytes(8 * 1024))
        self._where = array("Q", bytes(8 * 1024))
        self._size = 0

    def add(self, external_id: str, where: int) -> int | None:
        """Record `external_id` as used at `where`; if it was used before, return that locator."""
        digest = hashlib.blake2b(external_id.encode("utf-8", "surrogatepass"), digest_size=8)
        key = int.from_bytes(digest.digest(), "little") or 1  # 0 marks an empty slot
        slot = _probe(self._keys, key)
        if self._keys[slot] == key:
            return self._where[slot]
        self._keys[slot], self._where[slot] = key, where
        self._size += 1
        if 3 * self._size > 2 * len(self._keys):
            keys, wheres = self._keys, self._where
            self._keys = array("Q", bytes(16 * len(keys)))
            self._where = array("Q", bytes(16 * len(keys)))
            for old_key, old_where in zip(keys, wheres, strict=True):
                if old_key:
                    slot = _probe(self._keys, old_key)
                    self._keys[slot], self._where[slot] = old_key, old_where
        return None


def _probe(keys: array[int], key: int) -> int:
    """The slot that holds `key`, or the empty slot where it belongs."""
    mask = len(keys) - 1
    slot = key & mask
    while keys[slot] and keys[slot] != key:
        slot = (slot + 1) & mask
    return slot
