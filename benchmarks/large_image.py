"""The LRS-VQA large-image front-end vs encoding every tile, on procedural pictures (tokenprune.large_image).

Per family (tiny random models with the real tile geometry: LLaVA-NeXT 336-px tiles, Qwen2.5-VL 448-px tiles) and
image size: tiles encoded of the pyramid's total, visual tokens of the final prompt (before / after the FastV
pruning at ``--keep``), the tokens of a prompt with every tile of the finest level, wall time and the process's
peak RSS during the call. "Everything" renders every finest tile and either answers that one prompt (when it has
at most ``--llm-limit`` visual tokens) or, beyond, only runs the vision tower over the tiles in chunks (its LLM
prompt is counted, not run: on an 8,000 px picture it is tens of thousands of tokens).

    python benchmarks/large_image.py            # -> results/large_image.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tokenprune import pruning
from tokenprune.large_image import answer_large_image, build_pyramid, render_tile
from tokenprune.large_image.families import placeholder
from tokenprune.large_image.front_end import DEFAULT_TEMPLATE
from tokenprune.large_image.memory import peak_rss_mb, reset_peak_rss
from tokenprune.methods.fastv import FastV
from tokenprune.tiny_models import large_image, tiny_llava_next, tiny_qwen

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "what is in the image ?"
LAYER = 1


def families() -> list[tuple[str, object, object, int]]:
    """``(name, model, processor, tile)``: tiny models, tiles of the released checkpoints' input size."""
    next_model, next_processor = tiny_llava_next(text_layers=4)
    qwen_model, qwen_processor = tiny_qwen("2.5", text_layers=4, max_pixels=448 * 448)
    return [("LLaVA-NeXT", next_model, next_processor, 336), ("Qwen2.5-VL", qwen_model, qwen_processor, 448)]


@torch.inference_mode()
def everything(model, processor, image, tile: int, keep: float, llm_limit: int, chunk: int = 16) -> dict:
    """Every tile of the finest level (and the thumbnail): answered as one prompt, or tower-only beyond the limit."""
    levels = build_pyramid(image.height, image.width, tile)
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    tiles = [(levels[0], 0, 0)] + [(levels[-1], r, c) for r, c in levels[-1].tiles()]
    mark, image_id = placeholder(model), model.config.image_token_id

    def prompt(part: list) -> dict:
        images = [render_tile(image, lv, r, c, fill) for lv, r, c in part]
        return processor(text=DEFAULT_TEMPLATE.format(images=mark * len(images), question=QUESTION), images=images,
                          return_tensors="pt")

    tokens = int((prompt(tiles[:1])["input_ids"] == image_id).sum()) * len(tiles)  # every tile: a tile x tile canvas
    reset_peak_rss()
    start = time.perf_counter()
    answered = tokens <= llm_limit
    if answered:
        with pruning(model, FastV(k=LAYER + 1), keep=keep):
            model.generate(**prompt(tiles), max_new_tokens=1, do_sample=False)
    else:  # the vision side only, chunk by chunk: the one prompt would not fit this machine
        for i in range(0, len(tiles), chunk):
            inputs = prompt(tiles[i:i + chunk])
            extra = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
            model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra)
    return {"tiles": len(tiles), "visual_tokens": tokens, "answered": answered,
            "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--llm-limit", type=int, default=8000, help="largest 'everything' prompt actually answered")
    parser.add_argument("--out", type=Path, default=RESULTS / "large_image")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, model, processor, tile in families():
        for size in args.sizes:
            image = large_image(size)
            answer = answer_large_image(model, processor, image, QUESTION, tile=tile, layer=LAYER, keep=args.keep,
                                        max_new_tokens=1)
            full = everything(model, processor, image, tile, args.keep, args.llm_limit)
            row = {
                "family": name, "image_px": size, "tile_px": tile,
                "levels": [[lv.index, list(lv.grid), len(lv.encoded)] for lv in answer.levels],
                "tiles_encoded": answer.tiles_encoded, "tiles_total": answer.tiles_total,
                "visual_tokens": answer.visual_tokens, "kept_tokens": answer.kept_tokens,
                "relevance_passes": answer.relevance_passes, "tflops": answer.tflops,
                "tflops_everything": answer.tflops_everything, "seconds": round(answer.seconds, 2),
                "peak_rss_mb": round(answer.peak_rss_mb), "everything": full,
            }
            rows.append(row)
            print(f"{name:11s} {size:5d} px: {answer.summary()} | everything: {full}", flush=True)
            del image
    args.out.with_suffix(".json").write_text(json.dumps({"keep": args.keep, "layer": LAYER, "rows": rows}, indent=1))
    lines = [
        f"# Large-image front-end vs every tile (tiny random models, FastV keep={args.keep} at layer {LAYER + 1}, "
        "1 thread, shared 2-core CPU)", "",
        "| family | image | tiles encoded / pyramid | visual tokens (kept / encoded) | every finest tile: tokens |"
        " LLM prefill TFLOPs front-end / everything | time front-end | time everything |"
        " peak RSS front-end / everything |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        full = r["everything"]
        every_time = f"{full['seconds']} s" if full["answered"] else f"tower only: {full['seconds']} s"
        lines.append(
            f"| {r['family']} | {r['image_px']} px | {r['tiles_encoded']} / {r['tiles_total']} | "
            f"{r['kept_tokens']} / {r['visual_tokens']} | {full['visual_tokens']} | "
            f"{r['tflops']:.3g} / {r['tflops_everything']:.3g} | {r['seconds']} s | {every_time} | "
            f"{r['peak_rss_mb']} / {full['peak_rss_mb']} MB |"
        )
    lines += [
        "", "TFLOPs: estimated LLM prefill multiply-accumulates of the tiny LLM (relevance passes up to the scoring",
        "layer + the final FastV-pruned prompt, vs the unpruned prompt of every tile).",
        "Tiles encoded count the thumbnail once (it is re-encoded in every relevance pass). 'tower only': the",
        "one prompt of every tile is beyond this machine; only its vision side ran. Peak RSS is the process's",
        "high-water mark during the call: the Python/torch/transformers baseline and the models (~400 MB) and the",
        "picture itself (uint8, 12 MB at 2,000 px, 192 MB at 8,000 px) included.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
