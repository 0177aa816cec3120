"""Optional calibration: VFlowOpt's hyper-parameter search on the user's own data (docs/methods/two-stage.md).

VFlowOpt (ICCV 2025) found its shipped configurations with an offline, flow-guided search on calibration data. This
is a black-box re-implementation of that idea, not the official optimiser: random search over ``(t, m, r_vit,
llm_r)``; every candidate runs the calibration prompts with pruning on, and its cost is the mean KL divergence of
the next-token distribution at the last prompt token from the unpruned model's (how much of the visual information
that reaches the output is lost). Candidates whose measured layer-averaged visual share exceeds the budget are
rejected. The shipped (or interpolated) configuration of the budget is always the first candidate.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import torch

from tokenprune.api import disable_pruning, enable_pruning
from tokenprune.functional.vflowopt import VFlowOptConfig, vflowopt_config
from tokenprune.methods.vflowopt import VFlowOpt


def _next_token_logprobs(model: torch.nn.Module, batches: list[dict[str, Any]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(**b).logits[:, -1].float(), dim=-1) for b in batches]


def search_vflowopt(
    model: torch.nn.Module, batches: Iterable[dict[str, Any]], budget: float, trials: int = 20, seed: int = 0,
    tolerance: float = 0.01, layers: tuple[int, ...] | None = None,
) -> tuple[VFlowOptConfig, list[dict[str, Any]]]:
    """Search VFlowOpt's hyper-parameters for ``budget`` (layer-averaged share of visual tokens) on ``batches``
    (processor outputs). Returns the best configuration (use ``VFlowOpt.from_config``) and one row per candidate
    (its fields, ``kl``, ``average_share`` and ``accepted``), best first. ``layers``: VFlowOpt's LLM layers (default:
    the official 9 and 18; set them on a shallower model)."""
    if not 0.0 < budget < 1.0:
        raise ValueError(f"search_vflowopt: budget must lie in (0, 1); got {budget!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("search_vflowopt needs at least one calibration batch (a processor output with images)")
    disable_pruning(model)
    reference = _next_token_logprobs(model, batches)
    rng = random.Random(seed)
    candidates = [vflowopt_config(budget)]
    for _ in range(max(0, trials - 1)):
        candidates.append(VFlowOptConfig(
            t=rng.uniform(20.0, 45.0), alpha_v=0.0, m=rng.uniform(6.0, 20.0),
            r_vit=rng.uniform(0.8 * budget, min(1.0, 3.0 * budget)),
            llm_r=(rng.uniform(0.5, 1.0), rng.uniform(0.3, 1.0)),
        ))
    rows = []
    for config in candidates:
        handle = enable_pruning(model, VFlowOpt.from_config(config, layers=layers), keep=budget)
        try:
            pruned = _next_token_logprobs(model, batches)
            shares = []
            for batch in batches:
                with torch.no_grad():
                    model(**batch)
                original = int((batch["input_ids"] == model.config.image_token_id).sum())  # before any pruning
                shares.append(handle.last.average_visual / max(1, original))
        finally:
            disable_pruning(model)
        kl = sum(torch.nn.functional.kl_div(p, r, log_target=True, reduction="batchmean").item()
                 for p, r in zip(pruned, reference, strict=True)) / len(batches)
        share = sum(shares) / len(shares)
        rows.append({**vars(config), "kl": kl, "average_share": share, "accepted": share <= budget + tolerance})
    rows.sort(key=lambda r: (not r["accepted"], r["kl"]))
    best = rows[0]
    return VFlowOptConfig(best["t"], best["alpha_v"], best["m"], best["r_vit"], tuple(best["llm_r"])), rows
