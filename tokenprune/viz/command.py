"""``tokenprune visualize IMAGE``: write the overlay of the kept tokens (or a methods x budgets grid) as PNG."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from PIL import Image


def add_parser(sub: argparse._SubParsersAction, parse_keep: Callable[[str], float | int]) -> None:
    """Register the ``visualize`` sub-command (``parse_keep`` validates one budget)."""

    def keeps(text: str) -> list[float | int]:
        return [parse_keep(item) for item in text.split(",") if item.strip()]

    def methods(text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    p = sub.add_parser(
        "visualize", help="draw which visual tokens a method keeps, over the image (PNG)",
        description="Run one pruned prefill on IMAGE and write a PNG with the kept tokens bright and the pruned "
        "ones dimmed. Several methods and/or budgets (comma-separated) give a grid: rows = methods, columns = "
        "budgets. Without --model the project's trained small LLaVA-1.5-architecture model is used (256 tokens per "
        "image, trained on synthetic scenes of coloured shapes; its prompt format is 'USER : <image>\\nwhat color "
        "is the circle ? ASSISTANT :').",
    )
    p.add_argument("image", metavar="IMAGE", help="image file (any format Pillow reads)")
    p.add_argument("--method", type=methods, default=["divprune"], help="method(s), e.g. divprune,fastervlm")
    p.add_argument("--keep", type=keeps, default=[0.11], help="budget(s): ratios or token counts, e.g. 0.25,0.11,64")
    p.add_argument("--model", metavar="PATH", help="checkpoint for from_pretrained (default: built-in small model)")
    p.add_argument("--prompt", help="full prompt with the image placeholder (default: the processor's chat template "
                   "around 'What is in the image?')")
    p.add_argument("-o", "--out", type=Path, help="output PNG (default: ./IMAGE_STEM.tokenprune.png)")
    p.add_argument("--size", type=int, default=336, help="longest side of each overlay in pixels (default 336)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``tokenprune visualize``; prints what was kept and where the PNG went."""
    from tokenprune.methods import make_method
    from tokenprune.viz.compare import compare, load, prune_once
    from tokenprune.viz.overlay import draw_kept

    for name in args.method:
        try:
            make_method(name)
        except (TypeError, ValueError) as err:
            parser.error(str(err))
    if not args.method or not args.keep:
        parser.error("--method and --keep need at least one value each")
    if args.size < 16:
        parser.error("--size must be >= 16 pixels")
    try:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as err:
        parser.error(f"cannot read IMAGE {args.image!r}: {err}")
    out = args.out or Path(f"{Path(args.image).stem}.tokenprune.png")
    model, processor = load(args.model)
    if len(args.method) == 1 and len(args.keep) == 1:
        record = prune_once(model, processor, image, args.prompt, args.method[0], args.keep[0])
        print(record.summary())
        draw_kept(image, record, size=args.size, save=out)
    else:
        compare(model, processor, image, args.prompt, args.method, args.keep, size=args.size, save=out)
    print(f"wrote {out}")
    return 0
