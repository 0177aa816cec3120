"""The one change to vLLM's model runners: rewrite M-RoPE positions after the encoder for pruned Qwen models.

vLLM 0.32's V1 runners call ``model.recompute_mrope_positions`` after each encoder run only when
``runner.is_multimodal_pruning_enabled`` is set, which ``GPUModelRunner.load_model`` derives from
``video_pruning_rate > 0`` (EVS) and ``CPUModelRunner.load_model`` never sets at all (so even stock EVS crashes on
the CPU build). After ``load_model`` we also set it when the loaded model is a tokenprune model that prunes with
M-RoPE (``tokenprune_recomputes_mrope``). Stock models keep the stock behaviour.
"""

from __future__ import annotations

import functools

_PATCHED = "_tokenprune_patched"


def _wrap_load_model(cls) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self.get_model(), "tokenprune_recomputes_mrope", False):
            self.is_multimodal_pruning_enabled = True
        return result

    setattr(load_model, _PATCHED, True)
    cls.load_model = load_model


def patch_model_runners() -> None:
    """Wrap ``load_model`` of the V1 GPU runner and of the CPU runner (whichever this vLLM build has)."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # pragma: no cover - builds without the V1 GPU runner
        GPUModelRunner = None
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # pragma: no cover - builds without the CPU runner
        CPUModelRunner = None
    for cls in (GPUModelRunner, CPUModelRunner):
        if cls is not None:
            _wrap_load_model(cls)
