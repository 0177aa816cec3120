"""The main job (``make demo`` / ``tokenprune demo``): one question, unpruned vs pruned, on the project's trained
LLaVA-1.5-architecture model (``tokenprune/assets/synth-llava``: 256 visual tokens per image, trained on synthetic
scenes of coloured shapes; see its model card). The answers, the timings and the selection are all real.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from tokenprune.api import disable_pruning, enable_pruning
from tokenprune.bench.synthetic.scenes import synthetic_demo
from tokenprune.budget import Keep
from tokenprune.record import ImageRecord
from tokenprune.tiny_models import trained_llava


@dataclass
class Row:
    label: str
    visual_tokens: int
    sequence_length: int
    prefill_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.prefill_ms)


def time_prefill(model: torch.nn.Module, inputs: dict[str, Any], repeats: int) -> list[float]:
    """Wall time of one prefill (vision tower + selection + LLM, as ``generate`` runs it), after one warm-up."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            if i:  # the first run is the warm-up
                times.append((time.perf_counter() - start) * 1e3)
    return times


def grid_map(image: ImageRecord) -> str:
    """The kept tokens as a text picture of the patch grid: '#' kept, '.' pruned."""
    if image.grid is None:
        return ""
    h, w = image.grid
    mask = image.kept_mask().view(h, w)
    return "\n".join("    " + "".join("#" if v else "." for v in row) for row in mask.tolist())


def run(method: str = "divprune", keep: Keep = 0.11, repeats: int = 5, out=sys.stdout) -> list[Row]:
    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    torch.manual_seed(0)
    say("loading the trained LLaVA-1.5-architecture model (CLIP ViT 224px/14 -> 256 tokens, Llama LM) ...")
    model, processor = trained_llava(attn_implementation="sdpa")
    image, prompt, expected = synthetic_demo()
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    length = inputs["input_ids"].shape[1]

    say(f"timing the unpruned prefill ({repeats} runs + warm-up) ...")
    rows = [Row("unpruned", n_visual, length, time_prefill(model, inputs, repeats))]
    answers = {"unpruned": answer(model, processor, inputs)}

    handle = enable_pruning(model, method=method, keep=keep)
    say(f"timing enable_pruning(model, method={method!r}, keep={keep!r}) ...")
    times = time_prefill(model, inputs, repeats)
    record = handle.last
    rows.append(Row(f"{method} keep={keep}", record.n_kept, record.seq_len_after, times))
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answers[rows[-1].label] = answer(model, processor, inputs)
    transparent = torch.equal(generated[:, :length], inputs["input_ids"])
    disable_pruning(model)

    say("")
    say("question: " + prompt.split("\n", 1)[1].replace(" ASSISTANT :", "") + f"   (reference answer: {expected})")
    for label, text in answers.items():
        say(f"answer {label}: {text}" + ("   (correct)" if text == expected else "   (WRONG)"))
    say("")
    say(format_table(rows))
    say("prefill = vision tower + selection + LLM prefill (the vision tower itself is not pruned); fp32, "
        f"{torch.get_num_threads()} CPU threads")
    say("")
    image = record.images[0]
    kept = image.kept.tolist()
    say(f"kept {image.n_kept} of {image.n} visual tokens; first indices {kept[:8]} ... last {kept[-3:]}")
    say(f"generate(max_new_tokens=8) returned the original {length} prompt ids + "
        f"{generated.shape[1] - length} new tokens: {'yes' if transparent else 'NO'}")
    h, w = image.grid or (0, 0)
    say(f"kept patches on the {h}x{w} grid ('#' kept; the red circle asked about is at the top right):")
    say(grid_map(image))
    return rows


def answer(model: torch.nn.Module, processor: Any, inputs: dict[str, Any]) -> str:
    """The model's greedy answer (up to ``</s>``)."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def format_table(rows: list[Row]) -> str:
    base = rows[0].median_ms
    header = ("", "visual tokens", "sequence length", "prefill ms (median)", "min-max ms", "speed-up")
    lines = [header]
    for r in rows:
        lines.append((
            r.label, str(r.visual_tokens), str(r.sequence_length), f"{r.median_ms:.1f}",
            f"{min(r.prefill_ms):.1f}-{max(r.prefill_ms):.1f}", f"{base / r.median_ms:.2f}x",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    text = [fmt.format(*line) for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)
