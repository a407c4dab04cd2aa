"""What the synthetic engine answers, as its documentation states it (written out here, not
imported from the engine): the next token of sample j is
``(sum(history) + len(history) + 7 * j) % vocab``, the history being the prompt and what the
sample generated so far."""

from __future__ import annotations

from collections.abc import Sequence

VOCAB = 32000  # the synthetic engine's default


def continuation(history: Sequence[int], n: int, sample: int = 0, vocab: int = VOCAB) -> list[int]:
    total, length, out = sum(history), len(history), []
    for _ in range(n):
        token = (total + length + 7 * sample) % vocab
        out.append(token)
        total += token
        length += 1
    return out


def text(history: Sequence[int], n: int, sample: int = 0) -> str:
    """The synthetic worker's HTTP text for those tokens (bytes as tokens; ids render as `` <id>``)."""
    return "".join(f" {t}" for t in continuation(history, n, sample))
