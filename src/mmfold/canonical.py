"""Batch-invariant inference: a row's prediction must not depend on the rows around it.

Floating-point kernels pick their blocking by the shape they are given: on a CPU, a linear
layer on 7 rows sums in another order than on 64, and a caption padded to 24 tokens attends
in another order than padded to 16. So the same row, predicted inside another test set (a
re-issued ``test.csv``, a shuffled subset, new rows mixed in), would come out a few ulps
different, and a re-submission could flip a decision at a threshold. Evaluation therefore
runs every row in a *canonical* batch: captions padded to their length rounded up to
:data:`TOKEN_MULTIPLE` (capped at the cache width; exact lengths for a packed BiLSTM), batches
only of rows with that same padded length, and every batch exactly ``batch_size`` rows (the last one of each length
filled up by repeating its last row, whose extra outputs are dropped). A row's computation
then depends on nothing but the row itself (checked by ``tests/test_predict.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOKEN_MULTIPLE = 8  # captions are padded to a multiple of this many tokens at evaluation


def token_multiple(model: Any) -> int:
    """:data:`TOKEN_MULTIPLE`, or 1 for a model with a packed-sequence encoder (the BiLSTM):
    a packed LSTM step runs on the batch's captions still longer than that step, so its
    batches must hold captions of one exact length."""
    return 1 if any(getattr(m, "packs_sequences", False) for m in model.modules()) else TOKEN_MULTIPLE


def padded_length(lengths: np.ndarray, width: int, multiple: int = TOKEN_MULTIPLE) -> np.ndarray:
    """Each caption's evaluation length: its token count rounded up to ``multiple``, at least
    one multiple, at most ``width`` (the token cache's width)."""
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    return np.minimum(-(-lengths // multiple) * multiple, width)


def canonical_batches(n: int, batch_size: int, lengths: np.ndarray | None = None,
                      width: int = 0, multiple: int = TOKEN_MULTIPLE) -> list[np.ndarray]:
    """Positions ``0..n-1`` in batches of exactly ``batch_size``, grouped by padded length.

    Args:
        n: Rows to predict.
        batch_size: Rows per batch; a group's last batch repeats its last position to fill up.
        lengths: Token count of each row (None: one group, e.g. images only).
        width: The token cache's width (caps the padded length).
        multiple: Captions are padded to a multiple of this (:func:`token_multiple`).

    Returns:
        Batches of positions; a position occurs in exactly one batch, plus repeats of it as
        filler in that same batch (:func:`is_filler` marks them).
    """
    groups = [np.arange(n)] if lengths is None else _groups(padded_length(lengths, width, multiple))
    out = []
    for rows in groups:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            out.append(np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1])]))
    return out


def _groups(padded: np.ndarray) -> list[np.ndarray]:
    """Positions of each padded length (shortest first), each in position order."""
    return [np.flatnonzero(padded == v) for v in np.unique(padded)]


def is_filler(pos: np.ndarray) -> np.ndarray:
    """True for the positions of a batch that repeat an earlier one (filler rows)."""
    pos = np.asarray(pos)
    first = np.zeros(len(pos), dtype=bool)
    _, idx = np.unique(pos, return_index=True)
    first[idx] = True
    return ~first
