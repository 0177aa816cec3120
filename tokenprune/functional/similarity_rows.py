"""Rows of an image's cosine-similarity matrix on demand, a block of rows per matrix product.

The greedy selectors (DivPrune, k-center / max-sum, CDPruner's fast MAP) read one row of the ``N x N`` similarity
matrix per pick: ``k`` rows, ``k N D`` multiply-adds, where the whole matrix costs ``N^2 D`` (9x more at
``k = N / 9``). One row alone is a matrix-vector product, memory-bound on a CPU (it streams all ``N D`` features
for ``2 N D`` flops), so ``k`` of them ran slower than the one compute-bound ``N^2 D`` matmul. Here each missing row
is computed together with the rows the greedy is likely to ask for next -- the tokens with the highest scores at
that moment (a pick lowers the scores of few tokens, so the next picks are mostly among them) -- in one
``[block, D] x [D, N]`` product: compute-bound, and a few blocks cover most picks.

Rounding: on one thread the entries of a matrix product of at least 16 rows equal those of the full ``x x^T`` (MKL
tiles every output row alike; a 1-row product takes the matrix-vector path and rounds differently), so the picks
are those of the full matrix (``tests/test_selector_scaling.py``). With several threads MKL splits a block's
product differently from the full matrix's (measured: entries differ by up to 3e-7 at D = 4,096; the full matrix
itself is the same on any thread count), so two tokens whose scores differ by less than that may be ordered
differently from the full matrix; identical tokens still tie exactly (their columns are equal in every product).
"""

from __future__ import annotations

import torch

BLOCK = 64  # rows per product: >= 16 for the full matrix's rounding, small enough that few are wasted
WHOLE = 1024  # up to this many tokens one product of the whole matrix (<= 4 MiB): blocks only tie with it at 576


class SimilarityRows:
    """fp32 rows of ``x x^T`` for one image's unit rows ``x`` ``[N, D]``, computed ``block`` rows per product and
    cached in one preallocated ``[capacity, N]`` store (``capacity = max(block, D / 4)`` rows, about ``N D / 4``
    floats: the memory is bounded whatever the greedy asks); when it is full the rows of the lowest-scored tokens
    go, and a row :meth:`take` hands out frees its place at once. Rows of the whole matrix, one product, when
    ``N <= WHOLE`` (at most 4 MiB: faster than blocks there, whatever ``D``)."""

    def __init__(self, x: torch.Tensor, block: int = BLOCK) -> None:
        self.x, self.block = x, block
        self.full = x @ x.T if x.shape[0] <= WHOLE else None
        self.capacity = max(block, x.shape[-1] // 4)
        self.store = None if self.full is not None else x.new_empty((self.capacity, x.shape[0]))  # pages on use
        self.products = 0  # matrix products run (for the benchmark's record)
        self._clear()

    def _clear(self) -> None:
        self.slot: dict[int, int] = {}  # token -> its row of the store, oldest first
        self.free = list(range(self.capacity - 1, -1, -1))  # free rows of the store (a stack)
        self.cached = torch.zeros(self.x.shape[0], dtype=torch.bool, device=self.x.device)

    def row(self, index: int, score: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` similarities of token ``index`` to every token (a view of the store: read it before the next
        miss). On a miss, the block also computes the rows of the ``block - 1`` uncached tokens with the highest
        ``score`` ``[N]`` (the caller's next picks, likely)."""
        if self.full is not None:
            return self.full[index]
        if index not in self.slot:
            self._fill(index, score)
        return self.store[self.slot[index]]

    def take(self, index: int, score: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`row`, then free its place: a greedy reads a chosen token's row once (the token is never guessed
        again). The view stays valid until the next miss."""
        out = self.row(index, score)
        if self.full is None:
            self.free.append(self.slot.pop(index))
        return out

    def keep(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        """Cache ``rows`` ``[m, N]`` already computed (as a product of at least 16 rows) for ``tokens`` ``[m]``, as
        far as the store has room."""
        if self.full is not None:
            return
        self._put(tokens, rows)

    def _put(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        """Copy the rows of the tokens not cached yet into free rows of the store, in order, while there is room."""
        fresh: list[int] = []
        where: list[int] = []
        for i, token in enumerate(tokens.tolist()):
            if not self.free:
                break
            if token not in self.slot:
                self.slot[token] = self.free.pop()
                fresh.append(i)
                where.append(self.slot[token])
        if not fresh:
            return
        if fresh == list(range(len(fresh))):  # a prefix of the rows (the usual case): no gathered copy
            self.store[torch.tensor(where, dtype=torch.long, device=rows.device)] = rows[:len(fresh)]
        else:
            for i, place in zip(fresh, where, strict=True):
                self.store[place] = rows[i]
        self.cached[tokens[fresh]] = True

    def _evict(self, room: int, score: torch.Tensor | None) -> None:
        """Free ``room`` rows of the store: drop the rows of the tokens with the lowest ``score`` (the least likely
        picks), or the oldest rows without a score."""
        tokens = torch.tensor(list(self.slot)[::-1], dtype=torch.long, device=self.x.device)  # newest first
        if score is not None:
            tokens = tokens[torch.argsort(score[tokens], descending=True, stable=True)]
        drop = tokens[max(0, self.capacity - room):]  # the rest fits with ``room`` new rows
        for token in drop.tolist():
            self.free.append(self.slot.pop(token))
        self.cached[drop] = False

    def _fill(self, index: int, score: torch.Tensor | None) -> None:
        n = self.x.shape[0]
        guessing = score is not None and n > 1
        size = self.block if guessing else min(16, self.block)  # nothing to guess: the smallest exact product
        wanted = torch.full((size,), index, dtype=torch.long, device=self.x.device)  # padding repeats index
        if guessing:
            guess = score.masked_fill(self.cached, -torch.inf)
            guess[index] = -torch.inf
            others = torch.topk(guess, min(size - 1, n - 1)).indices
            others = others[guess[others] > -torch.inf]  # chosen or cached tokens need no row
            wanted[1:1 + others.numel()] = others
        if len(self.free) < size:
            self._evict(size, score)
        rows = self.x.index_select(0, wanted) @ self.x.T  # [block, N]: compute-bound, the full matrix's rounding
        self.products += 1
        self._put(wanted, rows)


def diagonal(x: torch.Tensor, width: int = 256) -> torch.Tensor:
    """``[N]`` diagonal of ``x x^T`` as the full matrix product rounds it, from ``[width, width]`` diagonal blocks
    (``N width D`` multiply-adds instead of ``N^2 D``; products with fewer than 256 columns take another kernel and
    round the sums differently)."""
    n = x.shape[0]
    width = min(width, n)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, width):
        lo = min(start, n - width)  # the last block overlaps the previous one: every block is width wide
        block = x[lo:lo + width]
        out[lo:lo + width] = torch.diagonal(block @ block.T)
    return out
