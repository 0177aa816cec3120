"""Selection cost: every registered method's ``select`` on synthetic signals of real shapes, in milliseconds and as
a fraction of one LLM decoder layer's prefill over the same number of tokens, measured in the same run.

Shapes: ``N`` visual tokens (576 = LLaVA-1.5, 2,880 = LLaVA-NeXT at its largest), ``D`` = 4,096 (the projected
features, LLaVA-7B's hidden size), ``k`` = 64 per 576 tokens. The layer is a Llama decoder layer with the
LLaVA-7B shape (d=4096, m=11008, 32 heads), sdpa, in the features' dtype. Methods whose signals have no
synthetic generator here are listed as skipped with the missing signal (add it to ``SYNTHETIC``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from tokenprune.bench.measure import Timer
from tokenprune.bench.references import REFERENCES
from tokenprune.budget.flops import layer_flops, preset
from tokenprune.methods import METHODS, SelectionContext


def _softmax_rows(heads: int, n: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    logits = torch.randn(heads, n + 1, generator=g) * 2  # [H, 1 + N]: [CLS] + patches, softmax over all keys
    return torch.softmax(logits, dim=-1)[:, 1:].to(dtype)


# signal name -> (n, d, generator, dtype) -> a tensor of the shape an adapter hands the method (names and shapes of
# ``tokenprune.methods.base``; CLIP ViT-L/14 tower: 16 heads x 64, width 1024; M = 32 text tokens)
SYNTHETIC: dict[str, Callable[[int, int, torch.Generator, torch.dtype], torch.Tensor]] = {
    "features": lambda n, d, g, dt: torch.randn(n, d, generator=g).to(dt),                    # [N, D]
    "cls_attention": lambda n, d, g, dt: _softmax_rows(16, n, g, dt),                         # [H, N]
    "attention_received": lambda n, d, g, dt: _softmax_rows(1, n, g, dt)[0],                  # [N]
    "attention_map": lambda n, d, g, dt: _softmax_rows(n, n, g, dt),                          # [N, N]
    "vision_hidden": lambda n, d, g, dt: torch.randn(n, 1024, generator=g).to(dt),            # [N, Dv]
    "cls_hidden": lambda n, d, g, dt: torch.randn(1024, generator=g).to(dt),                  # [Dv]
    "vision_keys": lambda n, d, g, dt: torch.randn(16, n, 64, generator=g).to(dt),            # [H, N, d_h]
    "cls_attention_wide": lambda n, d, g, dt: _softmax_rows(1, n, g, dt)[0],                  # [N]
    "text_embeddings": lambda n, d, g, dt: torch.randn(32, d, generator=g).to(dt),            # [M, D]
}


def grid_of(n: int) -> tuple[int, int] | None:
    side = round(n ** 0.5)
    return (side, side) if side * side == n else None


def synthetic_context(method: Any, n: int, d: int, k: int, dtype: torch.dtype, seed: int = 0) -> SelectionContext:
    """A context with every signal ``method`` requests; ``KeyError`` naming a signal with no generator."""
    g = torch.Generator().manual_seed(seed)
    signals = {}
    for request in method.requests():
        if request.name not in SYNTHETIC:
            raise KeyError(request.name)
        signals[request.key] = SYNTHETIC[request.name](n, d, g, dtype)
    return SelectionContext(k=k, n=n, signals=signals, grid=grid_of(n))


def _time(fn: Callable[[], Any], timer: Timer, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [timer(fn) for _ in range(repeats)]


def decoder_layer(hidden: int, intermediate: int, heads: int, kv_heads: int,
                  dtype: torch.dtype) -> Callable[[int], Callable[[], Any]]:
    """``n -> one prefill of a Llama decoder layer of this shape over n tokens`` (sdpa, random weights, no grad;
    built on the meta device and filled with random values: the cost does not depend on them, and it is quicker
    than the default init at 7B width)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        module = LlamaDecoderLayer(config, layer_idx=0)
    module = module.to_empty(device="cpu").to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(dtype) if p.ndim > 1 else torch.ones(p.shape))
    rotary = LlamaRotaryEmbedding(config)

    def prefill(n: int) -> Callable[[], Any]:
        states = torch.randn(1, n, hidden, generator=g).to(dtype)
        position = rotary(states, torch.arange(n)[None])

        def run() -> Any:
            with torch.inference_mode():
                return module(states, attention_mask=None, position_embeddings=position)

        return run

    return prefill


def layer_ms(n: int, dtype: torch.dtype, timer: Timer, warmup: int, repeats: int, hidden: int = 4096,
             intermediate: int = 11008, heads: int = 32) -> list[float]:
    """Prefill time of one Llama decoder layer over ``n`` tokens (LLaVA-7B shape by default, random weights)."""
    return _time(decoder_layer(hidden, intermediate, heads, heads, dtype)(n), timer, warmup, repeats)


def run(sizes: tuple[int, ...] = (576, 2880), d: int = 4096, keep_per_576: int = 64, dtype: str = "bfloat16",
        repeats: int = 5, warmup: int = 1, methods: list[str] | None = None, layer: bool = True,
        progress: bool | None = None, reference_repeats: int | None = None) -> list[dict[str, Any]]:
    """One row per method x size: selection ms (median/min/max), the naive reference's ms if one is registered
    (same output asserted; ``reference_repeats`` timed runs, default ``repeats``), one layer's prefill ms and the
    selection's fraction of it."""
    from tqdm.auto import tqdm

    torch_dtype = getattr(torch, dtype)
    timer = Timer(torch.device("cpu"))
    reference_repeats = reference_repeats or repeats
    names = methods or sorted(METHODS)
    rows = []
    disable = None if progress is None else not progress
    bar = tqdm(total=len(sizes) * (len(names) + int(layer)), desc="selection", disable=disable)
    for n in sizes:
        k = max(1, round(keep_per_576 * n / 576))
        layer_runs = None
        if layer:
            bar.set_postfix_str(f"one LLM layer, N={n}")
            layer_runs = layer_ms(n, torch_dtype, timer, warmup, repeats)
            bar.update()
        for name in names:
            bar.set_postfix_str(f"{name} N={n}")
            method = METHODS[name]()
            row: dict[str, Any] = {"method": name, "n": n, "d": d, "k": k, "dtype": dtype, "stage": method.stage}
            if method.stage == "decoder":
                rows.append({**row, "skipped": "decoder-stage: selects inside the LLM, see tokenprune bench-decoder"})
                bar.update()
                continue
            try:
                ctx = synthetic_context(method, n, d, k, torch_dtype)
                runs = _time(lambda m=method, c=ctx: m.select(c), timer, warmup, repeats)
            except KeyError as missing:
                rows.append({**row, "skipped": f"no synthetic generator for signal {missing}"})
                bar.update()
                continue
            except Exception as err:  # a method that cannot run here (e.g. needs the encoder loop) is reported
                rows.append({**row, "skipped": f"{type(err).__name__}: {str(err)[:60]}"})
                bar.update()
                continue
            row.update(ms=statistics.median(runs), ms_min=min(runs), ms_max=max(runs))
            if name in REFERENCES:
                out = method.select(ctx)
                kept = out.kept if hasattr(out, "kept") else out
                ref = REFERENCES[name](ctx)
                if not torch.equal(ref, kept.cpu()):
                    raise AssertionError(f"the reference {name} disagrees with tokenprune's at N={n}, k={k}")
                ref_runs = _time(lambda r=REFERENCES[name], c=ctx: r(c), timer, min(warmup, 1), reference_repeats)
                row.update(reference_ms=statistics.median(ref_runs), reference_ms_min=min(ref_runs),
                           reference_ms_max=max(ref_runs), reference_speedup=statistics.median(ref_runs) / row["ms"])
            if layer_runs is not None:
                row.update(layer_ms=statistics.median(layer_runs), fraction_of_layer=row["ms"] / statistics.median(
                    layer_runs))
            row["layer_gflops"] = layer_flops(preset("llava-1.5-7b"), n, "exact") / 1e9
            rows.append(row)
            bar.update()
    bar.close()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("method", "N", "k", "select ms (min-max)", "naive ref ms", "x faster than naive", "1 layer ms",
              "% of a layer", "")
    lines = [header]
    for r in rows:
        if "skipped" in r:
            lines.append((r["method"], str(r["n"]), str(r["k"]), "skipped", "", "", "", "", r["skipped"]))
            continue
        lines.append((
            r["method"], str(r["n"]), str(r["k"]), f"{r['ms']:.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f})",
            f"{r['reference_ms']:.1f}" if "reference_ms" in r else "-",
            f"{r['reference_speedup']:.1f}x" if "reference_speedup" in r else "-",
            f"{r['layer_ms']:.0f}" if "layer_ms" in r else "-",
            f"{100 * r['fraction_of_layer']:.2f}%" if "fraction_of_layer" in r else "-", "",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
                      for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip() for line in lines]
    text.insert(1, "-" * max(len(t) for t in text))
    return "\n".join(text)
