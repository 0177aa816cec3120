"""Stage 2 of the recipe, ``--stage2 symbolic`` (the default): teach the LM the task on ground-truth scene tokens,
then teach the projector to produce them from the frozen ViT, then fine-tune on images.

Why (measured, issue 9): trained end to end on the ViT's tokens, the 4-layer LM learned the task too slowly for a
45-minute CPU budget. Its error mixes two problems: learning to *find* the referred object among 256 visual tokens
and to combine question and scene (the reasoning), and coping with imperfect visual features. Separated:

a. **LM on scene tokens** (:func:`train_symbolic`): each image token is the projector applied to the patch's
   ground-truth description (:func:`scene_tokens`: the colour, shape and size of the object covering it, whether
   it holds that object's centre, its row and column: exactly the stage-1 targets the ViT was trained to
   encode). No rendering and no ViT forward: steps are cheaper and the signal is clean, so the reasoning is learned
   first. The projector here reads a 128-wide one-hot vector laid out like a ViT feature (its input width), so the
   same module continues in (b). Plus the object-retrieval loss of :mod:`.retrieval` (``--retrieve``, on by
   default): without it this stage left ``relative`` questions at chance.
b. **projector distillation** (:func:`distill_projector`): the LM frozen, the projector (a new first layer) learns to
   map the frozen ViT's penultimate-layer tokens of rendered scenes onto what the stage-(a) projector made of the
   scene tokens (mean squared error, per patch). Like LLaVA's feature-alignment stage, which trains only the
   projector, but with a per-token target instead of a caption.
c. **VQA on images** (:func:`.vqa_stage.train_vqa` without curriculum): projector and LM fine-tuned on rendered
   scenes, the ViT frozen, so the LM adapts to the ViT's real (imperfect) tokens.

The shipped model takes only images: the scene tokens are a training signal, like the stage-1 targets.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.nn.functional as F

from benchmarks.synthetic.retrieval import RetrievalHeads, retrieval_rows
from benchmarks.synthetic.vision_stage import optimizer_step, vision_batch
from benchmarks.synthetic.vqa_stage import conversation_layout, pad_right, splice_image
from tokenprune.bench.synthetic.questions import PROMPT, TRAIN_SEED, eval_split, training_example
from tokenprune.bench.synthetic.scenes import COLORS, GRID, SHAPES, render

N_IMAGE = GRID * GRID
# scene-token layout: colour (background = 0), shape (0 = none), size (0 = none), centre flag, row, column
FIELDS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "size": 3, "anchor": 1, "row": GRID, "col": GRID}


def scene_tokens(scenes, width: int) -> torch.Tensor:
    """``(B, 256, width)`` one-hot ground-truth description of every patch (layout :data:`FIELDS`, zero-padded
    to ``width``, the ViT's hidden size, so that the projector can read it)."""
    need = sum(FIELDS.values())
    if width < need:
        raise ValueError(f"scene tokens need {need} channels, the projector reads {width}: widen the ViT")
    t = vision_batch(scenes)
    pos = torch.arange(N_IMAGE)
    parts = [F.one_hot(t["color"], FIELDS["color"]), F.one_hot(t["shape"], FIELDS["shape"]),
             F.one_hot(t["size"], FIELDS["size"]), t["anchor"][..., None],
             F.one_hot(pos // GRID, GRID).expand(len(scenes), -1, -1),
             F.one_hot(pos % GRID, GRID).expand(len(scenes), -1, -1)]
    out = torch.cat([p.float() for p in parts], -1)
    return F.pad(out, (0, width - need))


def _image_start(tok) -> int:
    return len(tok(PROMPT.split("<image>")[0])["input_ids"])


def train_symbolic(model, processor, steps: int, batch: int, lr: float, max_turns: int, log,
                   eval_every: int = 0, retrieve: float = 0.0) -> RetrievalHeads | None:
    """Stage (a): projector + LM on scene tokens, multi-turn conversations, loss on the answers (plus ``retrieve``
    times the object-retrieval loss of :mod:`.retrieval`). Returns the retrieval heads (``None`` without the loss),
    for stage (c) to go on with."""
    tok = processor.tokenizer
    width = model.config.vision_config.hidden_size
    image_start = _image_start(tok)
    model.model.vision_tower.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    for p in params:
        p.requires_grad_(True)
    heads = RetrievalHeads(model.config.text_config.hidden_size) if retrieve else None
    if heads is not None:
        params += list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    index = 20_000_000  # its own range of the training seed stream
    for step in range(steps):
        examples = [training_example(TRAIN_SEED, index + i, max_turns=max_turns) for i in range(batch)]
        index += batch
        layouts = [conversation_layout(tok, turns, model.config.image_token_id, N_IMAGE) for _, turns in examples]
        ids, labels, mask = pad_right(layouts, tok.pad_token_id)
        tokens = scene_tokens([s for s, _ in examples], width)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeds = splice_image(model, ids, model.model.multi_modal_projector(tokens), image_start)
            out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                             output_hidden_states=bool(retrieve))
            logits = model.lm_head(out.last_hidden_state).float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        aux = heads.loss(out.hidden_states, retrieval_rows(examples, layouts)) if retrieve else None
        optimizer_step(opt, loss + retrieve * aux if retrieve else loss, step, steps, min(50, max(1, steps // 20)),
                       clip=params)
        if step % 50 == 0 or step == steps - 1:
            log(f"symbolic {step:4d}/{steps} loss {loss.item():.4f}" + (f" (retrieval {aux.item():.4f})"
                                                                      if retrieve else ""))
        if eval_every and step and step % eval_every == 0:
            acc = evaluate_symbolic(model, processor, 10, seed=TRAIN_SEED + 1)
            log("  dev accuracy on scene tokens " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
            model.train()
    model.eval()
    return heads


@torch.no_grad()
def evaluate_symbolic(model, processor, n_per_type: int, seed: int, batch: int = 32) -> dict:
    """Accuracy per question type with scene tokens in place of the image (how far stage (a) got)."""
    model.eval()
    tok = processor.tokenizer
    width = model.config.vision_config.hidden_size
    image_start = _image_start(tok)
    items = eval_split(n_per_type, seed=seed)
    correct: dict[str, list[int]] = defaultdict(list)
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        rows = []
        for _, qa in chunk:
            ids, _, queries, _ = conversation_layout(tok, [qa], model.config.image_token_id, N_IMAGE)
            rows.append((ids[:queries[0] + 1], ids[:queries[0] + 1]))
        ids, _, mask = pad_right(rows, tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeds = splice_image(model, ids, model.model.multi_modal_projector(scene_tokens([s for s, _ in chunk],
                                                                                         width)), image_start)
            hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            last = hidden[torch.arange(len(chunk)), mask.sum(1) - 1]
            pred = model.lm_head(last).argmax(-1)
        for (_, qa), p in zip(chunk, pred.tolist(), strict=True):
            correct[qa.qtype].append(int(tok.convert_ids_to_tokens(p) == qa.answer))
    per_type = {t: sum(v) / len(v) for t, v in correct.items()}
    per_type["overall"] = sum(sum(v) for v in correct.values()) / sum(len(v) for v in correct.values())
    return per_type


def distill_projector(model, processor, steps: int, batch: int, lr: float, log) -> None:
    """Stage (b): the projector, re-initialised, learns to map the frozen ViT's tokens (penultimate layer, [CLS]
    dropped: what LLaVA feeds it) onto the stage-(a) projector's output for the same scene's scene tokens."""
    tok_width = model.config.vision_config.hidden_size
    projector = model.model.multi_modal_projector
    teacher = copy.deepcopy(projector).eval().requires_grad_(False)
    projector.linear_1.reset_parameters()  # a new input layer; the output layer starts as the teacher's (the ViT
    # tokens encode the scene-token fields linearly, stage 1, so a new first layer can feed the same second one)
    tower = model.model.vision_tower.eval().requires_grad_(False)
    projector.requires_grad_(True).train()
    opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.01)
    index = 30_000_000
    for step in range(steps):
        scenes = [training_example(TRAIN_SEED, index + i, max_turns=0)[0] for i in range(batch)]
        index += batch
        pixels = processor.image_processor(images=[render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            target = teacher(scene_tokens(scenes, tok_width)).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = projector(features).float()
        loss = F.mse_loss(out, target) / target.pow(2).mean()  # relative error
        optimizer_step(opt, loss, step, steps, max(1, steps // 20))
        if step % 50 == 0 or step == steps - 1:
            log(f"projector distillation {step:4d}/{steps} relative error {loss.item():.4f}")
    projector.eval()
