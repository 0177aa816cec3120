"""See what was kept: overlays of the kept visual tokens on the picture, and method x budget comparison grids.

    from tokenprune.viz import draw_kept, compare
    draw_kept(image, handle.last, save="kept.png")             # the last pruned prefill, over its image
    compare(model, processor, image, methods=["divprune", "fastervlm"], keeps=[0.25, 0.11])
"""

from tokenprune.viz.compare import compare, default_prompt, load, prune_once, runnable_methods
from tokenprune.viz.overlay import GAP, HEADER, LEGEND, PALETTE, draw_kept, image_record, tile

__all__ = [
    "GAP", "HEADER", "LEGEND", "PALETTE", "compare", "default_prompt", "draw_kept", "image_record", "load",
    "prune_once", "runnable_methods", "tile",
]
