"""What the InternVL3 test files share (tests/test_internvl.py: the vision stage; tests/test_internvl_decoder.py: the
decoder stage, the real depth and the pruned cache): the prompts, the tile arithmetic, what declines and the
two-row batch."""

from tokenprune.tiny_internvl import TOKENS_PER_TILE
from tokenprune.tiny_models import random_image

IMG = "<IMG_CONTEXT>"
PROMPT = f"USER : {IMG}\nwhat is in the image ? ASSISTANT :"
OTHER = f"USER : {IMG}\n{IMG}\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"
GEN = dict(max_new_tokens=4, do_sample=False)
T = TOKENS_PER_TILE  # 16 tokens per 64-px tile (4 x 4 after the 2 x 2 pixel shuffle)
WIDE = (64, 128)  # 2 x 1 grid tiles + the thumbnail = 3 tiles, 48 tokens

# What declines on InternVL3, and what the error must say. Explicit on purpose: a method that starts or stops
# declining fails here until this table (and docs/internvl.md) says so.
DECLINES = {
    "visionzip": "no place in the LLM's input.*keep_cls=False",
    "visiondrop": "no place in the LLM's input.*keep_cls=False",
    "visiondropfull": "no place in the LLM's input",
    "flowcut": "layer loop",
    "holitom": "frames of a video.*'divprune'", "holitomouter": "frames of a video.*'divprune'",
}


def two_rows(processor):
    """``(prompts, images per row, processor output)``: two rows, left padded: one wide image (3 tiles); two images
    (1 tile, then 3 x 1 tiles + thumbnail = 4)."""
    images = [random_image(*WIDE, seed=1), random_image(64, 64, seed=2), random_image(192, 64, seed=3)]
    return [PROMPT, OTHER], [[images[0]], images[1:]], processor(text=[PROMPT, OTHER], images=images)
