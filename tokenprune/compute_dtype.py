"""The dtype and device a module computes in, for quantized models as well as full-precision ones.

A quantized layer's weight says nothing about its activations: bitsandbytes 4-bit stores packed ``uint8`` weights,
8-bit stores ``int8``, torch's dynamic int8 ``Linear`` holds no parameter at all (so ``next(module.parameters())``
raises a bare ``StopIteration``), torchao keeps a tensor subclass. Activations keep the model's floating dtype in
every one of them (bitsandbytes casts its output back to the input's dtype). So the answer comes, in this order,
from a floating activation the caller has at hand, then from the module's floating parameters and buffers (biases,
norms, embeddings: quantizers leave them in the model's dtype), and only for a module that holds no floating tensor
at all (a stack of dynamic int8 ``Linear`` layers) from torch's default dtype, which is what those layers take.
"""

from __future__ import annotations

import torch


def compute_dtype_device(module: torch.nn.Module | None, *activations: torch.Tensor | None
                         ) -> tuple[torch.dtype, torch.device]:
    """``(dtype, device)`` that ``module`` computes in: the first floating tensor of ``activations``, else the first
    floating parameter or buffer of ``module``, else torch's default dtype; the device likewise, where any tensor
    of the module (a quantized weight too) tells it, else the CPU (dynamic int8 runs on the CPU only)."""
    for tensor in activations:
        if tensor is not None and (tensor.is_floating_point() or tensor.is_complex()):
            return tensor.dtype, tensor.device
    device = None
    if module is not None:
        for tensor in _tensors(module):
            if tensor.is_floating_point():
                return tensor.dtype, tensor.device
            device = device or tensor.device
    return torch.get_default_dtype(), device or torch.device("cpu")


def compute_dtype(module: torch.nn.Module | None, *activations: torch.Tensor | None) -> torch.dtype:
    """The dtype half of :func:`compute_dtype_device`."""
    return compute_dtype_device(module, *activations)[0]


def compute_device(module: torch.nn.Module | None, *activations: torch.Tensor | None) -> torch.device:
    """The device half of :func:`compute_dtype_device`."""
    return compute_dtype_device(module, *activations)[1]


def _tensors(module: torch.nn.Module):
    yield from module.parameters()
    yield from module.buffers()
