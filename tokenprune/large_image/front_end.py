"""Coarse-to-fine text-guided token pruning of a very large image: the LRS-VQA front-end (Luo et al., "When Large
Vision-Language Model Meets Large Remote Sensing Imagery: Coarse-to-Fine Text-Guided Token Pruning", ICCV 2025,
arXiv 2503.07588; official code VisionXLab/LRS-VQA).

The image is cut into a Dynamic Image Pyramid (:mod:`tokenprune.large_image.pyramid`). The first prompt holds the
global thumbnail and every tile of the base level; the last prompt token's attention at one LLM layer
(:mod:`~tokenprune.large_image.relevance`) scores the base tiles' tokens, the best of them vote for tiles of the next
finer level (:mod:`~tokenprune.large_image.tiles`), and only those tiles are rendered and encoded, level after level,
so most of the image is never encoded. The last level's tiles (with the thumbnail) form one prompt that the model
answers with its visual tokens pruned to ``keep`` by a registered method (default FastV scoring at the same layer:
the last prompt token's attention, top share kept). Every prompt goes through the model's own processor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from tokenprune.api import get_handle
from tokenprune.large_image import families
from tokenprune.large_image.memory import peak_rss_mb, reset_peak_rss
from tokenprune.large_image.prompts import Prompts
from tokenprune.large_image.pyramid import build_pyramid, render_tile
from tokenprune.large_image.relevance import local_relevance
from tokenprune.large_image.tiles import select_child_tiles, token_centres
from tokenprune.methods.base import Deviation

DEFAULT_TEMPLATE = "USER : {images}\n{question} ASSISTANT :"

DEVIATIONS = (
    Deviation(
        "Relevance is the host LLM's own attention (last prompt token, layer `layer`, recomputed from q/k).",
        "The paper's Region Focus Module is a few LLM layers distilled to reproduce exactly that attention; its "
        "weights exist only for the authors' fine-tuned LLaVA checkpoints. Training-free here: the teacher itself.",
    ),
    Deviation(
        "The search descends through every level down to the original resolution.",
        "The paper's description; the official inference code descends once (base level -> the next) and prunes.",
        "descents=1",
    ),
    Deviation(
        "At most `tiles_per_level` (6) tiles are encoded per finer level.",
        "The official option pyramid_next_level_max_select_num defaults to 6, but the inference code overrides it "
        "and encodes every tile that got a vote; a bounded budget keeps memory and time bounded.",
        "tiles_per_level=None",
    ),
    Deviation(
        "Tokens vote for the next-level tile under their centre, mapped through image coordinates; tokens over "
        "padding and LLaVA-NeXT's newline tokens do not vote.",
        "The official code scales token-grid indices by the tile-grid ratio (its row-end newline tokens vote for the "
        "last column); the image-coordinate mapping is exact for padded edge tiles.",
    ),
    Deviation(
        "Each tile is one image of the prompt, through the model's own processor (LLaVA-NeXT: AnyRes crops per "
        "tile; Qwen: positions per image).",
        "The official LLaVA code places the tiles' features in one per-level grid with interpolated position "
        "embeddings, which needs its fine-tuned model; the public checkpoints take separate images.",
    ),
    Deviation(
        "The final prompt is pruned by FastV at layer `layer` + 1: the layers up to `layer` see every token, and the "
        "thumbnail is pruned with the tiles (LLaVA-NeXT: one budget over the prompt's adjacent image placeholders; "
        "Qwen: a budget per image).",
        "The official code keeps the top share of all local tokens at the LLM input and the thumbnail whole; "
        "FastV is the registered method with the same rule (last prompt token's attention, head mean, top share). "
        "`method=` takes any other registered method.",
    ),
)


@dataclass(frozen=True)
class LevelRecord:
    """One pyramid level: its grid and which tiles were encoded (raster order)."""

    index: int
    grid: tuple[int, int]
    encoded: tuple[tuple[int, int], ...]

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class LargeImageAnswer:
    """What :func:`answer_large_image` did. ``tokens_everything``: visual tokens of a prompt with the thumbnail and
    EVERY tile of the finest level; ``visual_tokens``/``kept_tokens``: those of the final prompt before/after the
    pruning; ``tflops``/``tflops_everything``: estimated LLM prefill TFLOPs (MACs, :mod:`tokenprune.budget.flops`)
    of the relevance passes (layers below ``layer``) plus the final pruned prompt / of that every-tile prompt
    unpruned; ``peak_rss_mb``: the process's peak resident memory during the call (Linux; else since start)."""

    text: str
    ids: torch.Tensor                  # [1, prompt + new] as model.generate returned them
    tile: int
    levels: tuple[LevelRecord, ...]
    visual_tokens: int
    kept_tokens: int
    tokens_everything: int
    relevance_passes: int
    tflops: float                      # LLM prefill: the relevance passes + the final (pruned) prompt
    tflops_everything: float           # LLM prefill of the prompt of every tile, unpruned
    seconds: float
    peak_rss_mb: float
    fallback: str | None = None

    @property
    def tiles_encoded(self) -> int:
        return sum(len(level.encoded) for level in self.levels)

    @property
    def tiles_total(self) -> int:
        return sum(level.n_tiles for level in self.levels)

    def summary(self) -> str:
        per_level = ", ".join(f"L{lv.index} {len(lv.encoded)}/{lv.n_tiles}" for lv in self.levels)
        return (f"tiles encoded {self.tiles_encoded}/{self.tiles_total} ({per_level}); visual tokens "
                f"{self.kept_tokens} kept of {self.visual_tokens} encoded ({self.tokens_everything} if every tile "
                f"were encoded); {self.relevance_passes} relevance pass(es); LLM prefill {self.tflops:.3g} TFLOPs "
                f"({self.tflops_everything:.3g} for every tile); {self.seconds:.2f} s, "
                f"peak RSS {self.peak_rss_mb:.0f} MB")


def answer_large_image(
    model: Any,
    processor: Any,
    image: Image.Image,
    question: str,
    *,
    method: Any = "fastv",
    keep: float | int = 0.25,
    layer: int | None = None,
    tile: int | None = None,
    base_tiles: int = 3,
    descend_ratio: float = 0.25,
    tiles_per_level: int | None = 6,
    descents: int | None = None,
    template: str = DEFAULT_TEMPLATE,
    max_new_tokens: int = 32,
    **generate_kwargs: Any,
) -> LargeImageAnswer:
    """Answer ``question`` about ``image`` (a PIL image of any size) on a LLaVA-NeXT or Qwen2(.5)-VL ``model``.

    ``layer``: LLM layer whose attention scores the tokens (default ``n_layers // 4``); ``tile``: tile side in px
    (default from the model's input size, :func:`families.tile_size`); ``base_tiles``: tiles on the long side of the
    first fully encoded level (official: 3); ``descend_ratio``: share of a level's tokens that vote for next-level
    tiles (official ``pruning_ratio`` 0.25); ``tiles_per_level``: tiles encoded per finer level (official option
    ``pyramid_next_level_max_select_num`` = 6; ``None``: every tile that got a vote); ``descents``: levels to
    descend below the base level (``None``: down to the original resolution; the official inference code: 1);
    ``method``/``keep``: the pruning of the final prompt (``None``: no pruning; ``"fastv"`` scores at ``layer``);
    ``template``: the prompt, with ``{images}`` and ``{question}``. An image that fits one tile takes the model's
    plain path (one image). What differs from the official code: :data:`DEVIATIONS`.
    """
    started = time.perf_counter()
    reset_peak_rss()
    families.check_family(model)
    if get_handle(model) is not None:
        raise ValueError(
            "pruning is already enabled on this model; answer_large_image prunes its final prompt itself "
            "(method=, keep=) and scores tiles on unpruned prompts: call disable_pruning(model) first"
        )
    if tiles_per_level is not None and (isinstance(tiles_per_level, bool) or tiles_per_level < 1):
        raise ValueError(
            f"tiles_per_level must be >= 1 tile (or None: every tile the relevance points at); got {tiles_per_level}"
        )
    if not 0 < descend_ratio <= 1:
        raise ValueError(f"descend_ratio (share of a level's tokens that vote) must be in (0, 1]; got {descend_ratio}")
    if descents is not None and (isinstance(descents, bool) or descents < 0):
        raise ValueError(f"descents must be an int >= 0 (or None: down to the original resolution); got {descents}")
    n_layers = len(model.model.language_model.layers)
    layer = n_layers // 4 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers - 1}] for this {n_layers}-layer LLM; got {layer}")
    if method == "fastv" and layer + 1 >= n_layers:
        raise ValueError(
            f"the final pruning (FastV prunes from layer {layer + 1}) needs a layer below the last of this "
            f"{n_layers}-layer LLM; pass layer < {n_layers - 1}, or method=None / another method"
        )
    tile = families.tile_size(model, processor) if tile is None else tile
    image = image.convert("RGB") if image.mode != "RGB" else image
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    run = Prompts(model, processor, question, template)

    if max(image.height, image.width) <= tile:  # fits one tile: the plain path
        answer, n_visual, kept = run.answer([image], method, keep, layer, max_new_tokens, generate_kwargs)
        return LargeImageAnswer(
            run.decode(answer), answer, tile, (), n_visual, kept, n_visual, 0, run.flops / 1e12,
            run.everything_flops(n_visual) / 1e12, time.perf_counter() - started, peak_rss_mb(),
            fallback=f"the image ({image.width}x{image.height}) fits one {tile}-px tile",
        )

    levels = build_pyramid(image.height, image.width, tile, base_tiles)
    levels = levels if descents is None else levels[: 2 + descents]
    thumbnail = render_tile(image, levels[0], 0, 0, fill)
    chosen = levels[1].tiles()  # the base level is encoded whole
    records = [LevelRecord(0, levels[0].grid, ((0, 0),))]
    passes = 0
    for level, finer in zip(levels[1:-1], levels[2:], strict=True):
        records.append(LevelRecord(level.index, level.grid, tuple(chosen)))
        if tiles_per_level is not None and tiles_per_level >= finer.n_tiles:
            chosen = finer.tiles()  # the tile budget covers the whole next level: nothing to score
            continue
        tiles = [render_tile(image, level, r, c, fill) for r, c in chosen]
        inputs = run.inputs([thumbnail, *tiles])
        boxes = families.token_boxes(model, inputs)
        slots = (inputs["input_ids"][0] == families.image_token_id(model)).nonzero().squeeze(1)
        if sum(b.shape[0] for b in boxes) != slots.numel():
            raise RuntimeError(
                f"the prompt has {slots.numel()} image tokens but the {model.config.model_type} token layout of its "
                f"{len(boxes)} images gives {sum(b.shape[0] for b in boxes)}: the processor and the model config "
                "disagree (image_grid_pinpoints, patch or merge size); build both from the same checkpoint"
            )
        local = slots[boxes[0].shape[0]:]
        scores = local_relevance(model, inputs, layer, local)
        run.count_relevance_pass(inputs, layer)
        centres = torch.cat([token_centres(b, level, t) for b, t in zip(boxes[1:], chosen, strict=True)])
        chosen = select_child_tiles(scores, centres, level, finer, descend_ratio, tiles_per_level)
        passes += 1
    finest = levels[-1]
    records.append(LevelRecord(finest.index, finest.grid, tuple(chosen)))
    tiles = [render_tile(image, finest, r, c, fill) for r, c in chosen]
    answer, n_visual, kept = run.answer([thumbnail, *tiles], method, keep, layer, max_new_tokens, generate_kwargs)
    everything = n_visual // (1 + len(chosen)) * (1 + finest.n_tiles)  # every tile is a tile x tile canvas
    return LargeImageAnswer(
        run.decode(answer), answer, tile, tuple(records), n_visual, kept, everything, passes, run.flops / 1e12,
        run.everything_flops(everything) / 1e12, time.perf_counter() - started, peak_rss_mb(),
    )
