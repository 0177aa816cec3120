"""The scaled selectors (issue 24) against the textbook formulas, written out here from the papers: the full N x N
matrix, every score recomputed from scratch at every step. Random inputs with exact ties (duplicated tokens), in
several dtypes, both regimes (N <= 2 D keeps the matrix, N > 2 D works in column blocks / one row per pick), and batched
selection (B images or crops in one call) == one call per image."""

import pytest
import torch

from tokenprune import functional as F
from tokenprune.bench.references import cdpruner_naive, mmtok_naive
from tokenprune.functional.coverage import coverage_items

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only spins on a loaded machine

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _distance(x: torch.Tensor) -> torch.Tensor:
    u = _unit(x, torch.finfo(torch.float32).tiny)
    return 1.0 - u @ u.T


def divprune_textbook(x: torch.Tensor, k: int) -> list[int]:
    """First: the token whose nearest other token is farthest; then max over tokens of min over chosen."""
    n = x.shape[0]
    if k >= n:
        return list(range(n))
    dist = _distance(x)
    chosen = [int(torch.argmax(torch.sort(dist, dim=0).values[1]))]
    while len(chosen) < k:
        score = dist[chosen].min(dim=0).values
        score[chosen] = -torch.inf
        chosen.append(int(torch.argmax(score)))
    return sorted(chosen)


def kcenter_textbook(x: torch.Tensor, k: int, pivot: int, rule: str) -> list[int]:
    n = x.shape[0]
    if k >= n:
        return list(range(n))
    dist = _distance(x)
    chosen = [pivot]
    while len(chosen) < k:
        if rule == "kcenter":
            score = dist[chosen].min(dim=0).values
        else:  # the summed similarity, accumulated in pick order
            score = -(1.0 - dist[chosen[0]])
            for c in chosen[1:]:
                score = score - (1.0 - dist[c])
        score[chosen] = -torch.inf
        chosen.append(int(torch.argmax(score)))
    return sorted(chosen)


def _case(seed: int, dtype: torch.dtype, n_max: int = 90, d: int = 48) -> tuple[torch.Tensor, int, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(6, n_max, (1,), generator=g))
    x = torch.randn(n, d, generator=g)
    if seed % 2:  # exact ties: duplicated tokens, one of them the first row
        x[1:4] = x[0]
        x[n // 2] = x[n - 1]
    k = int(torch.randint(1, n, (1,), generator=g))
    return x.to(dtype), k, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_divprune_equals_the_textbook_greedy(seed, dtype):
    x, k, _ = _case(seed, dtype, d=24 if seed < 4 else 160)  # N > 2 D (column blocks) and N <= 2 D (matrix kept)
    assert F.divprune(x, k).tolist() == divprune_textbook(x, k)


def test_divprune_column_blocks_cover_every_column():
    """N > 2 D with several column blocks (64 per block at D = 8): the first pick sees every token."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, generator=g)
    x[290] = 50 * torch.randn(8, generator=g)  # a lone outlier late in the sequence: the first pick
    for k in (1, 5, 40):
        assert F.divprune(x, k).tolist() == divprune_textbook(x, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_kcenter_and_maxsum_equal_the_textbook_greedy(seed, dtype):
    x, k, g = _case(seed, dtype, d=24)  # N from 6 to 89: both sides of N = D (whole matrix / blocks)
    pivot = int(torch.randint(x.shape[0], (1,), generator=g))
    assert F.kcenter(x, k, pivot).tolist() == kcenter_textbook(x, k, pivot, "kcenter")
    assert F.kcenter(x, k, pivot, rule="maxsum").tolist() == kcenter_textbook(x, k, pivot, "maxsum")


@pytest.fixture
def blocks(monkeypatch):
    """The blocked-rows path at test sizes: the whole matrix is one product up to ``WHOLE`` (1,024) tokens."""
    from tokenprune.functional import similarity_rows

    monkeypatch.setattr(similarity_rows, "WHOLE", 16)


def test_similarity_rows_round_as_the_full_matrix(blocks):
    """The premise of the blocked rows (one thread): rows of a product of >= 16 rows, the 256-wide diagonal blocks
    and the transpose of ``x x^T`` equal the full matrix bit for bit (a 1-row product would not)."""
    from tokenprune.functional.diversity import unit_rows
    from tokenprune.functional.similarity_rows import SimilarityRows, diagonal

    g = torch.Generator().manual_seed(0)
    x = unit_rows(torch.randn(600, 512, generator=g))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = x @ x.T
        assert torch.equal(full, full.T) and torch.equal(diagonal(x), torch.diagonal(full))
        rows = SimilarityRows(x, block=16)
        score = torch.randn(600, generator=g)
        for i in (5, 599, 0, int(torch.argmax(score))):
            assert torch.equal(rows.row(i, score), full[i])
        assert rows.products <= 4 and rows.full is None  # N > WHOLE: blocks
    finally:
        torch.set_num_threads(threads)


def test_similarity_rows_free_taken_rows_and_evict_the_lowest_scores(blocks):
    """A taken row leaves the cache at once; a full cache drops the rows of the lowest-scored tokens (not all of
    them), and every row handed out is still the full matrix's."""
    from tokenprune.functional.diversity import unit_rows
    from tokenprune.functional.similarity_rows import SimilarityRows

    g = torch.Generator().manual_seed(1)
    x = unit_rows(torch.randn(300, 128, generator=g))
    full = x @ x.T
    rows = SimilarityRows(x, block=16)  # capacity max(16, 128 / 4) = 32 rows
    score = torch.randn(300, generator=g)
    first = int(torch.argmax(score))
    assert torch.equal(rows.take(first, score), full[first]) and first not in rows.slot and len(rows.slot) == 15
    score[first] = -torch.inf
    for low in torch.argsort(score)[:2].tolist():  # two misses far down the ranking: 15 + 16 + 16 > 32 rows
        assert torch.equal(rows.take(low, score), full[low])
        assert len(rows.slot) <= rows.capacity
    kept = torch.tensor(sorted(rows.slot))
    assert len(rows.slot) == 31 and torch.isin(torch.topk(score, 16).indices, kept).all()  # the best 16 survive
    assert all(torch.equal(rows.store[place], full[t]) for t, place in rows.slot.items())


@pytest.mark.parametrize("seed", range(2))
def test_greedy_selectors_past_the_blocks_equal_the_textbook(seed, blocks):
    """N = 600 > WHOLE (DivPrune's first pick from 75 probe rows and bounds, candidates in blocks of 256), clustered
    tokens with duplicates and outliers; k-center, max-sum and CDPruner from blocked rows of 64."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, 32, generator=g)
    x = centres[torch.randint(0, 12, (600,), generator=g)] + 0.3 * torch.randn(600, 32, generator=g)
    x[400:405] = x[3]
    x[550] = 5 * torch.randn(32, generator=g)
    for k in (1, 40):
        assert F.divprune(x, k).tolist() == divprune_textbook(x, k)
        assert F.kcenter(x, k, 17).tolist() == kcenter_textbook(x, k, 17, "kcenter")
        assert F.kcenter(x, k, 17, rule="maxsum").tolist() == kcenter_textbook(x, k, 17, "maxsum")
    assert F.divprune(x.bfloat16(), 40).tolist() == divprune_textbook(x.bfloat16(), 40)
    relevance = torch.randn(600, generator=g)
    assert torch.equal(F.cdpruner(x, relevance, 20), cdpruner_naive(x, relevance, 20))  # within the rank (D = 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_cdpruner_equals_the_textbook_greedy_map(seed, dtype):
    """Full-rank kernels (D > N, distinct rows): past the rank the residuals are rounding noise that any two forms
    pick by. Likewise a relevance tie between DISTINCT tokens is decided by the rounding of their ``|u|^2 = 1``
    (the kernel's diagonal), which no two evaluation orders share (the official GPU code's included); ties between
    identical tokens are exact and covered by the batched test."""
    x, k, g = _case(seed, dtype, n_max=60, d=96)
    relevance = torch.randn(x.shape[0], generator=g)
    x = x + 0.01 * torch.randn(x.shape, generator=g).to(dtype)  # distinct rows: a full-rank kernel
    for quirks in (True, False):
        assert F.cdpruner(x, relevance, k, quirks=quirks).tolist() == cdpruner_naive(x, relevance, k, quirks).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_cdpruner_rows_on_demand_equal_the_textbook_greedy_map(seed):
    """N > 2 D: kernel rows one product at a time (the matrix is not built); k within the kernel's rank."""
    g = torch.Generator().manual_seed(seed)
    x, relevance = torch.randn(120, 40, generator=g), torch.randn(120, generator=g)
    for k in (1, 7, 20):
        for quirks in (True, False):
            assert torch.equal(F.cdpruner(x, relevance, k, quirks=quirks), cdpruner_naive(x, relevance, k, quirks))


def test_cdpruner_past_the_kernel_rank_keeps_k_distinct_tokens():
    x = torch.eye(4).repeat(5, 1)  # rank 4, 20 tokens
    kept = F.cdpruner(x, torch.arange(20.0), 9)
    assert kept.tolist() == sorted(set(kept.tolist())) and kept.numel() == 9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_mmtok_equals_the_textbook_greedy_coverage(seed, dtype):
    x, k, g = _case(seed, dtype, n_max=70)
    text = torch.randn(3, x.shape[1], generator=g).to(dtype)
    vs = torch.randn(x.shape[0], 24, generator=g).to(dtype)
    if seed % 2:
        vs[1:4] = vs[0]
    assert F.mmtok(x, text, k, vs, tv_temp=0.05).tolist() == mmtok_naive(x, text, k, vs, tv_temp=0.05).tolist()
    assert F.mmtok(x, text[:0], k, vs).tolist() == mmtok_naive(x, text[:0], k, vs).tolist()


def test_mmtok_coverage_blocks_are_the_whole_softmax():
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(37, 16, generator=g), torch.randn(2, 16, generator=g)
    whole = coverage_items(v, t, block=1000)
    torch.testing.assert_close(coverage_items(v, t, block=5), whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(whole[:, 2:].sum(dim=0), torch.full((37,), 0.5 / 37))  # each vision item: alpha / N


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["whole", "blocks"])
def test_batched_selection_equals_one_call_per_image(dtype, path, request):
    """5 crops of 40 tokens (a LLaVA-NeXT prompt's shape, scaled down) select in one call as they do one by one."""
    g = torch.Generator().manual_seed(0)
    if path == "blocks":
        request.getfixturevalue("blocks")  # N > WHOLE: rows on demand
    x = torch.randn(5, 40, 24, generator=g)
    x[2, 10:14] = x[2, 3]  # ties inside one crop
    x[4] = x[1]            # two identical crops
    x = x.to(dtype)
    relevance = torch.randn(5, 40, generator=g)
    pivots = torch.tensor([0, 7, 39, 3, 7])
    for k in (1, 6, 39, 40):
        assert torch.equal(F.divprune(x, k), torch.stack([F.divprune(c, k) for c in x]))
        for rule in ("kcenter", "maxsum"):
            looped = [F.kcenter(c, k, int(p), rule=rule) for c, p in zip(x, pivots, strict=True)]
            assert torch.equal(F.kcenter(x, k, pivots, rule=rule), torch.stack(looped))
        assert torch.equal(F.cdpruner(x, relevance, k),
                           torch.stack([F.cdpruner(c, r, k) for c, r in zip(x, relevance, strict=True)]))


def test_batched_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        F.divprune(torch.zeros(2, 3, 4, 5), 2)
    with pytest.raises(ValueError, match="relevance"):
        F.cdpruner(torch.zeros(2, 5, 4), torch.zeros(5), 2)


@pytest.mark.parametrize("name", ["divprune", "kcenter", "cdpruner"])
@pytest.mark.parametrize("cls_token", [True, False])
def test_select_many_equals_select_per_context(name, cls_token):
    """What the adapters call for a prompt's crops or images: contexts of equal (n, k) go through one batched
    call, the others alone; every result equals the method's select on that context."""
    from tokenprune.bench.selection import synthetic_context
    from tokenprune.methods import METHODS

    method = METHODS[name]()
    shapes = [(30, 5), (30, 5), (30, 5), (20, 5), (30, 4), (30, 30)]
    contexts = []
    for seed, (n, k) in enumerate(shapes):
        ctx = synthetic_context(method, n, 16, k, torch.float32, seed=seed)
        contexts.append(type(ctx)(k=k, n=n, signals=ctx.signals, cls_token=cls_token, index_in_row=seed % 2))
    many = method.select_many(contexts)
    assert len(many) == len(contexts)
    for ctx, kept in zip(contexts, many, strict=True):
        assert torch.equal(kept, method.select(ctx))


def _lof_inputs(seed: int) -> list[tuple[torch.Tensor, int]]:
    """1-D values with every kind of tie: duplicates, equal distances on both sides, distinct values whose fp64
    distances round to the same number (0.3 and 0.30000000000000004 from 0.1), bf16 attention, plain floats."""
    g = torch.Generator().manual_seed(seed)
    rounding = torch.tensor([0.1, 0.2, 0.3, 0.30000000000000004, 0.29999999999999993, 0.5, 0.7, 1.1],
                            dtype=torch.float64)
    cases = []
    for n in (2, 3, 17, 90):
        for k in sorted({1, 5, n - 1, n + 3}):
            cases += [
                (rounding[torch.randint(0, len(rounding), (n,), generator=g)], k),
                (torch.randint(0, 4, (n,), generator=g).double() * 0.1, k),
                (torch.softmax(torch.randn(n, generator=g) * 2, 0).bfloat16(), k),
                (torch.randn(n, generator=g), k),
            ]
    return cases


@pytest.mark.parametrize("seed", [0])
def test_lof_neighbours_and_fraction_equal_the_full_sort(seed):
    """Recoverable's LOF from the sorted values (O(N k)) == the full N x N matrix sorted row by row: the same
    neighbours in the same order (so every sum is bit-identical) and the same outlier fraction."""
    from tokenprune.bench.references import lof_outlier_fraction_naive
    from tokenprune.functional.recovery import _nearest

    for values, k in _lof_inputs(seed):
        x = values.double()
        n = x.numel()
        if n >= 2:
            kk = min(k, n - 1)
            dist = (x[:, None] - x[None, :]).abs()
            dist.fill_diagonal_(torch.inf)
            order = torch.sort(dist, dim=1, stable=True).indices[:, :kk]
            index, near = _nearest(x, kk)
            assert torch.equal(index, order) and torch.equal(near, torch.gather(dist, 1, order))
        assert F.lof_outlier_fraction(values, k) == lof_outlier_fraction_naive(values, k)


@pytest.mark.parametrize("seed", [0, 1])
def test_recoverable_cluster_rows_equal_the_per_centre_loop(seed):
    """Recoverable's recovery with the candidates' keys gathered once == the official per-centre loop (fresh
    candidate list and gather per centre): the same members in the same order, so bit-identical rows; duplicated
    keys and integer text similarities make exact ties."""
    from tokenprune.bench.references import cluster_rows_naive
    from tokenprune.functional.recovery import cluster_rows

    g = torch.Generator().manual_seed(seed)
    for n, dk, size in ((3, 4, 1), (30, 8, 5), (30, 8, 64), (120, 48, 32)):
        keys = torch.randn(n, dk, generator=g, dtype=torch.float64)
        keys[n // 2:] = keys[: n - n // 2].clone()
        keys = keys / keys.norm(dim=-1, keepdim=True)
        sim = torch.randn(n, generator=g, dtype=torch.float64).round()
        x, attn = torch.randn(n, 7, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
        perm = torch.randperm(n, generator=g)
        for c in sorted({1, n // 4, n}):
            args = (keys, sim, x, attn, perm[:c], perm[c:], size, 50.0)
            fast, naive = cluster_rows(*args), cluster_rows_naive(*args)
            assert len(fast) == len(naive) == c and all(torch.equal(a, b) for a, b in zip(fast, naive, strict=True))


@pytest.mark.parametrize("duplicated", [False, True])
def test_recoverable_cluster_rows_decide_near_ties_per_centre(monkeypatch, duplicated):
    """The centres' affinities come from one matrix product; a centre whose top affinities are closer than the
    rounding bound (here: duplicated tokens) is decided by the official per-centre product instead, and only then.
    Rows equal the per-centre loop's either way."""
    from tokenprune.bench.references import cluster_rows_naive
    from tokenprune.functional import recovery

    calls = []
    top = recovery._top
    monkeypatch.setattr(recovery, "_top", lambda scores, count: calls.append(count) or top(scores, count))
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(200, 64, generator=g, dtype=torch.float64)
    sim = torch.randn(200, generator=g, dtype=torch.float64) * 0.03
    if duplicated:  # tokens 100.. repeat tokens ..99: equal affinities
        keys[100:], sim[100:] = keys[:100].clone(), sim[:100].clone()
    keys = keys / keys.norm(dim=-1, keepdim=True)
    x, attn = torch.randn(200, 5, generator=g), torch.rand(200, generator=g, dtype=torch.float64)
    perm = torch.randperm(200, generator=g)
    args = (keys, sim, x, attn, perm[:70], perm[70:], 32, 50.0)
    fast, naive = recovery.cluster_rows(*args), cluster_rows_naive(keys, sim, x.double(), *args[3:])
    assert all(torch.equal(a, b) for a, b in zip(fast, naive, strict=True))
    assert (len(calls) > 0) == duplicated
