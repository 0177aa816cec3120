"""The image-only ``process_vision_info`` equals qwen_vl_utils' own on the same messages.

qwen_vl_utils cannot be imported here (it imports torchvision at module top for its video readers), so the
reference runs in a subprocess with an empty stand-in ``torchvision`` module: its image path never touches it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tokenprune.integrations.qwen_images import process_vision_info
from tokenprune.tiny_models import demo_image, random_image

CASES = [  # (height, width, min_pixels, max_pixels)
    (64, 64, 3136, 12544), (40, 90, 3136, 12544), (300, 200, 3136, 50176), (20, 30, 3136, 602112),
    (1000, 700, 256 * 28 * 28, 1605632), (57, 211, 784, 4 * 784),
]

REFERENCE = r"""
import json, sys, types
tv = types.ModuleType("torchvision"); tv.__version__ = "0.0"
tv.io = types.ModuleType("torchvision.io"); tv.transforms = types.ModuleType("torchvision.transforms")
tv.transforms.InterpolationMode = type("InterpolationMode", (), {"BICUBIC": 3})
sys.modules.update({"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms})
import numpy as np
from qwen_vl_utils.vision_process import process_vision_info
from tokenprune.tiny_models import random_image, demo_image
cases = json.loads(sys.argv[1])
messages = [[{"role": "user", "content": [
    {"type": "image", "image": demo_image(h) if i == 0 else random_image(h, w, seed=i), "min_pixels": lo,
     "max_pixels": hi}, {"type": "text", "text": "what ?"}]}] for i, (h, w, lo, hi) in enumerate(cases)]
images, videos = process_vision_info(messages)
sums = [int(np.asarray(im, dtype=np.int64).sum()) for im in images]
print(json.dumps({"sizes": [im.size for im in images], "sums": sums, "videos": videos}))
"""


def test_image_only_vision_info_matches_qwen_vl_utils():
    proc = subprocess.run([sys.executable, "-c", REFERENCE, json.dumps(CASES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads(proc.stdout.strip().splitlines()[-1])
    messages = [[{"role": "user", "content": [
        {"type": "image", "image": demo_image(h) if i == 0 else random_image(h, w, seed=i), "min_pixels": lo,
         "max_pixels": hi}, {"type": "text", "text": "what ?"}]}] for i, (h, w, lo, hi) in enumerate(CASES)]
    images, videos = process_vision_info(messages)
    assert videos is None and reference["videos"] is None
    assert [list(im.size) for im in images] == reference["sizes"]
    assert [int(np.asarray(im, dtype=np.int64).sum()) for im in images] == reference["sums"]
    assert len({tuple(s) for s in reference["sizes"]}) >= 5  # the cases exercise different resizes (up, down, none)
