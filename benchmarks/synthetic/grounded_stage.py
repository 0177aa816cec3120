"""Stage 2, grounded variant (``--stage2 grounded``): VQA training of the projector and the LM with the ViT frozen,
plus attention supervision of a few LM heads (see :mod:`.grounding`).

At every turn's answer position (the last prompt token), heads 0-1 of the grounded layers are trained to put the
target distribution of :func:`.grounding.attention_targets` on ``[first token, image tokens]`` for the question's
first referent, heads 2-3 for its second one (the second object of a ``relative`` question), and the ``gather``
heads of layer 0 to spread over the question's words (so that the answer position knows the question before it
looks at the image). The other heads are free. The LM runs with eager attention during this stage only (the
supervision needs the weights); the saved model uses sdpa like every other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.synthetic.grounding import attention_targets
from benchmarks.synthetic.vision_stage import optimizer_step
from benchmarks.synthetic.vqa_stage import conversation_layout, evaluate, pad_right, splice_image
from tokenprune.bench.synthetic.questions import PROMPT, TRAIN_SEED, training_example
from tokenprune.bench.synthetic.scenes import GRID, patch_labels, render

N_IMAGE = GRID * GRID
# (layer, heads on the first referent, heads on the second referent); layer 3 of the 4-layer LM is left free.
GROUNDED = ((1, (0, 1), (2, 3)), (2, (0, 1), (2, 3)))
GATHER = (4, 5, 6, 7)  # layer-0 heads that read the question at the answer position


def grounded_batch(examples, tok, image_token: int) -> dict:
    """Right-padded ``ids``, ``labels``, ``mask``; per turn the answer position (``queries``, ``valid``), the two
    target distributions over ``[first token, image tokens]`` (``targets``, ``(2, B, turns, 1 + 256)``) and the
    uniform distribution over the question's words (``gather``, ``(B, turns, T)``)."""
    seqs = [conversation_layout(tok, turns, image_token, N_IMAGE) for _, turns in examples]
    ids, labels, mask = pad_right(seqs, tok.pad_token_id)
    (b, width), turns = ids.shape, max(len(s[2]) for s in seqs)
    queries = torch.zeros((b, turns), dtype=torch.long)
    valid = torch.zeros((b, turns), dtype=torch.bool)
    targets = torch.zeros((2, b, turns, 1 + N_IMAGE))
    gather = torch.zeros((b, turns, width))
    for r, ((scene, qas), (_, _, q_, s_)) in enumerate(zip(examples, seqs, strict=True)):
        owner = patch_labels(scene)
        for t, (qa, q, (start, end)) in enumerate(zip(qas, q_, s_, strict=True)):
            queries[r, t], valid[r, t] = q, True
            first, second = attention_targets(scene, qa, owner)
            targets[0, r, t], targets[1, r, t] = torch.from_numpy(first), torch.from_numpy(second)
            gather[r, t, start:end] = 1 / (end - start)
    return {"ids": ids, "labels": labels, "mask": mask, "queries": queries, "valid": valid, "targets": targets,
            "gather": gather}


def grounding_loss(attentions, batch: dict, image_start: int) -> torch.Tensor:
    """Mean cross-entropy of the supervised heads' attention rows at the answer positions against their targets."""
    q, valid = batch["queries"], batch["valid"]
    rows = torch.arange(q.shape[0])[:, None]
    losses = []
    for layer, first, second in GROUNDED:
        for heads, target in ((first, batch["targets"][0]), (second, batch["targets"][1])):
            for h in heads:
                row = attentions[layer][rows, h, q].float()  # (B, turns, T)
                keys = torch.cat([row[..., :1], row[..., image_start:image_start + N_IMAGE]], -1)
                losses.append(-(target * torch.log(keys + 1e-6)).sum(-1)[valid].mean())
    for h in GATHER:
        row = attentions[0][rows, h, q].float()
        losses.append(-(batch["gather"] * torch.log(row + 1e-6)).sum(-1)[valid].mean())
    return torch.stack(losses).mean()


def train_grounded(model, processor, steps: int, batch: int, lr: float, max_turns: int, log, *,
                   ground: float = 1.0, eval_every: int = 0, first_index: int = 0) -> None:
    tok = processor.tokenizer
    tower = model.model.vision_tower.eval().requires_grad_(False)
    projector, lm = model.model.multi_modal_projector, model.model.language_model
    image_start = len(tok(PROMPT.split("<image>")[0])["input_ids"])
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.set_attn_implementation("eager")
    model.train()
    tower.eval()
    index = first_index
    for step in range(steps):
        examples = [training_example(TRAIN_SEED, index + i, max_turns=max_turns) for i in range(batch)]
        index += batch
        pixels = processor.image_processor(images=[render(s) for s, _ in examples], return_tensors="pt")[
            "pixel_values"]
        gb = grounded_batch(examples, tok, model.config.image_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():  # what LlavaModel.get_image_features feeds the projector
                features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            embeds = splice_image(model, gb["ids"], projector(features), image_start)
            out = lm(inputs_embeds=embeds, attention_mask=gb["mask"], output_attentions=True)
            logits = model.lm_head(out.last_hidden_state).float()
        loss_lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), gb["labels"][:, 1:].flatten(), ignore_index=-100)
        loss_ground = grounding_loss(out.attentions, gb, image_start)
        loss = loss_lm + ground * loss_ground
        optimizer_step(opt, loss, step, steps, min(50, max(1, steps // 20)), clip=params)
        if step % 20 == 0 or step == steps - 1:
            log(f"grounded vqa {step:4d}/{steps} loss {loss_lm.item():.4f} grounding {loss_ground.item():.4f}")
        if eval_every and step and step % eval_every == 0:
            model.eval()
            acc = evaluate(model, processor, 10, seed=TRAIN_SEED + 1)
            log("  dev accuracy " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
            model.train()
            tower.eval()
    model.set_attn_implementation("sdpa")
    model.eval()
