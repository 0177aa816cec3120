"""Neuron sparsity inside the decoder layers' FFN for decoder methods that ask for it (CoreMatching, ICML 2025).

Installed by :class:`~tokenprune.patches.decoder_loop.DecoderLoop` when its method's
:meth:`~tokenprune.methods.decoder_base.DecoderMethod.sparse_ffn` is true: every decoder layer's ``mlp`` gets an
instance ``forward`` (never the class's), removed by ``uninstall`` (``disable_pruning``). What it does per call kind:

* ``select`` (a pruning prefill): the FFN runs dense, op for op as the model's own SwiGLU MLP
  (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``); from its intermediate activations ``[M, I]`` over each row's
  valid tokens the method names the row's core neurons of the layer (kept on the prefill's selection, i.e. with
  the KV cache it wrote), and may add a per-token signal to the row's ``accumulated`` (CoreMatching's match).
* ``decode`` (a call on that cache): each row's FFN is computed on its core neurons only -- ``gate_proj``/``up_proj``
  rows and ``down_proj`` columns of those neurons -- so the FFN's MACs shrink by the core share (quantized
  projections hold no weight rows to gather: their FFN runs dense with the other neurons zeroed, the same result).
* ``replay`` (``use_cache=False`` steps of ``generate``): the prompt's tokens run dense as at the prefill, the
  generated ones on the core neurons, so cached and uncached generation agree.

Other calls (prompts without images, a prefill that pruned no token: ``keep=1.0`` is the model) run the model's FFN
untouched: the decoder loop makes no ``decode``/``replay`` call on a cache whose prefill kept every token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


class SparseFFN:
    """The FFN patch of one :class:`~tokenprune.patches.decoder_loop.DecoderLoop`."""

    def __init__(self, loop: Any):
        self.loop = loop
        self._patched: list[torch.nn.Module] = []
        for i, layer in enumerate(loop.layers):
            mlp = getattr(layer, "mlp", None)
            missing = [p for p in _PARTS if not hasattr(mlp, p)]
            if missing:
                raise ValueError(
                    f"{loop.method.name}: core neurons are defined on a dense SwiGLU FFN (gate_proj, up_proj, "
                    f"down_proj, act_fn); decoder layer {i}'s mlp is a {type(mlp).__name__} without {missing} (a "
                    f"mixture of experts has no single set of FFN neurons). Use a dense-FFN model or another "
                    f"decoder method (fastv, dart)"
                )

    def install(self) -> None:
        for i, layer in enumerate(self.loop.layers):
            mlp = layer.mlp

            def forward(x: torch.Tensor, *args: Any, _i: int = i, _mlp: torch.nn.Module = mlp, **kwargs: Any) -> Any:
                return self._forward(_i, _mlp, x)

            mlp.forward = forward
            self._patched.append(mlp)

    def uninstall(self) -> None:
        for mlp in self._patched:
            mlp.__dict__.pop("forward", None)
        self._patched.clear()

    # --- the FFN ------------------------------------------------------------------------------------------------
    def _forward(self, i: int, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        call = self.loop._call
        if call is None:
            return type(mlp).forward(mlp, x)
        if call.mode == "select":
            return self._select(i, mlp, x, call)
        cores = call.sel.ffn.get(i)
        if cores is None or all(c is None for c in cores):
            return type(mlp).forward(mlp, x)
        if call.mode == "decode":
            return torch.cat([_core_ffn(mlp, x[b: b + 1], cores[b]) for b in range(x.shape[0])])
        t = call.q - call.n  # replay: the generated tokens are the last t of the sequence
        if t == 0:
            return type(mlp).forward(mlp, x)
        prompt = type(mlp).forward(mlp, x[:, :-t])
        generated = torch.cat([_core_ffn(mlp, x[b: b + 1, -t:], cores[b]) for b in range(x.shape[0])])
        return torch.cat([prompt, generated], dim=1)

    def _select(self, i: int, mlp: torch.nn.Module, x: torch.Tensor, call: Any) -> torch.Tensor:
        inter = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [B, M, I], as the model's own MLP
        out = mlp.down_proj(inter)
        method, valid = self.loop.method, call.valid
        cores, signal = [], []
        for b in range(x.shape[0]):
            act = inter[b].detach()
            core = method.ffn_core(i, act[valid[b]])
            cores.append(core)
            signal.append(method.ffn_signal(i, act, valid[b], core))
        call.sel.ffn[i] = cores
        if signal and all(s is not None for s in signal):
            inc = torch.stack(signal).to(torch.float32)  # [B, M]
            call.accum = inc if call.accum is None else call.accum + inc
        return out


def _core_ffn(mlp: torch.nn.Module, x: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """The SwiGLU FFN of ``x`` ``[1, q, D]`` on the neurons ``core`` only (their gate/up rows, down columns);
    ``core`` None: the model's own dense FFN."""
    if core is None:
        return type(mlp).forward(mlp, x)
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if not all(_gatherable(m) for m in (gate, up, down)):  # quantized: no weight rows to gather
        inter = mlp.act_fn(gate(x)) * up(x)
        mask = torch.zeros(inter.shape[-1], dtype=inter.dtype, device=inter.device)
        return down(inter * mask.index_fill_(0, core.to(inter.device), 1))  # same result, dense MACs
    core = core.to(gate.weight.device)

    def rows(lin: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        return lin.weight.index_select(0, core), None if lin.bias is None else lin.bias.index_select(0, core)

    h = mlp.act_fn(F.linear(x, *rows(gate))) * F.linear(x, *rows(up))  # [1, q, |core|]
    return F.linear(h, down.weight.index_select(1, core), down.bias)


def _gatherable(lin: torch.nn.Module) -> bool:
    """A plain ``nn.Linear`` with a plain weight tensor (bitsandbytes layers and torchao's int8 weight tensors are
    neither: their rows cannot be gathered)."""
    return type(lin) is torch.nn.Linear and type(lin.weight.data) is torch.Tensor
