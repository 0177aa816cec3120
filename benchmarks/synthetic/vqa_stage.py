"""Stage 2 of the recipe: VQA training of the projector and the LM (the ViT frozen, or trained too in the optional
joint stage), and the accuracy evaluation (see :mod:`.train`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.synthetic.retrieval import RetrievalHeads, retrieval_rows
from benchmarks.synthetic.vision_stage import optimizer_step, vision_batch
from tokenprune.bench.synthetic.questions import PROMPT, TEST_SEED, TRAIN_SEED, eval_split, training_example
from tokenprune.bench.synthetic.scenes import COLORS, GRID, MAX_OBJECTS, SHAPES, render


def conversation_layout(tok, turns, image_token: int, n_image: int):
    """``(input_ids, labels, queries, spans)`` of a multi-turn conversation: labels = -100 except on answers and their
    ``</s>``; each turn's answer position (its last prompt token, whose next token is the answer) and the
    ``[start, end)`` positions of its question's words."""
    ids: list[int] = []
    labels: list[int] = []
    queries: list[int] = []
    spans: list[tuple[int, int]] = []
    for i, qa in enumerate(turns):
        if i == 0:
            head, tail = PROMPT.split("<image>")
            prompt = (tok(head)["input_ids"] + [image_token] * n_image + tok(tail.format(question=qa.question))
                      ["input_ids"])
        else:
            prompt = tok(f"USER : {qa.question} ASSISTANT :")["input_ids"]
        answer = tok(qa.answer)["input_ids"] + [tok.eos_token_id]
        end = len(ids) + len(prompt) - 2  # the prompt ends with "ASSISTANT :"
        spans.append((end - len(qa.question.split()), end))
        ids += prompt
        queries.append(len(ids) - 1)
        ids += answer
        labels += [-100] * len(prompt) + answer
    return ids, labels, queries, spans


def splice_image(model, ids: torch.Tensor, visual: torch.Tensor, image_start: int) -> torch.Tensor:
    """The LM's input embeddings of ``ids`` with the ``GRID*GRID`` image tokens from ``image_start`` on replaced by
    ``visual`` (what LlavaModel does with the projector's output); for the stages that feed the LM directly."""
    embeds = model.model.language_model.embed_tokens(ids)
    return torch.cat([embeds[:, :image_start], visual.to(embeds.dtype), embeds[:, image_start + GRID * GRID:]], 1)


def pad_right(seqs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, attention_mask)`` of ``(ids, labels, ...)`` sequences, right-padded for training."""
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (i_, l_, *_) in enumerate(seqs):
        ids[b, : len(i_)] = torch.tensor(i_)
        labels[b, : len(l_)] = torch.tensor(l_)
        mask[b, : len(i_)] = 1
    return ids, labels, mask


def curriculum(progress: float) -> tuple[int, float]:
    """``(most objects per scene, share of plain backgrounds)`` at this point of the VQA stage. Scenes of 1 object
    on plain backgrounds first (15% of the steps): the LM learns to find the object among 256 visual tokens and
    read it while nothing else competes (on textured backgrounds from the start, the background tokens' colours
    drowned the object's and the LM did not learn to read a lone object's colour in 600 steps); then up to 2, 3
    and finally all 4 objects (from 45% on), with textured backgrounds phased in (all of them from 45% on)."""
    objects = 1 if progress < 0.15 else 2 if progress < 0.3 else 3 if progress < 0.45 else MAX_OBJECTS
    return objects, 1.0 if progress < 0.15 else 0.5 if progress < 0.45 else 0.0


def plain_background(scene, index: int, share: float):
    """The scene with a plain background (same base colour and pixel noise) for a deterministic ``share`` of the
    training indices."""
    if share <= 0 or (index * 0.6180339887) % 1.0 >= share:
        return scene
    scene.background = dict(scene.background, kind="plain")
    return scene


def word_targets(scenes, tok) -> torch.Tensor:
    """``(B, 256, vocab)`` multi-hot: the words that describe the object covering each patch (its colour, its shape,
    "small" for a small object, "top"/"bottom" and "left"/"right" for the patch's half of the image); all zeros on
    background patches."""
    t = vision_batch(scenes)
    words = torch.zeros(*t["owner"].shape, len(tok))
    ids = {w: tok.convert_tokens_to_ids(w) for w in (*COLORS, *SHAPES, "small", "top", "bottom", "left", "right")}
    row, col = torch.arange(GRID * GRID) // GRID, torch.arange(GRID * GRID) % GRID
    for b, scene in enumerate(scenes):
        for i, o in enumerate(scene.objects):
            m = t["owner"][b] == i + 1
            for w in (o.color, o.shape) + (("small",) if o.size == "small" else ()):
                words[b, m, ids[w]] = 1
            for w, where in (("top", row < GRID // 2), ("bottom", row >= GRID // 2), ("left", col < GRID // 2),
                             ("right", col >= GRID // 2)):
                words[b, m & where, ids[w]] = 1
    return words


def alignment_loss(visual: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LLaVA's feature alignment, per patch: the cosine of each projected visual token with every word embedding of
    the LM (scaled by 10) predicts the words that describe the patch (multi-label). Visual tokens then point the
    way the question's words point, which the LM's attention can match from the start."""
    logits = 10 * F.normalize(visual.float(), dim=-1) @ F.normalize(embeddings.float(), dim=-1).T
    return F.binary_cross_entropy_with_logits(logits, targets)


def train_vqa(model, processor, steps: int, batch: int, lr: float, max_turns: int, log, eval_every: int = 0,
              vision_lr: float | None = None, first_index: int = 0, stage: str = "vqa", align: float = 0.0,
              curriculum_on: bool = True, retrieve: float = 0.0, heads: RetrievalHeads | None = None):
    """VQA training of the projector and the LM; the ViT frozen (``vision_lr=None``, with the object-count
    curriculum unless ``curriculum_on`` is false) or trained too at ``vision_lr`` (stage 3, scenes of up to 4
    objects throughout); plus ``retrieve`` times the object-retrieval loss of :mod:`.retrieval` (through ``heads``,
    new ones if not given)."""
    tok = processor.tokenizer
    image_token = model.config.image_token_id
    tower = model.model.vision_tower
    tower.requires_grad_(vision_lr is not None)
    model.model.multi_modal_projector.requires_grad_(True)
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n],
               "lr": lr}]
    if vision_lr is not None:
        groups.append({"params": list(tower.parameters()), "lr": vision_lr})
    if retrieve:
        heads = RetrievalHeads(model.config.text_config.hidden_size) if heads is None else heads
        groups[0]["params"] += list(heads.parameters())
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    model.train()
    if vision_lr is None:
        tower.eval()
    index = first_index
    projected: list[torch.Tensor] = []  # the projector's output of the current step (for the alignment loss)
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: projected.append(o))
    for step in range(steps):
        objects, plain = curriculum(step / steps) if vision_lr is None and curriculum_on else (MAX_OBJECTS, 0.0)
        examples = [training_example(TRAIN_SEED, index + i, max_turns=max_turns, max_objects=objects)
                    for i in range(batch)]
        examples = [(plain_background(scene, index + i, plain), turns) for i, (scene, turns) in enumerate(examples)]
        index += batch
        pixels = processor.image_processor(images=[render(s) for s, _ in examples], return_tensors="pt")[
            "pixel_values"]
        layouts = [conversation_layout(tok, turns, image_token, GRID * GRID) for _, turns in examples]
        ids, labels, mask = pad_right(layouts, tok.pad_token_id)
        projected.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: fp32 weights, bf16 matmuls
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels,
                        output_hidden_states=bool(retrieve))
        loss = out.loss
        if retrieve:
            loss_retrieve = heads.loss(out.hidden_states, retrieval_rows(examples, layouts))
            loss = loss + retrieve * loss_retrieve
        if align:
            loss_align = alignment_loss(projected[0], model.model.language_model.embed_tokens.weight,
                                        word_targets([s for s, _ in examples], tok))
            loss = loss + align * loss_align
        optimizer_step(opt, loss, step, steps, min(50, max(1, steps // 20)), clip=params)
        if step % 20 == 0 or step == steps - 1:
            log(f"{stage} {step:4d}/{steps} loss {loss.item():.4f}" + (f" (align {loss_align.item():.4f})" if align
                                                                   else "")
                + (f" (retrieval {loss_retrieve.item():.4f})" if retrieve else "")
                + f" (scenes of up to {objects} objects)")
        if eval_every and step and step % eval_every == 0:
            model.eval()
            acc = evaluate(model, processor, 10, seed=TRAIN_SEED + 1)  # a held-out slice of training scenes
            log("  dev accuracy " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
            model.train()
            if vision_lr is None:
                tower.eval()
    hook.remove()
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
