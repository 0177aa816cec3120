"""bitsandbytes quantization options given as flat ``key=value`` pairs (lmms-eval ``--model_args``, bench flags).

The keys are ``transformers.BitsAndBytesConfig``'s own (``load_in_4bit``, ``load_in_8bit``, ``bnb_4bit_quant_type``,
``bnb_4bit_use_double_quant``, ``bnb_4bit_compute_dtype``, ...), so a user benchmarks the model exactly as they load
it: ``load_in_4bit=True,bnb_4bit_quant_type=nf4`` here is
``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))``.
"""

from __future__ import annotations

from typing import Any

import torch

# BitsAndBytesConfig.__init__ parameters (transformers 5.23).
BNB_KEYS = (
    "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
)
_BOOLS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_use_double_quant", "llm_int8_enable_fp32_cpu_offload",
          "llm_int8_has_fp16_weight")
_DTYPES = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
QUANT_TYPES = ("nf4", "fp4")


def split_quantization(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(quantization options, the rest)`` of a flat option dict."""
    quant = {k: v for k, v in options.items() if k in BNB_KEYS}
    return quant, {k: v for k, v in options.items() if k not in BNB_KEYS}


def bnb_config(options: dict[str, Any]):
    """A ``BitsAndBytesConfig`` from ``options`` (keys of :data:`BNB_KEYS`; values as parsed by lmms-eval or as
    text), or None when neither ``load_in_4bit`` nor ``load_in_8bit`` is on. Raises ``ValueError`` for an unknown
    key, a bnb option without a ``load_in_*`` switch, both switches, or a value of the wrong kind."""
    unknown = sorted(set(options) - set(BNB_KEYS))
    if unknown:
        raise ValueError(f"unknown quantization option(s) {unknown}; bitsandbytes options: {', '.join(BNB_KEYS)}")
    values = {key: _convert(key, value) for key, value in options.items()}
    four, eight = values.get("load_in_4bit", False), values.get("load_in_8bit", False)
    if four and eight:
        raise ValueError("load_in_4bit and load_in_8bit were both set; choose one")
    if not (four or eight):
        extra = sorted(k for k in values if k not in ("load_in_4bit", "load_in_8bit"))
        if extra:
            raise ValueError(f"quantization option(s) {extra} were given without load_in_4bit=True or "
                             "load_in_8bit=True; add one of them (or drop the options for a full-precision model)")
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**values)


def describe(config: Any) -> str:
    """A short label of a ``BitsAndBytesConfig`` (``bnb-4bit-nf4-dq``, ``bnb-8bit``) or ``none``."""
    if config is None:
        return "none"
    if getattr(config, "load_in_8bit", False):
        return "bnb-8bit"
    label = f"bnb-4bit-{config.bnb_4bit_quant_type}"
    return label + "-dq" if config.bnb_4bit_use_double_quant else label


def _convert(key: str, value: Any) -> Any:
    if key in _BOOLS:
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ValueError(f"{key} must be true or false; got {value!r}")
    if key in _DTYPES:
        if isinstance(value, torch.dtype):
            return value
        dtype = getattr(torch, str(value).strip(), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{key} must be a torch dtype name such as float32, bfloat16 or float16; got {value!r}")
        return dtype
    if key == "bnb_4bit_quant_type":
        if str(value).lower() not in QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}; got {value!r}")
        return str(value).lower()
    if key == "llm_int8_threshold":
        return float(value)
    if key == "llm_int8_skip_modules":
        return [value] if isinstance(value, str) else list(value)
    return value
