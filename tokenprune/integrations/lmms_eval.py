"""lmms-eval 0.7.x models with visual-token pruning.

``--model tokenprune_llava_hf`` (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision), ``tokenprune_qwen2_vl``,
``tokenprune_qwen2_5_vl``, ``tokenprune_qwen3_vl`` (Qwen3-VL and Qwen3-VL-MoE), ``tokenprune_qwen3_5`` (Qwen3.5 and
Qwen3.5-MoE), ``tokenprune_internvl_hf`` (InternVL3) or ``tokenprune_gemma3`` (Gemma 3).

Each class subclasses lmms-eval's released wrapper (``llava_hf``, ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``,
``qwen3_5``, ``internvl_hf``, ``gemma3``; chat and simple variants where lmms-eval has both), takes the keys of
``--model_args`` that wrapper does not know as pruning options (:mod:`tokenprune.integrations.model_args`), loads the
model as the released wrapper does (quantized when ``--model_args`` has bitsandbytes keys such as
``load_in_4bit=True``) and then calls ``enable_pruning`` on the unwrapped model. What it logs:

* per sample (``--log_samples``): ``token_counts.tokenprune`` = visual tokens, kept tokens, prompt length before and
  after pruning, measured prefill ms (first forward of ``generate``, vision tower included) and, when the record
  has them, ``tflops_unpruned``/``tflops_pruned``;
* per run, in the results file's ``throughput`` section: the means of the same fields (``avg_tokenprune_*``); the
  pruning options themselves are in ``config.model_args``.

Requests are generated one at a time so that every sample gets its own record (the papers evaluate with batch 1).
Without torchvision (CPU machines with the CPU torch wheel) ``AutoProcessor`` cannot build the Qwen, LLaVA-OneVision
and InternVL processors; the wrappers then load the real processor class without its video processor (images only,
:mod:`tokenprune.integrations.image_only_processors`).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.models.chat import internvl_hf as _internvl_chat_module
from lmms_eval.models.chat import qwen2_5_vl as _qwen25_chat_module
from lmms_eval.models.chat import qwen3_vl as _qwen3_chat_module
from lmms_eval.models.chat.internvl_hf import InternVLHf as _InternVLHfChat
from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen25VLChat
from lmms_eval.models.chat.qwen3_5 import Qwen3_5 as _Qwen35Chat
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as _Qwen3VLChat
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.simple import llava_hf as _llava_simple_module
from lmms_eval.models.simple import qwen2_5_vl as _qwen25_simple_module
from lmms_eval.models.simple import qwen2_vl as _qwen2_simple_module
from lmms_eval.models.simple import qwen3_vl as _qwen3_simple_module
from lmms_eval.models.simple.gemma3 import Gemma3 as _Gemma3Simple
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHfSimple
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _Qwen25VLSimple
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL as _Qwen2VLSimple
from lmms_eval.models.simple.qwen3_5 import Qwen3_5 as _Qwen35Simple
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as _Qwen3VLSimple

from tokenprune.api import enable_pruning
from tokenprune.compute_dtype import compute_device
from tokenprune.integrations import qwen_images
from tokenprune.integrations.image_only_processors import (
    IMAGE_ONLY_BY_MODEL_TYPE,
    image_only_qwen_processor,
    torchvision_importable,
)
from tokenprune.integrations.model_args import quantized_loading, split_own_options

RECORD_FIELDS = (
    "visual_tokens", "kept_tokens", "seq_len_before", "seq_len_after", "prefill_ms", "tflops_unpruned", "tflops_pruned",
)


@dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-request ``TokenCounts`` plus the pruning record, logged as ``token_counts.tokenprune``."""

    tokenprune: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "tokenprune": dict(self.tokenprune)}


class GenerateRecorder:
    """Wraps ``model.generate`` on the instance: per call, the visual token count of the prompt, the pruning record
    of its prefill and the prefill time (first forward), and any exception (the released wrappers log and swallow
    generation errors; we re-raise them so a broken run cannot score empty answers)."""

    def __init__(self, model: torch.nn.Module, handle: Any):
        self.model, self.handle = model, handle
        self.calls: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._generate = model.generate
        self._prefill: list[float] = []
        image_token = getattr(model.config, "image_token_id", None)
        self.image_token_id = image_token if image_token is not None else model.config.image_token_index
        model.generate = self._recorded_generate
        model.register_forward_pre_hook(self._before_forward)
        model.register_forward_hook(self._after_forward)

    def _sync(self) -> None:
        if torch.cuda.is_available() and compute_device(self.model).type == "cuda":
            torch.cuda.synchronize()

    def _before_forward(self, module, args) -> None:
        if len(self._prefill) == 1:  # armed by generate, first forward = prefill
            self._sync()
            self._prefill.append(time.perf_counter())

    def _after_forward(self, module, args, output) -> None:
        if len(self._prefill) == 2:
            self._sync()
            self._prefill.append(time.perf_counter())

    def _recorded_generate(self, *args: Any, **kwargs: Any):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        before = self.handle.last if self.handle is not None else None
        self._prefill = [0.0]
        try:
            out = self._generate(*args, **kwargs)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            prefill, self._prefill = self._prefill, []
        visual = int((input_ids == self.image_token_id).sum()) if input_ids is not None else None
        entry: dict[str, Any] = {"visual_tokens": visual, "kept_tokens": visual}
        if input_ids is not None:
            entry["seq_len_before"] = entry["seq_len_after"] = int(input_ids.shape[-1])
        record = self.handle.last if self.handle is not None else None
        if record is not None and record is not before:
            entry.update(visual_tokens=record.n_visual, kept_tokens=record.n_kept,
                         seq_len_before=record.seq_len_before, seq_len_after=record.seq_len_after)
            for name in ("tflops_unpruned", "tflops_pruned"):  # FLOPs estimates, when the record carries them
                if getattr(record, name, None) is not None:
                    entry[name] = float(getattr(record, name))
        elif self.handle is not None:
            entry["pruned"] = False  # pruning enabled but this prompt had no image
        if len(prefill) == 3:
            entry["prefill_ms"] = (prefill[2] - prefill[1]) * 1e3
        self.calls.append(entry)
        return out


class PruningWrapperMixin:
    """Shared by all tokenprune wrappers: split ``--model_args``, enable pruning, record every request."""

    def __init__(self, **kwargs: Any) -> None:
        accepted = wrapper_keys(type(self))
        own = {key: kwargs.pop(key) for key in list(kwargs) if key not in accepted}
        self.pruning_kwargs, self.quantization_config = split_own_options(own)
        with self._processor_loading(), quantized_loading(self.quantization_config):
            super().__init__(**kwargs)
        model = self.model  # unwrapped by the released wrappers' property
        self.pruning_handle = enable_pruning(model, **self.pruning_kwargs) if self.pruning_kwargs else None
        self.recorder = GenerateRecorder(model, self.pruning_handle)

    def _processor_loading(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def generate_until(self, requests: list) -> list:
        results = []
        for request in requests:  # one at a time: one generate call, one record per sample
            n_calls = len(self.recorder.calls)
            (output,) = super().generate_until([request])
            if self.recorder.error is not None:
                error, self.recorder.error = self.recorder.error, None
                raise RuntimeError(f"generation failed under {self.pruning_kwargs or 'no pruning'}") from error
            calls = self.recorder.calls[n_calls:]
            if len(calls) != 1:
                raise RuntimeError(f"expected one generate call for one request, saw {len(calls)}")
            results.append(_with_record(output, calls[0]))
        self._log_means(self.recorder.calls[-len(requests):] if requests else [])
        return results

    def _log_means(self, calls: list[dict[str, Any]]) -> None:
        means = {}
        for name in RECORD_FIELDS:
            values = [c[name] for c in calls if c.get(name) is not None]
            if values:
                means[f"tokenprune_{name}"] = sum(values) / len(values)
        if means:
            log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=means)


def _with_record(output: Any, record: dict[str, Any]) -> GenerationResult:
    if isinstance(output, GenerationResult):
        text, counts = output.text, output.token_counts
    else:
        text, counts = output, None
    return GenerationResult(
        text=text,
        token_counts=PrunedTokenCounts(
            input_tokens=record.get("seq_len_after"),
            output_tokens=getattr(counts, "output_tokens", None),
            reasoning_tokens=getattr(counts, "reasoning_tokens", None),
            tokenprune=record,
        ),
    )


def wrapper_keys(cls: type) -> frozenset[str]:
    """The ``--model_args`` keys the released wrapper under ``cls`` takes itself: its ``__init__`` parameters, and
    those of the wrappers it hands ``**kwargs`` on to (lmms-eval's ``qwen3_5`` passes them to ``qwen3_vl``)."""
    keys: set[str] = set()
    for base in cls.__mro__:
        if base.__module__.startswith("lmms_eval.") and "__init__" in vars(base):
            params = inspect.signature(base.__init__).parameters.values()
            keys |= {p.name for p in params if p.kind is not p.VAR_KEYWORD and p.name != "self"}
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                return frozenset(keys)
    if keys:
        return frozenset(keys)
    raise TypeError(f"{cls.__name__} does not derive from an lmms-eval wrapper")


# ---------------------------------------------------------------------------------------------------------------
# Processors without torchvision


class _ImageOnlyAutoProcessor:
    """Stands in for ``AutoProcessor`` inside a released wrapper's ``__init__`` when torchvision is missing: loads
    ``image_only`` (a processor class, or a map model_type -> builder of one; other model types go to ``original``)."""

    def __init__(self, image_only: type | dict[str, Any], original: Any):
        self.image_only, self.original = image_only, original

    def from_pretrained(self, pretrained: str, **kwargs: Any):
        processor_class = self.image_only
        if isinstance(processor_class, dict):
            from transformers import AutoConfig

            options = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
            build = processor_class.get(AutoConfig.from_pretrained(pretrained, **options).model_type)
            if build is None:
                return self.original.from_pretrained(pretrained, **kwargs)
            processor_class = build()
        return processor_class.from_pretrained(pretrained, **kwargs)


@contextlib.contextmanager
def _image_only_processor(module: Any, image_only: type | dict[str, Any]) -> Iterator[None]:
    """Swap ``module.AutoProcessor`` for :class:`_ImageOnlyAutoProcessor` while torchvision is missing."""
    if torchvision_importable():
        yield
        return
    original = module.AutoProcessor
    module.AutoProcessor = _ImageOnlyAutoProcessor(image_only, original)
    try:
        yield
    finally:
        module.AutoProcessor = original


@contextlib.contextmanager
def _image_only_vision_info(modules: tuple[Any, ...]) -> Iterator[None]:
    """Give the wrapper modules whose ``qwen_vl_utils`` import failed (no torchvision) the image-only
    :func:`tokenprune.integrations.qwen_images.process_vision_info` for the duration of a call."""
    missing = [m for m in modules if getattr(m, "process_vision_info", None) is None]
    for module in missing:
        module.process_vision_info = qwen_images.process_vision_info
    try:
        yield
    finally:
        for module in missing:
            module.process_vision_info = None


class _QwenMixin(PruningWrapperMixin):
    """Qwen wrappers: without torchvision, the processor and ``process_vision_info`` fall back to image-only
    versions of the same code (the released ones need torchvision for videos only)."""

    _simple_module: Any = None
    _modules: tuple[Any, ...] = ()
    _processor_name = "Qwen2VLProcessor"

    def _processor_loading(self) -> contextlib.AbstractContextManager:
        import transformers

        base = getattr(transformers, self._processor_name)
        return _image_only_processor(self._simple_module, image_only_qwen_processor(base))

    def generate_until(self, requests: list) -> list:
        with _image_only_vision_info(self._modules):
            return super().generate_until(requests)


# ---------------------------------------------------------------------------------------------------------------
# The published models


class _ImageOnlyByModelTypeMixin(PruningWrapperMixin):
    """Wrappers whose ``AutoProcessor`` cannot build some of their models' processors without torchvision
    (LLaVA-OneVision, InternVL): those load the image-only version of the real processor class."""

    _autoprocessor_module: Any = None

    def _processor_loading(self) -> contextlib.AbstractContextManager:
        return _image_only_processor(self._autoprocessor_module, IMAGE_ONLY_BY_MODEL_TYPE)


class TokenpruneLlavaHf(_ImageOnlyByModelTypeMixin, _LlavaHfChat):
    """``--model tokenprune_llava_hf``: lmms-eval's ``llava_hf`` (chat) with pruning (LLaVA-1.5, LLaVA-NeXT and
    LLaVA-OneVision: lmms-eval's ``llava_hf`` loads ``LlavaOnevisionForConditionalGeneration`` for its checkpoints)."""

    _autoprocessor_module = _llava_simple_module


class TokenpruneLlavaHfSimple(_ImageOnlyByModelTypeMixin, _LlavaHfSimple):
    """``--model tokenprune_llava_hf --force_simple``."""

    _autoprocessor_module = _llava_simple_module


class TokenpruneInternVLHf(_ImageOnlyByModelTypeMixin, _InternVLHfChat):
    """``--model tokenprune_internvl_hf``: lmms-eval's ``internvl_hf`` (chat only, batch size 1) with pruning
    (InternVL3 / InternVL3.5 ``-hf`` checkpoints, ``InternVLForConditionalGeneration``)."""

    _autoprocessor_module = _internvl_chat_module


class TokenpruneGemma3(PruningWrapperMixin, _Gemma3Simple):
    """``--model tokenprune_gemma3``: lmms-eval's ``gemma3`` (simple only) with pruning (Gemma 3 4B/12B/27B)."""


class TokenpruneQwen2VL(_QwenMixin, _Qwen2VLSimple):
    """``--model tokenprune_qwen2_vl``: lmms-eval's ``qwen2_vl`` (simple only) with pruning."""

    _simple_module = _qwen2_simple_module
    _modules = (_qwen2_simple_module,)


class TokenpruneQwen25VL(_QwenMixin, _Qwen25VLChat):
    """``--model tokenprune_qwen2_5_vl``: lmms-eval's ``qwen2_5_vl`` (chat) with pruning."""

    _simple_module = _qwen25_simple_module
    _modules = (_qwen25_chat_module,)
    _processor_name = "Qwen2_5_VLProcessor"


class TokenpruneQwen25VLSimple(_QwenMixin, _Qwen25VLSimple):
    """``--model tokenprune_qwen2_5_vl --force_simple``."""

    _simple_module = _qwen25_simple_module
    _modules = (_qwen25_simple_module,)
    _processor_name = "Qwen2_5_VLProcessor"


class TokenpruneQwen3VL(_QwenMixin, _Qwen3VLChat):
    """``--model tokenprune_qwen3_vl``: lmms-eval's ``qwen3_vl`` (chat) with pruning (Qwen3-VL, Qwen3-VL-MoE)."""

    _simple_module = _qwen3_simple_module
    _modules = (_qwen3_chat_module,)
    _processor_name = "Qwen3VLProcessor"


class TokenpruneQwen3VLSimple(_QwenMixin, _Qwen3VLSimple):
    """``--model tokenprune_qwen3_vl --force_simple``."""

    _simple_module = _qwen3_simple_module
    _modules = (_qwen3_simple_module,)
    _processor_name = "Qwen3VLProcessor"


class TokenpruneQwen35(_QwenMixin, _Qwen35Chat):
    """``--model tokenprune_qwen3_5``: lmms-eval's ``qwen3_5`` (chat) with pruning (Qwen3.5, Qwen3.5-MoE)."""

    _simple_module = _qwen3_simple_module
    _modules = (_qwen3_chat_module,)
    _processor_name = "Qwen3VLProcessor"


class TokenpruneQwen35Simple(_QwenMixin, _Qwen35Simple):
    """``--model tokenprune_qwen3_5 --force_simple``."""

    _simple_module = _qwen3_simple_module
    _modules = (_qwen3_simple_module,)
    _processor_name = "Qwen3VLProcessor"
