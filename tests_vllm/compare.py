"""How the vLLM tests compare two greedy runs: the same tokens, logprobs within :data:`TOL`, and a control that shows
the comparison can fail; the measured gaps are printed at the end of the run (conftest.py)."""

from __future__ import annotations

from cases import Run

TOL = 1e-5  # fp32 noise between the engines is ~5e-7; a position off by one shifts logprobs by ~1e-3 here
# "label: max |dlogprob|" lines the end-to-end tests measured, printed at the end of the run (conftest.py)
MEASURED: list[str] = []


def max_diff(a: Run, b: Run) -> float:
    return max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True))


def report(label: str, diff: float) -> None:
    MEASURED.append(f"max |dlogprob| {label}: {diff:.2e}")


def assert_matches(ours: Run, ref: Run, control: Run, label: str) -> None:
    """``ours`` generates ``ref``'s tokens with logprobs within :data:`TOL` (the gap reported under ``label``), and
    the comparison can fail: ``control`` (the unpruned prompt) gives other logprobs."""
    assert ours.tokens == ref.tokens
    report(label, max_diff(ours, ref))
    assert max_diff(ours, ref) < TOL
    assert max_diff(control, ref) > 100 * TOL


def assert_batch_equals_alone(together: list[Run], alone: list[Run]) -> None:
    """Each request of a batch gets what it gets alone: the same tokens, logprobs within fp32 noise."""
    for a, b in zip(together, alone, strict=True):
        assert a.tokens == b.tokens
        assert max_diff(a, b) < TOL
