"""TransPrune: prune visual tokens in stages inside the LLM by token transition variation + instruction attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.budget import Keep
from tokenprune.functional.transprune import transprune, transprune_counts, transprune_scale, transprune_ttv
from tokenprune.methods.base import Deviation
from tokenprune.methods.decoder_base import DecoderMethod, RowSignals, StagePlan

OFFICIAL_LAYERS = (7, 9, 12)  # first pruned layers of 32 (official scripts, LLaVA-1.5 and LLaVA-NeXT)
OFFICIAL_RATIOS = (0.875, 0.625, 0.125)  # of the ORIGINAL visual tokens: 504 / 360 / 72 of 576


@dataclass
class TransPrune(DecoderMethod):
    """TransPrune (Li et al., TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model,
    CVPR 2026).

    Token Transition Variation (TTV): for every sublayer (attention, MLP) of layers ``layers[0]-1 .. layers[-1]-1``
    (official 6..11), ``(|a|/|b|) * softmax_tokens(1 - cos(b, a))`` with ``b`` the normed input, ``a`` the output
    before the residual; summed over the layers run so far (no layer runs twice: forward hooks on the sublayers).
    Instruction-Guided Attention (IGA): with layer ``b``'s own q/k on its input, the attention of every instruction
    token after the image (softmax over all keys, head and row mean). At each boundary ``b`` the image tokens with
    the largest ``TTV/sum + IGA/sum`` are kept. Positions REINDEX (PDrop-style decode offsets); Qwen KEEP.

    Budget: ``scale`` (if given) multiplies the official ratios directly (``scale=1.0``: 576 -> 504/360/72,
    layer average 236.25); otherwise ``keep`` is the LAYER-AVERAGE share of visual tokens (like PyramidDrop) and the
    ratios are scaled to meet it: ``keep=0.41015625`` (236.25/576) reproduces the official schedule.
    """

    name = "transprune"
    paper = "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model (CVPR 2026)"
    positions = "reindex"
    deviations = (
        Deviation(
            "The TTV softmax runs over each row's valid tokens.",
            "The official code takes it over the whole tensor, batch 1; per row, padding cannot change a score.",
        ),
        Deviation(
            "A budget other than the official one scales the three stage ratios by one factor (`scale`, or solved "
            "from a layer-average `keep`); the official layers scale to the model's depth.",
            "The official scripts give one schedule (504 / 360 / 72 of 576 after layers 7 / 9 / 12 of 32).",
            "scale=1.0",
        ),
        Deviation(
            "Every stage keeps at least one visual token per image.",
            "The official `int(n * r)` can reach 0 for small images or ratios, which would leave an image with no "
            "token at all.",
        ),
    )
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] = OFFICIAL_RATIOS
    scale: float | None = None

    def __post_init__(self) -> None:
        self.ratios = tuple(float(r) for r in self.ratios)
        if not self.ratios or any(not 0.0 < r <= 1.0 for r in self.ratios):
            raise ValueError(f"transprune: ratios must lie in (0, 1]; got {self.ratios}")
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
            self._check(self.layers)
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"transprune: scale must be > 0; got {self.scale!r}")

    def _check(self, layers: tuple[int, ...]) -> None:
        increasing = all(b > a for a, b in zip(layers[:-1], layers[1:], strict=True))
        if len(layers) != len(self.ratios) or layers[0] < 1 or not increasing:
            raise ValueError(
                f"transprune: layers {layers} must be {len(self.ratios)} strictly increasing first-pruned layers >= 1 "
                f"(one per ratio); pass layers=... for this model"
            )

    def boundaries(self, n_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        return OFFICIAL_LAYERS  # on any depth; check_layers refuses them at enable time where they do not exist

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        return tuple(StagePlan(layer=b, score_layer=b) for b in self.boundaries(n_layers))

    def observed_layers(self, n_layers: int) -> tuple[int, ...]:
        layers = self.boundaries(n_layers)
        return tuple(range(layers[0] - 1, layers[-1]))

    def observe(self, layer: int, part: str, x: torch.Tensor, out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return transprune_ttv(x, out, valid)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        scale = self.scale
        if scale is None:
            average = min(1.0, keep / n) if isinstance(keep, int) else keep
            scale = transprune_scale(average, self.ratios, self.boundaries(n_layers), n_layers)
        return transprune_counts(n, self.ratios, scale)

    def select_stage(self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        text = row.text_after()
        if text.numel() == 0:
            text = torch.tensor([row.last])
        iga = row.attention(text).mean(dim=(0, 1))  # [N]: instruction rows, head and row mean
        ttv = row.accumulated
        return [transprune(ttv[slots], iga[slots], k) for slots, k in images]
