"""Accuracy retention (``tokenprune bench-accuracy``): every method at several budgets on the shipped trained model.

The model is ``tokenprune/assets/synth-llava`` (a LLaVA-1.5-architecture VLM trained on the synthetic VQA task of
:mod:`tokenprune.bench.synthetic`). Every registered method that can run on LLaVA-1.5 (vision stage and decoder
stage) is applied at each budget to the same test questions (same seed, same order, same batches); a method that
raises is reported as skipped with its error, not hidden. The answer is the greedy first generated token
(``generate(max_new_tokens=1, do_sample=False)``), compared with the single-word reference answer. FLOPs are the
LLM prefill estimate (:func:`tokenprune.budget.flops.prefill_flops`, "exact" formula, multiply-accumulates) of the
tokens each decoder layer processed in each pruned prefill (``handle.last.tokens_per_layer``, averaged over the rows
of the batch), per question; the same computation for every method, vision or decoder stage.
The benchmark reports; it does not tune anything per method: every method runs with its defaults.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from tokenprune.api import disable_pruning, enable_pruning
from tokenprune.bench.measure import torch_threads
from tokenprune.bench.synthetic.questions import PROMPT, QUESTION_TYPES, TEST_SEED, eval_split
from tokenprune.bench.synthetic.scenes import render

KEEPS = (0.5, 0.25, 0.11, 0.05)
# Options that translate a paper default given for a 24-layer CLIP tower / 28-32-layer LLM to this model's 4-layer
# tower and 4-layer LLM, where the default layers do not exist (enabling with them fails). Decided before any
# result, the same for every budget, written into the output (``options``): HiPrune's object layer 8 (layer 9 of
# 24, i.e. 3/8 of the depth) -> block 1 (the 2nd of 4); TransPrune's boundaries 7/9/12 -> the three prunable layers
# (1, 2, 3) in order; the others are their official layers scaled by 4/32 (VFlowOpt: 4/28), kept increasing:
# FEATHER 8/16 -> (1, 2), SparseVLM 2/6/15 and AdaptInfer 1/10/20 -> (0, 1, 2), VFlowOpt 9/18 -> (1, 3), ToDRE's
# 7L/8 = 3 (the last layer: nothing would run after it) -> 2. PDrop and VisionDrop split the LLM into four equal
# stages (their papers' rule) and run with their defaults, as every other method.
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "hiprune": {"object_layer": 1}, "transprune": {"layers": (1, 2, 3)}, "feather": {"layers": (1, 2)},
    "sparsevlm": {"layers": (0, 1, 2)}, "adaptinfer": {"layers": (0, 1, 2)}, "vflowopt": {"layers": (1, 3)},
    "todre": {"layer": 2}, "catp": {"layer": 1},
}


def llava_methods() -> list[tuple[str, str]]:
    """``(name, stage)`` of every registered method that runs on LLaVA-1.5: vision stage (FlowCut's in-encoder
    stage where the adapter runs the encoder loop), decoder stage and two-stage (ToDRE, VFlowOpt, ...)."""
    from tokenprune.methods import METHODS
    from tokenprune.patches import ADAPTERS

    loop = ADAPTERS["llava"].encoder_loop
    out = []
    for name, cls in sorted(METHODS.items()):
        if cls.video_only:  # HoliTom: videos only, no LLaVA-1.5
            continue
        if cls.stage in ("decoder", "vision", "two-stage") or (cls.stage == "vision-encoder" and loop):
            out.append((name, cls.stage))
    return out


def batches(n_per_type: int, batch: int, processor, seed: int = TEST_SEED):
    """The test questions as processor batches (built once, shared by every setting) and their (type, answer)."""
    items = eval_split(n_per_type, seed=seed)
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start: start + batch]
        inputs = processor(images=[render(s) for s, _ in chunk],
                           text=[PROMPT.format(question=q.question) for _, q in chunk], return_tensors="pt",
                           padding=True)
        out.append((inputs, [(q.qtype, q.answer) for _, q in chunk]))
    return out


@torch.inference_mode()
def score(model, processor, data, handle=None, records: list | None = None) -> dict[str, Any]:
    """Accuracy per type and overall, and the mean LLM prefill TFLOPs per question (pruned, unpruned); with
    ``records``, each batch's pruning record (``handle.last``) is appended to it."""
    from tokenprune.budget.flops import ModelShape, prefill_flops

    tok = processor.tokenizer
    shape = ModelShape.from_config(model.config)
    correct: dict[str, list[int]] = defaultdict(list)
    tflops = [0.0, 0.0]
    for inputs, refs in data:
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        if records is not None:
            records.append(handle.last if handle is not None else None)
        words = tok.convert_ids_to_tokens(out[:, -1].tolist())
        for (qtype, answer), word in zip(refs, words, strict=True):
            correct[qtype].append(int(word == answer))
        rows = len(refs)
        if handle is not None and handle.last is not None and handle.last.tokens_per_layer is not None:
            per_row = [t / rows for t in handle.last.tokens_per_layer]  # padding excluded, summed over rows
            tflops[0] += rows * prefill_flops(shape, per_row) / 1e12
            unpadded = float(inputs["attention_mask"].sum()) / rows
            tflops[1] += rows * prefill_flops(shape, [unpadded] * shape.num_layers) / 1e12
    n = sum(len(v) for v in correct.values())
    acc = {t: sum(correct[t]) / len(correct[t]) for t in QUESTION_TYPES if correct[t]}
    acc["overall"] = sum(sum(v) for v in correct.values()) / n
    return {"accuracy": acc, "tflops_pruned": tflops[0] / n if handle else None,
            "tflops_unpruned": tflops[1] / n if handle else None, "n": n}


def run(n_per_type: int = 20, keeps=KEEPS, methods: list[str] | None = None, batch: int = 20,
        attn_implementation: str = "sdpa", out=sys.stderr, threads: int | None = None,
        quantization_config: Any = None) -> dict[str, Any]:
    """Accuracy of every LLaVA-1.5 method at each of ``keeps`` on ``n_per_type`` test questions per type of the
    bundled trained model, next to the unpruned model's; on ``threads`` CPU threads (``None``: as set), the caller's
    setting restored after."""
    with torch_threads(threads):
        return _run(n_per_type=n_per_type, keeps=keeps, methods=methods, batch=batch,
                    attn_implementation=attn_implementation, out=out, quantization_config=quantization_config)


def _run(*, n_per_type: int, keeps, methods: list[str] | None, batch: int, attn_implementation: str, out,
         quantization_config: Any) -> dict[str, Any]:
    from tokenprune.quantization import describe
    from tokenprune.tiny_models import trained_llava

    model, processor = trained_llava(attn_implementation=attn_implementation, quantization_config=quantization_config)
    data = batches(n_per_type, batch, processor)
    start = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - start:6.1f}s] {msg}", file=out, flush=True)

    base = score(model, processor, data)
    base_acc = base["accuracy"]["overall"]
    say(f"unpruned: accuracy {base_acc:.3f} on {base['n']} questions")
    todo = [(m, s) for m, s in llava_methods() if methods is None or m in methods]
    rows, skipped = [], []
    unpruned_tflops = None
    for i, (name, stage) in enumerate(todo):
        for keep in keeps:
            try:
                handle = enable_pruning(model, name, keep=keep, **MODEL_OPTIONS.get(name, {}))
            except Exception as err:  # noqa: BLE001 - reported, not hidden
                skipped.append({"method": name, "keep": keep, "reason": f"{type(err).__name__}: {err}"})
                say(f"[{i + 1}/{len(todo)}] {name} keep={keep}: skipped ({type(err).__name__}: {err})")
                continue
            try:
                res = score(model, processor, data, handle)
            except Exception as err:  # noqa: BLE001
                skipped.append({"method": name, "keep": keep, "reason": f"{type(err).__name__}: {err}"})
                say(f"[{i + 1}/{len(todo)}] {name} keep={keep}: skipped ({type(err).__name__}: {err})")
                continue
            finally:
                disable_pruning(model)
            unpruned_tflops = res["tflops_unpruned"] or unpruned_tflops
            acc = res["accuracy"]
            rows.append({
                "method": name, "stage": stage, "keep": keep, "accuracy": acc["overall"],
                "retention": acc["overall"] / base_acc if base_acc else None,
                "per_type": {t: acc[t] for t in QUESTION_TYPES if t in acc},
                "tflops": res["tflops_pruned"], "flops_ratio": (res["tflops_pruned"] / res["tflops_unpruned"])
                if res["tflops_unpruned"] else None,
            })
            say(f"[{i + 1}/{len(todo)}] {name} keep={keep}: accuracy {acc['overall']:.3f} "
                f"({100 * rows[-1]['retention']:.0f}% of unpruned), LLM prefill FLOPs x{rows[-1]['flops_ratio']:.2f}")
    return {
        "model": "tokenprune/assets/synth-llava (LlavaForConditionalGeneration, 256 visual tokens per image)",
        "quantization": describe(quantization_config),
        "test_seed": TEST_SEED, "questions": base["n"], "questions_per_type": n_per_type,
        "answer_rule": "greedy first generated token == single-word reference",
        "unpruned_accuracy": base_acc, "unpruned_per_type": {t: base["accuracy"][t] for t in QUESTION_TYPES},
        "unpruned_tflops": unpruned_tflops, "keeps": list(keeps), "options": MODEL_OPTIONS, "rows": rows,
        "skipped": skipped,
        "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(),
    }


def markdown(result: dict[str, Any]) -> str:
    types = list(QUESTION_TYPES)
    lines = [
        f"Unpruned accuracy {100 * result['unpruned_accuracy']:.1f}% on {result['questions']} test questions "
        f"({result['questions_per_type']} per type, seed {result['test_seed']}); LLM prefill "
        f"{1e3 * (result['unpruned_tflops'] or 0):.3f} GFLOPs (MACs) per question unpruned.",
        "",
        "Layers set explicitly for this model's 4-layer tower and LLM, where the paper's default layers do not exist "
        "(every other option is the method's default): " + "; ".join(
            f"{name} " + ", ".join(f"{k}={v}" for k, v in opts.items())
            for name, opts in sorted(result.get("options", {}).items())) + ".",
        "",
        "| method | stage | keep | accuracy | % of unpruned | FLOPs ratio | " + " | ".join(types) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(types),
        "| unpruned | - | 1.0 | " + f"{100 * result['unpruned_accuracy']:.1f} | 100 | 1.00 | "
        + " | ".join(f"{100 * result['unpruned_per_type'][t]:.0f}" for t in types) + " |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['stage']} | {r['keep']} | {100 * r['accuracy']:.1f} | {100 * r['retention']:.0f} | "
            f"{r['flops_ratio']:.2f} | " + " | ".join(f"{100 * r['per_type'][t]:.0f}" for t in types) + " |")
    if result["skipped"]:
        lines += ["", "Skipped (the error each raised):", ""]
        lines += [f"- {s['method']} keep={s['keep']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    by_method: dict[str, list] = defaultdict(list)
    for r in result["rows"]:
        by_method[r["method"]].append((r["keep"], 100 * r["retention"]))
    styles = ["-", "--", "-.", ":"]
    for i, (name, pts) in enumerate(sorted(by_method.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[i // 10 % 4], marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(list(result["keeps"]))
    ax.set_xticklabels([f"{k:g}" for k in result["keeps"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("keep (share of the 256 visual tokens)")
    ax.set_ylabel("% of unpruned accuracy")
    ax.axhline(100, color="grey", lw=0.5)
    ax.set_title(f"Accuracy retention on the synthetic VQA test split (unpruned "
                 f"{100 * result['unpruned_accuracy']:.1f}%)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any], out_dir: Path, stem: str = "accuracy_retention") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    plot(result, paths[2])
    return paths
