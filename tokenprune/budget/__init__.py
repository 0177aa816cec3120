"""The budget room: everything that turns a user's budget into token counts or counts tokens' cost.

* :mod:`tokenprune.budget.counts` -- ``keep`` (ratio or count) or a FLOPs target into a kept-token count per unit;
  the only place where rounding happens. Its public names are re-exported here (``from tokenprune.budget import
  kept_count``).
* :mod:`tokenprune.budget.flops` -- analytic prefill/decode FLOPs and KV-cache bytes of an LLM from its shape.
* :mod:`tokenprune.budget.flops_targets` -- ``enable_pruning(..., flops=0.25)``: solving the counts for a FLOPs
  target and the per-call FLOPs estimate the adapters record.
"""

from tokenprune.budget.counts import (
    SCOPES,
    Keep,
    flops_kept_counts,
    kept_count,
    largest_within,
    split_count,
    validate_budget,
    validate_flops,
    validate_keep,
    validate_scope,
)

__all__ = [
    "SCOPES",
    "Keep",
    "flops_kept_counts",
    "kept_count",
    "largest_within",
    "split_count",
    "validate_budget",
    "validate_flops",
    "validate_keep",
    "validate_scope",
]
