"""Train the shipped synthetic-VQA LLaVA-1.5 model (``tokenprune/assets/synth-llava``) on this CPU.

    python -m tokenprune.bench.synthetic.train --out tokenprune/assets/synth-llava

Architecture: ``LlavaForConditionalGeneration`` = CLIP ViT (224 px / patch 14 -> 256 patch tokens + [CLS]),
LLaVA-1.5's 2-layer GELU projector on the penultimate ViT layer (``vision_feature_layer=-2``, "default" strategy:
[CLS] dropped), a Llama LM, a word-level tokenizer.

Recipe (two stages, like LLaVA's but from scratch):

1. vision pre-training: the ViT alone, with two heads that are thrown away afterwards. The [CLS] token (pooled
   output of the last layer) predicts which colours, shapes and colour-shape pairs the scene contains and how many
   objects (multi-label BCE + count CE), so [CLS] must attend to the objects; every patch token of the penultimate
   layer (what LLaVA feeds the LM) predicts the colour of the object covering it (or background), the shape and
   size of that object (on object patches only: an all-patch loss is met by predicting "background" and left the
   visual tokens without shape information) and its own row and column (visual tokens that know where they are;
   CLIP's learned position embeddings start from 2-D sin-cos values, as in MAE).
2. VQA: the ViT frozen (as in LLaVA-1.5), the projector and the LM trained on multi-turn conversations about one
   scene each ("USER : <image>\\nq1 ASSISTANT : a1 </s>USER : q2 ASSISTANT : a2 </s>..."), loss on answer tokens
   (and their ``</s>``) only.

Seeds are fixed; the scenes come from ``TRAIN_SEED`` (the test split uses another seed stream).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenprune.bench.synthetic.questions import (
    NUMBERS,
    PROMPT,
    TEST_SEED,
    TRAIN_SEED,
    eval_split,
    training_example,
    vocabulary,
)
from tokenprune.bench.synthetic.scenes import (
    COLORS,
    GRID,
    IMAGE_SIZE,
    MAX_OBJECTS,
    PATCH,
    SHAPES,
    SIZES,
    patch_labels,
    render,
)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
ARCH = {
    "vision_hidden": 128, "vision_layers": 4, "vision_heads": 4,
    "text_hidden": 256, "text_layers": 4, "text_heads": 8, "text_intermediate": 512,
}


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + vocabulary() + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")


def build(arch: dict = ARCH, seed: int = 0):
    """``(model, processor)`` with random weights."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = make_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=arch["vision_hidden"], intermediate_size=4 * arch["vision_hidden"],
        num_hidden_layers=arch["vision_layers"], num_attention_heads=arch["vision_heads"], image_size=IMAGE_SIZE,
        patch_size=PATCH, projection_dim=arch["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=arch["text_hidden"], intermediate_size=arch["text_intermediate"],
        num_hidden_layers=arch["text_layers"], num_attention_heads=arch["text_heads"],
        num_key_value_heads=arch["text_heads"], max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=GRID * GRID, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # 2-D sin-cos start for CLIP's learned position embeddings (still trained), as in MAE
        model.model.vision_tower.embeddings.position_embedding.weight.copy_(
            sincos_2d(arch["vision_hidden"], GRID))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """``(1 + grid*grid, dim)``: 2-D sine-cosine position embeddings (half the channels encode the row, half the
    column; MAE's ``get_2d_sincos_pos_embed`` convention) with a zero row for [CLS]. Randomly initialised CLIP
    position embeddings (std 0.02) are drowned by the patch content: after the vision pre-training the visual
    tokens still did not tell where they are (row / column linear probes near chance), which the position,
    relative and top questions need."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def enc(pos):
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], 1)

    table = torch.cat([enc(rows), enc(cols)], 1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], 0).float()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------- stage 1: the vision tower
COMBOS = [f"{c} {s}" for c in COLORS for s in SHAPES]


def vision_targets(scene):
    multi = np.zeros(len(COLORS) + len(SHAPES) + len(COMBOS), np.float32)
    for o in scene.objects:
        multi[list(COLORS).index(o.color)] = 1
        multi[len(COLORS) + SHAPES.index(o.shape)] = 1
        multi[len(COLORS) + len(SHAPES) + COMBOS.index(o.name)] = 1
    owner = patch_labels(scene)
    color = np.zeros_like(owner)
    shape = np.zeros_like(owner)
    size = np.zeros_like(owner)
    for i, o in enumerate(scene.objects):
        m = owner == i + 1
        color[m] = 1 + list(COLORS).index(o.color)
        shape[m] = 1 + SHAPES.index(o.shape)
        size[m] = 1 + SIZES.index(o.size)
    return multi, len(scene.objects), color, shape, size


class VisionHeads(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.multi = torch.nn.Linear(hidden, len(COLORS) + len(SHAPES) + len(COMBOS))
        self.count = torch.nn.Linear(hidden, len(NUMBERS))
        self.dense = torch.nn.Sequential(torch.nn.LayerNorm(hidden),
                                         torch.nn.Linear(hidden, (len(COLORS) + 1) + (len(SHAPES) + 1) + 3
                                                         + 2 * GRID))


def dense_losses(dense: torch.Tensor, color, shape, size) -> dict:
    """Per-patch losses of the penultimate ViT layer: colour (background = class 0) on every patch; shape and size on
    the patches an object covers only (most patches are background, so an all-patch loss is met by predicting
    "background" and never teaches shape); the patch's own row and column (so the visual tokens carry where they
    are, which position / relative / top questions need)."""
    nc, ns = len(COLORS) + 1, len(SHAPES) + 1
    obj = color.flatten() > 0
    flat = dense.flatten(0, 1)
    pos = torch.arange(GRID * GRID).repeat(dense.shape[0])
    return {
        "color": F.cross_entropy(flat[:, :nc], color.flatten()),
        "shape": F.cross_entropy(flat[obj, nc:nc + ns], shape.flatten()[obj]),
        "size": F.cross_entropy(flat[obj, nc + ns:nc + ns + 3], size.flatten()[obj]),
        "row": F.cross_entropy(flat[:, nc + ns + 3:nc + ns + 3 + GRID], pos // GRID),
        "col": F.cross_entropy(flat[:, nc + ns + 3 + GRID:], pos % GRID),
    }


@torch.no_grad()
def probe_vision(tower, heads, processor, n: int = 64) -> dict:
    """Held-out check of stage 1: per-patch accuracy of the dense head (colour on all patches; shape, size on object
    patches; row, column) and of the [CLS] multi-label head (every label right)."""
    scenes = [training_example(TRAIN_SEED + 2, i, max_turns=0)[0] for i in range(n)]
    pixels = processor.image_processor(images=[render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    targets = [vision_targets(s) for s in scenes]
    color, shape, size = (torch.tensor(np.stack([t[k] for t in targets])) for k in (2, 3, 4))
    out = tower(pixel_values=pixels, output_hidden_states=True)
    dense = heads.dense(out.hidden_states[-2][:, 1:]).flatten(0, 1)
    multi = torch.tensor(np.stack([t[0] for t in targets]))
    nc, ns = len(COLORS) + 1, len(SHAPES) + 1
    obj = color.flatten() > 0
    pos = torch.arange(GRID * GRID).repeat(n)
    return {
        "color": (dense[:, :nc].argmax(-1) == color.flatten()).float().mean().item(),
        "shape(obj)": (dense[obj, nc:nc + ns].argmax(-1) == shape.flatten()[obj]).float().mean().item(),
        "size(obj)": (dense[obj, nc + ns:nc + ns + 3].argmax(-1) == size.flatten()[obj]).float().mean().item(),
        "row": (dense[:, nc + ns + 3:nc + ns + 3 + GRID].argmax(-1) == pos // GRID).float().mean().item(),
        "col": (dense[:, nc + ns + 3 + GRID:].argmax(-1) == pos % GRID).float().mean().item(),
        "cls_multi": ((heads.multi(out.pooler_output) > 0).float() == multi).all(-1).float().mean().item(),
    }


def train_vision(model, processor, steps: int, batch: int, lr: float, log) -> dict:
    tower = model.model.vision_tower
    heads = VisionHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    tower.train()
    index = 10_000_000  # stage 1 scenes: their own range of the training seed stream
    for step in range(steps):
        scenes = [training_example(TRAIN_SEED, index + i, max_turns=0)[0] for i in range(batch)]
        index += batch
        pixels = processor.image_processor(images=[render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        targets = [vision_targets(s) for s in scenes]
        multi = torch.tensor(np.stack([t[0] for t in targets]))
        count = torch.tensor([t[1] for t in targets])
        color, shape, size = (torch.tensor(np.stack([t[k] for t in targets])) for k in (2, 3, 4))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tower(pixel_values=pixels, output_hidden_states=True)
            pooled = out.pooler_output.float()
            dense = heads.dense(out.hidden_states[-2][:, 1:]).float()
            pooled_multi, pooled_count = heads.multi(pooled).float(), heads.count(pooled).float()
        loss_cls = F.binary_cross_entropy_with_logits(pooled_multi, multi) * 4 + F.cross_entropy(pooled_count, count)
        loss_dense = sum(dense_losses(dense, color, shape, size).values())
        loss = loss_cls + loss_dense
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 10))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            log(f"vision {step:4d}/{steps} loss cls {loss_cls.item():.3f} dense {loss_dense.item():.3f}")
    tower.eval()
    probe = probe_vision(tower, heads, processor)
    log("  vision probe (held-out scenes): " + " ".join(f"{k} {v:.3f}" for k, v in probe.items()))
    return probe


# ---------------------------------------------------------------- stage 2: VQA
def conversation(tok, turns, image_token: int, n_image: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a multi-turn conversation; labels = -100 except on answers and their ``</s>``."""
    ids: list[int] = []
    labels: list[int] = []
    for i, qa in enumerate(turns):
        if i == 0:
            head, tail = PROMPT.split("<image>")
            prompt = (tok(head)["input_ids"] + [image_token] * n_image + tok(tail.format(question=qa.question))
                      ["input_ids"])
        else:
            prompt = tok(f"USER : {qa.question} ASSISTANT :")["input_ids"]
        answer = tok(qa.answer)["input_ids"] + [tok.eos_token_id]
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    return ids, labels


def curriculum(progress: float) -> int:
    """Most objects per training scene at this point of the VQA stage: 1 for the first 15% of the steps (the
    projector and LM learn to read attributes off the visual tokens while there is nothing to choose between), then
    up to 2, 3 and finally all 4 (from 45% on)."""
    return 1 if progress < 0.15 else 2 if progress < 0.3 else 3 if progress < 0.45 else MAX_OBJECTS


def train_vqa(model, processor, steps: int, batch: int, lr: float, max_turns: int, log, eval_every: int = 0,
              vision_lr: float | None = None, first_index: int = 0, stage: str = "vqa"):
    """VQA training of the projector and the LM; the ViT frozen (``vision_lr=None``, with the object-count
    curriculum) or trained too at ``vision_lr`` (stage 3, scenes of up to 4 objects throughout)."""
    tok = processor.tokenizer
    image_token = model.config.image_token_id
    tower = model.model.vision_tower
    tower.requires_grad_(vision_lr is not None)
    model.model.multi_modal_projector.requires_grad_(True)
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n],
               "lr": lr, "peak": lr}]
    if vision_lr is not None:
        groups.append({"params": list(tower.parameters()), "lr": vision_lr, "peak": vision_lr})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    model.train()
    if vision_lr is None:
        tower.eval()
    index = first_index
    for step in range(steps):
        objects = curriculum(step / steps) if vision_lr is None else MAX_OBJECTS
        examples = [training_example(TRAIN_SEED, index + i, max_turns=max_turns, max_objects=objects)
                    for i in range(batch)]
        index += batch
        pixels = processor.image_processor(images=[render(s) for s, _ in examples], return_tensors="pt")[
            "pixel_values"]
        seqs = [conversation(tok, turns, image_token, GRID * GRID) for _, turns in examples]
        width = max(len(s[0]) for s in seqs)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for b, (i_, l_) in enumerate(seqs):  # right padding for training
            ids[b, : len(i_)] = torch.tensor(i_)
            labels[b, : len(l_)] = torch.tensor(l_)
            mask[b, : len(i_)] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: fp32 weights, bf16 matmuls
            loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, g["peak"], min(50, max(1, steps // 20)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            log(f"{stage} {step:4d}/{steps} loss {loss.item():.4f} (scenes of up to {objects} objects)")
        if eval_every and step and step % eval_every == 0:
            model.eval()
            acc = evaluate(model, processor, 10, seed=TRAIN_SEED + 1)  # a held-out slice of training scenes
            log("  dev accuracy " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
            model.train()
            if vision_lr is None:
                tower.eval()
    model.eval()


@torch.no_grad()
def evaluate(model, processor, n_per_type: int, batch: int = 16, seed: int = TEST_SEED) -> dict:
    """Greedy first answer token on the test split: accuracy per question type and overall."""
    from collections import defaultdict

    items = eval_split(n_per_type, seed=seed)
    correct: dict[str, list[int]] = defaultdict(list)
    tok = processor.tokenizer
    for start in range(0, len(items), batch):
        chunk = items[start: start + batch]
        inputs = processor(images=[render(s) for s, _ in chunk],
                           text=[PROMPT.format(question=q.question) for _, q in chunk], return_tensors="pt",
                           padding=True)
        pred = model(**inputs).logits[:, -1].argmax(-1)
        for (_, q), p in zip(chunk, pred.tolist(), strict=True):
            correct[q.qtype].append(int(tok.convert_ids_to_tokens(p) == q.answer))
    per_type = {t: sum(v) / len(v) for t, v in correct.items()}
    per_type["overall"] = sum(sum(v) for v in correct.values()) / sum(len(v) for v in correct.values())
    return per_type


def model_card(info: dict) -> str:
    """The model card (README.md next to the weights), filled in from this run's numbers."""
    from tokenprune.bench.synthetic.questions import QUESTION_TYPES

    a = info["args"]
    acc = info["test_accuracy"]
    status = "" if acc["overall"] >= 0.9 else (
        f"\n**Status: under-trained.** It answers {100 * acc['overall']:.1f}% of the test questions correctly (chance "
        "is about 33%), short of the 90% target: within the time budget the language model learned to read attributes "
        "off the visual tokens (1-object scenes are easy for it) but only partly to select the object a question is "
        "about among several; dev accuracy stopped improving in the second half of stage 2 and stage 3 did not "
        "help. Accuracy-retention numbers measured on it are therefore noisy and only indicative.\n")
    before = info.get("stage2_test_accuracy") or {}
    rows = "\n".join(f"| {t} | {100 * acc[t]:.1f} | " + (f"{100 * before[t]:.1f} |" if before else "- |")
                     for t in (*QUESTION_TYPES, "overall"))
    resumed = (" Stages 1-2 and stage 3 ran as two processes (`--resume-stage3` on the folder saved after stage 2);"
               " the times are the sum of both." if info.get("resumed_stage3") else "")
    arch = info["arch"]
    probe = ", ".join(f"{k} {100 * v:.1f}%" for k, v in (info.get("vision_probe") or {}).items()) or "not recorded"
    return f"""# synth-llava: a small LLaVA-1.5-architecture VLM trained on synthetic VQA

Shipped with tokenprune so that pruning methods can be compared on a model whose answers depend on specific image
regions (`tokenprune bench-accuracy`), and so that `make demo`, the CLI and the notebooks show real answers and
meaningful selections. Load it with `tokenprune.tiny_models.trained_llava()` (`from_pretrained` on this folder).
It knows only its synthetic world: it is a sanity check, not a substitute for a real checkpoint.
{status}
## Architecture

`LlavaForConditionalGeneration`, the LLaVA-1.5 layout at small widths: CLIP ViT ({arch['vision_layers']} layers,
hidden {arch['vision_hidden']}, {arch['vision_heads']} heads) on 224x224 images with patch 14 -> **256 patch tokens
+ [CLS]**; LLaVA's 2-layer GELU projector on the penultimate ViT layer (`vision_feature_layer=-2`,
`vision_feature_select_strategy="default"`: [CLS] dropped); Llama LM ({arch['text_layers']} layers, hidden
{arch['text_hidden']}, {arch['text_heads']} heads, MLP {arch['text_intermediate']}); a word-level tokenizer over
the task's {len(vocabulary())} words. {info['parameters'] / 1e6:.2f} M parameters, stored in **fp32**
(`model.safetensors`, {info['weights_bytes'] / 2**20:.1f} MiB). Prompt: `USER : <image>\\n{{question}} ASSISTANT :`,
answer: one word then `</s>`.

## Data

`tokenprune.bench.synthetic` (PIL only, deterministic from a seed): 1-4 non-overlapping shapes (circle, square,
triangle, diamond) in 6 colours, small (~1.5 patches wide) or large, on gradient / noise / stripe / check
backgrounds in muted colours; in a third of the scenes one object sits alone at the top. Eight question types,
single-word answers: exist, color, shape, count, position (left/right, top/bottom), top (the object at the top of
the image), relative (left of / above), small (the only small object). Training scenes come from seed
{TRAIN_SEED}, test questions from seed {TEST_SEED} (disjoint streams).

## Recipe (`python -m tokenprune.bench.synthetic.train`, seeds fixed)

1. Vision pre-training, {a['vision_steps']} steps x {a['vision_batch']} images, AdamW lr {a['vision_lr']}: the ViT
   with two throw-away heads. The [CLS] token (pooled last layer) predicts the colours, shapes and colour-shape
   pairs present and the object count, so [CLS] attends to the objects (FasterVLM / VisionZip read this
   attention); every patch token of the penultimate layer predicts the colour of the object covering it (or
   background), that object's shape and size (loss on object patches only) and its own row and column; CLIP's
   learned position embeddings start from 2-D sin-cos values (as in MAE). Held-out check after this stage
   (per-patch accuracy of the throw-away heads): {probe}.
2. VQA, {a['vqa_steps']} steps x {a['vqa_batch']} scenes (curriculum: scenes of 1 object for the first 15% of the
   steps, then up to 2, 3, and 4 from 45% on), AdamW lr {a['vqa_lr']} (warm-up, cosine): ViT frozen (as in
   LLaVA-1.5), projector + LM trained on multi-turn conversations of up to {a['turns']} questions per scene, loss
   on the answer tokens.
3. Joint VQA, {a['joint_steps']} steps x {a['vqa_batch']} scenes of up to 4 objects: the ViT trained too, at lr
   {a['joint_vision_lr']} (projector + LM at {a['joint_lr']}).

All stages in bf16 autocast (fp32 master weights). Training took **{info['train_seconds'] / 60:.1f} min** wall time
(stage 1 {info['vision_seconds'] / 60:.1f}, stage 2 {info['vqa_seconds'] / 60:.1f}, stage 3
{info['joint_seconds'] / 60:.1f} min) on {info['cpu']}, shared with other jobs (mean 1-minute load average during
the run: {info['mean_load_1min']}; the training process had CPU priority).{resumed}

## Accuracy (test split, {info['eval_per_type']} questions per type, greedy first token, unpruned)

| question type | accuracy % | after stage 2 % |
|---|---|---|
{rows}
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("tokenprune/assets/synth-llava"))
    p.add_argument("--vision-steps", type=int, default=200)
    p.add_argument("--vision-batch", type=int, default=32)
    p.add_argument("--vision-lr", type=float, default=1e-3)
    p.add_argument("--vqa-steps", type=int, default=1400)
    p.add_argument("--vqa-batch", type=int, default=8)
    p.add_argument("--vqa-lr", type=float, default=2e-3)
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--eval-per-type", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--joint-steps", type=int, default=600)
    p.add_argument("--joint-lr", type=float, default=1e-3)
    p.add_argument("--joint-vision-lr", type=float, default=2e-4)
    p.add_argument("--eval-every", type=int, default=100, help="log dev accuracy every N VQA steps (0: never)")
    p.add_argument("--resume-stage3", type=Path, default=None,
                   help="a folder saved after stages 1-2 (with its training_log.json): run only stage 3 from it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    log_lines: list[str] = []

    loads: list[float] = []

    def log(msg: str) -> None:
        loads.append(os.getloadavg()[0])
        line = f"[{time.time() - start:7.1f}s] {msg}"
        log_lines.append(line)
        print(line, flush=True)

    model, processor = build()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters; {ARCH}")
    if args.resume_stage3 is None:
        probe = train_vision(model, processor, args.vision_steps, args.vision_batch, args.vision_lr, log)
        t_vision = time.time() - start
        train_vqa(model, processor, args.vqa_steps, args.vqa_batch, args.vqa_lr, args.turns, log, args.eval_every)
        t_vqa = time.time() - start - t_vision
        earlier: dict = {}
    else:  # stages 1-2 ran in an earlier process: take their weights and their times from its log
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.resume_stage3, dtype=torch.float32)
        earlier = json.loads((args.resume_stage3 / "training_log.json").read_text())
        t_vision, t_vqa = earlier["vision_seconds"], earlier["train_seconds"] - earlier["vision_seconds"]
        probe = earlier.get("vision_probe", {})
        log(f"resumed after stages 1-2 from {args.resume_stage3} ({earlier['train_seconds'] / 60:.1f} min there; "
            f"test accuracy then {earlier['test_accuracy']['overall']:.3f})")
        start -= earlier["train_seconds"]
    t3 = time.time()
    if args.joint_steps:
        train_vqa(model, processor, args.joint_steps, args.vqa_batch, args.joint_lr, args.turns, log,
                  args.eval_every, vision_lr=args.joint_vision_lr, first_index=50_000_000, stage="joint")
    t_joint = time.time() - t3
    t_train = t_vision + t_vqa + t_joint
    log(f"training done in {t_train / 60:.1f} min (stage 1 {t_vision / 60:.1f}, stage 2 {t_vqa / 60:.1f}, "
        f"stage 3 {t_joint / 60:.1f} min)")
    acc = evaluate(model, processor, args.eval_per_type)
    log("test accuracy: " + json.dumps({k: round(v, 4) for k, v in acc.items()}))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    info = {
        "args": {k: str(v) for k, v in vars(args).items()}, "arch": ARCH, "parameters": n_params,
        "train_seconds": round(t_train, 1), "vision_seconds": round(t_vision, 1), "vqa_seconds": round(t_vqa, 1),
        "joint_seconds": round(t_joint, 1), "test_accuracy": acc,
        "stage2_test_accuracy": earlier.get("test_accuracy"), "vision_probe": probe,
        "resumed_stage3": args.resume_stage3 is not None,
        "eval_per_type": args.eval_per_type,
        "mean_load_1min": round(sum(loads + earlier.get("loads", [])) / len(loads + earlier.get("loads", [])), 2),
        "loads": earlier.get("loads", []) + loads,
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads",
        "weights_bytes": (args.out / "model.safetensors").stat().st_size,
        "log": earlier.get("log", []) + log_lines,
    }
    (args.out / "training_log.json").write_text(json.dumps(info, indent=1) + "\n")
    (args.out / "README.md").write_text(model_card(info))
    log(f"saved to {args.out}")


if __name__ == "__main__":
    main()
