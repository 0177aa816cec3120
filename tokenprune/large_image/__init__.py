"""Very large images: the coarse-to-fine text-guided front-end of LRS-VQA (Luo et al., ICCV 2025)."""

from tokenprune.large_image.front_end import LargeImageAnswer, LevelRecord, answer_large_image
from tokenprune.large_image.pyramid import Level, build_pyramid, render_tile
from tokenprune.large_image.tiles import select_child_tiles

__all__ = ["LargeImageAnswer", "Level", "LevelRecord", "answer_large_image", "build_pyramid", "render_tile",
           "select_child_tiles"]
