"""How quantization moves the selection (``tokenprune bench-accuracy --load-in-4bit --overlap``).

The shipped trained model (:func:`tokenprune.tiny_models.trained_llava`) is loaded twice, in full precision and
quantized (a ``BitsAndBytesConfig``, e.g. 4-bit nf4). Every method that runs on LLaVA-1.5 prunes the same test
questions at one budget on both; per image, the kept indices of the two runs (``handle.last.images[i].kept``, the
image's own tokens that survived, merged tokens excluded) are compared by their Jaccard index ``|A & B| / |A | B|``
and by the shared share ``|A & B| / |A|`` (A: full precision). Accuracy of both at that budget is reported next to
it, with the same answer rule as :mod:`tokenprune.bench.accuracy`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from tokenprune.api import disable_pruning, enable_pruning
from tokenprune.bench.accuracy import MODEL_OPTIONS, batches, llava_methods, score
from tokenprune.bench.measure import torch_threads
from tokenprune.bench.synthetic.questions import TEST_SEED
from tokenprune.quantization import describe


def image_overlaps(full: list, quantized: list) -> list[tuple[float, float]]:
    """``(jaccard, shared share)`` per image of two runs' records (one record per batch, images in order)."""
    out = []
    for a_rec, b_rec in zip(full, quantized, strict=True):
        for a_img, b_img in zip(a_rec.images, b_rec.images, strict=True):
            a, b = set(a_img.kept.tolist()), set(b_img.kept.tolist())
            union = a | b
            out.append((len(a & b) / len(union) if union else 1.0, len(a & b) / len(a) if a else 1.0))
    return out


def _pruned(model, processor, data, name: str, keep: float) -> tuple[dict[str, Any], list]:
    records: list = []
    handle = enable_pruning(model, name, keep=keep, **MODEL_OPTIONS.get(name, {}))
    try:
        return score(model, processor, data, handle, records=records), records
    finally:
        disable_pruning(model)


def run(quantization_config: Any, n_per_type: int = 8, keep: float = 0.25, methods: list[str] | None = None,
        batch: int = 20, attn_implementation: str = "sdpa", out=sys.stderr, threads: int | None = None
        ) -> dict[str, Any]:
    """Per method: mean Jaccard and shared share of the kept indices (full precision vs quantized) and the accuracy
    of both at ``keep``, on ``n_per_type`` test questions per question type. On ``threads`` CPU threads
    (``None``: as set), the caller's setting restored after."""
    with torch_threads(threads):
        return _run(quantization_config=quantization_config, n_per_type=n_per_type, keep=keep, methods=methods,
                    batch=batch, attn_implementation=attn_implementation, out=out)


def _run(*, quantization_config: Any, n_per_type: int, keep: float, methods: list[str] | None, batch: int,
         attn_implementation: str, out) -> dict[str, Any]:
    from tokenprune.tiny_models import trained_llava

    full, processor = trained_llava(attn_implementation=attn_implementation)
    quantized, _ = trained_llava(attn_implementation=attn_implementation, quantization_config=quantization_config)
    data = batches(n_per_type, batch, processor)
    start = time.time()
    base = {"full": score(full, processor, data), "quantized": score(quantized, processor, data)}
    rows, skipped = [], []
    todo = [(m, s) for m, s in llava_methods() if methods is None or m in methods]
    for i, (name, stage) in enumerate(todo):
        try:
            res_full, rec_full = _pruned(full, processor, data, name, keep)
            res_q, rec_q = _pruned(quantized, processor, data, name, keep)
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            skipped.append({"method": name, "reason": f"{type(err).__name__}: {err}"})
            print(f"[{i + 1}/{len(todo)}] {name}: skipped ({type(err).__name__}: {err})", file=out, flush=True)
            continue
        pairs = image_overlaps(rec_full, rec_q)
        rows.append({
            "method": name, "stage": stage, "keep": keep, "images": len(pairs),
            "jaccard": sum(p[0] for p in pairs) / len(pairs), "shared": sum(p[1] for p in pairs) / len(pairs),
            "accuracy_full": res_full["accuracy"]["overall"], "accuracy_quantized": res_q["accuracy"]["overall"],
        })
        r = rows[-1]
        print(f"[{time.time() - start:6.1f}s] [{i + 1}/{len(todo)}] {name}: jaccard {r['jaccard']:.3f}, accuracy "
              f"{r['accuracy_full']:.3f} -> {r['accuracy_quantized']:.3f}", file=out, flush=True)
    return {
        "model": "tokenprune/assets/synth-llava (LlavaForConditionalGeneration, 256 visual tokens per image)",
        "quantization": describe(quantization_config), "quantization_config": quantization_config.to_dict(),
        "test_seed": TEST_SEED, "questions": base["full"]["n"], "questions_per_type": n_per_type, "keep": keep,
        "answer_rule": "greedy first generated token == single-word reference",
        "unpruned_accuracy_full": base["full"]["accuracy"]["overall"],
        "unpruned_accuracy_quantized": base["quantized"]["accuracy"]["overall"],
        "options": MODEL_OPTIONS, "rows": rows, "skipped": skipped,
        "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, **_versions()},
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def markdown(result: dict[str, Any]) -> str:
    label = result["quantization"]
    lines = [
        f"{result['questions']} test questions ({result['questions_per_type']} per type, seed "
        f"{result['test_seed']}), keep {result['keep']}; unpruned accuracy "
        f"{100 * result['unpruned_accuracy_full']:.1f}% full precision, "
        f"{100 * result['unpruned_accuracy_quantized']:.1f}% {label}.",
        "",
        f"| method | stage | kept-index Jaccard | shared share | accuracy fp32 | accuracy {label} |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['stage']} | {r['jaccard']:.3f} | {r['shared']:.3f} | "
                     f"{100 * r['accuracy_full']:.1f} | {100 * r['accuracy_quantized']:.1f} |")
    if result["skipped"]:
        lines += ["", "Skipped (the error each raised):", ""]
        lines += [f"- {s['method']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"
