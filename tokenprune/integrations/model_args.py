"""Pruning options out of an lmms-eval ``--model_args`` string, without importing lmms-eval.

lmms-eval splits ``--model_args`` on commas (not inside ``[...]``, ``{...}`` or quotes) and converts each value:
``true``/``false`` to bools, digits to ints, anything ``float()`` accepts to floats, the rest stays a string.
tokenprune takes every key the released wrapper does not know as a pruning option and reads lists in two spellings
that survive the comma split:

* ``method=divprune+fastv``  (``+``-separated; also ``keep=0.5+0.25``), or
* ``method=[divprune,fastv]`` (brackets; JSON such as ``["divprune","fastv"]`` works too).

So ``method=divprune,keep=0.11`` gives ``enable_pruning(model, method="divprune", keep=0.11)``; ``keep=64`` a token
count; ``keep=1.0`` every token (``keep=1`` would be ONE token); ``flops=0.25``, ``scope=image`` and method
hyper-parameters (``seed=3``) are passed through as they are.

``transformers.BitsAndBytesConfig``'s own keys (``load_in_4bit=True``, ``load_in_8bit=True``,
``bnb_4bit_quant_type=nf4``, ``bnb_4bit_use_double_quant=True``, ``bnb_4bit_compute_dtype=bfloat16``, ...) are not
pruning options: they load the model quantized (:func:`quantization_from_model_args`, :func:`quantized_loading`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from tokenprune.quantization import bnb_config, split_quantization

# Keys of ``enable_pruning`` itself; every other pruning key is a method hyper-parameter.
BUDGET_KEYS = ("method", "keep", "flops", "scope")


def parse_scalar(text: str) -> Any:
    """One value as lmms-eval converts it (bool, int, float or str), plus ``none``/``null`` -> None."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text.strip("\"'")


def parse_value(value: Any) -> Any:
    """A ``--model_args`` value (already converted by lmms-eval or raw text) with lists expanded."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            inner = text[1:-1].strip()
            return [parse_scalar(part) for part in inner.split(",")] if inner else []
    if "+" in text:
        return [parse_scalar(part) for part in text.split("+")]
    return parse_scalar(text)


def split_args_string(args: str) -> dict[str, str]:
    """``k=v,k=[a,b],...`` -> raw strings, split the way lmms-eval splits (commas outside brackets and quotes)."""
    parts, current, depth, quote = [], [], 0, None
    for char in args.strip():
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    out = {}
    for part in filter(None, (p.strip() for p in parts)):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--model_args entry {part!r} is not key=value")
        out[key.strip()] = value
    return out


def pruning_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The ``enable_pruning`` keyword arguments from the pruning part of ``--model_args`` (empty: no pruning)."""
    kwargs = {key: parse_value(value) for key, value in options.items()}
    if kwargs and "method" not in kwargs:
        raise ValueError(
            f"pruning option(s) {sorted(kwargs)} were given without method=...; add e.g. method=divprune,keep=0.11 "
            "to --model_args (or drop them for the unpruned model)"
        )
    return kwargs


def split_own_options(options: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(enable_pruning kwargs, BitsAndBytesConfig or None)`` from the keys the released wrapper does not take."""
    quantization, pruning = split_quantization(options)
    return pruning_kwargs(pruning), bnb_config({key: parse_value(value) for key, value in quantization.items()})


def pruning_from_model_args(args: str, wrapper_keys: set[str] | frozenset[str]) -> dict[str, Any]:
    """The ``enable_pruning`` kwargs from a whole ``--model_args`` string, given the keys the wrapper takes itself."""
    raw = split_args_string(args)
    return split_own_options({k: v for k, v in raw.items() if k not in wrapper_keys})[0]


def quantization_from_model_args(args: str, wrapper_keys: set[str] | frozenset[str] = frozenset()):
    """The ``BitsAndBytesConfig`` a whole ``--model_args`` string asks for (None: full precision)."""
    raw = split_args_string(args)
    return split_own_options({k: v for k, v in raw.items() if k not in wrapper_keys})[1]


@contextlib.contextmanager
def quantized_loading(config: Any) -> Iterator[None]:
    """While active, ``from_pretrained`` of every transformers model loads with ``quantization_config=config``
    (unless the call gives its own) and an empty ``device_map`` becomes None (bitsandbytes then picks the device).
    The released lmms-eval wrappers call ``from_pretrained`` themselves with a fixed set of arguments; this is how
    a quantized model gets through them. Nothing changes when ``config`` is None; restored on exit."""
    if config is None:
        yield
        return
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]
    load = original.__func__

    def from_pretrained(cls, *args: Any, **kwargs: Any):
        kwargs.setdefault("quantization_config", config)
        if kwargs.get("device_map") == "":
            kwargs["device_map"] = None
        return load(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original
