"""Two-stage methods: one name whose paper prunes twice, after (or inside) the vision tower and inside the LLM.

ToDRE (diversity pre-LLM, task relevance in the decoder), VisionDrop (ViT stage, then LLM stages) and VFlowOpt (ViT
map, then LLM layers) are single methods in their papers, but mechanically they are the stage list
``[vision_method, decoder_method]``. A :class:`TwoStageMethod` says how it splits (:meth:`TwoStageMethod.stages`)
and how its one ``keep`` budget splits between the two stages (:meth:`TwoStageMethod.stage_keeps`, the paper's
convention); ``enable_pruning(model, "todre", keep=...)`` then installs exactly what the stage list would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tokenprune.budget import Keep
from tokenprune.methods.base import PruningMethod


@dataclass
class TwoStageMethod(PruningMethod):
    """Base of the methods that prune once before the LLM and again inside it."""

    stage: ClassVar[str] = "two-stage"

    def stages(self) -> tuple[PruningMethod, PruningMethod]:
        """``(vision-stage method, decoder-stage method)`` with this method's hyper-parameters."""
        raise NotImplementedError

    def stage_keeps(self, keep: Keep) -> tuple[Keep, Keep]:
        """The one ``keep`` the user gave, split into ``(vision keep, decoder keep)`` (the paper's convention)."""
        raise NotImplementedError

    def signals_needed(self, cls_token: bool = True) -> frozenset[str]:  # type: ignore[override]
        vision, _ = self.stages()
        return vision.signals_needed(cls_token)

    def check_family(self, cls_token: bool = True) -> None:
        for part in self.stages():
            part.check_family(cls_token)
