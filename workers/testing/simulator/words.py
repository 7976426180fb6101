"""Plausible filler words, each one token long (with its leading space) in cl100k_base."""

from __future__ import annotations

import functools
import random

from docqueue.workers.testing.simulator.tokens import count_text

_CANDIDATE_TEXT = """
the of and to in is for on that with as by this from at are be it an or was which not have
has were their more can will its one all new been other also than into about after only some
time over these two may first any such most used under many would between through during where
each those both data report model result results system process value values table section
review document summary source record records report text note notes page line field point
order change changes period level rate cost costs price prices market team project plan plans
group policy service services account customer customers product products quality risk risks
issue issues case cases study test tests method methods figure number total average growth
income revenue budget year years month week day today early late high low large small major
minor clear strong simple general public local final main key current recent annual common
based shown noted found given made seen held kept set provided reported expected reviewed
increase decrease improve support include require reduce provide measure compare describe
"""


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Words that are one token as ' word', ' Word' and 'Word', so lengths are exact."""
    return tuple(
        w
        for w in dict.fromkeys(_CANDIDATE_TEXT.split())
        if all(count_text(form) == 1 for form in (" " + w, " " + w.capitalize(), w.capitalize()))
    )


def words(rng: random.Random, count: int) -> list[str]:
    """`count` filler words."""
    vocab = vocabulary()
    return [rng.choice(vocab) for _ in range(count)]


def filler(rng: random.Random, tokens: int) -> str:
    """Sentences of filler words, `tokens` tokens long (a full stop is one token too)."""
    picked = rng.choices(vocabulary(), k=tokens)
    pieces: list[str] = []
    sentence_left = rng.randint(6, 16)
    for word in picked[:tokens]:
        if not pieces:
            pieces.append(word.capitalize())
        elif sentence_left == 0 and len(pieces) < tokens - 1:
            pieces.append(".")
            pieces.append(" " + word.capitalize())
            sentence_left = rng.randint(6, 16)
        else:
            pieces.append(" " + word)
        sentence_left -= 1
        if len(pieces) >= tokens:
            break
    return "".join(pieces[:tokens])
