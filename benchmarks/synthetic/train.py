"""Train the shipped synthetic-VQA LLaVA-1.5 model (``tokenprune/assets/synth-llava``) on this CPU.

    python -m benchmarks.synthetic.train --out tokenprune/assets/synth-llava

Architecture (:mod:`.model`): ``LlavaForConditionalGeneration`` = CLIP ViT (224 px / patch 14 -> 256 patch tokens +
[CLS]), LLaVA-1.5's 2-layer GELU projector on the penultimate ViT layer (``vision_feature_layer=-2``, "default"
strategy: [CLS] dropped), a Llama LM, a word-level tokenizer.

Recipe (like LLaVA's, but from scratch):

1. vision pre-training (:mod:`.vision_stage`): the ViT alone, with heads that are thrown away afterwards. The [CLS]
   token (pooled output of the last layer) predicts which colours, shapes and colour-shape pairs the scene contains
   and how many objects, so [CLS] must attend to the objects; every patch token of the penultimate layer (what
   LLaVA feeds the LM) predicts the colour of the object covering it (or background), that object's shape and size
   (object patches only) and its own row and column; the mean token of each object predicts its shape; a
   background patch's token matches a learned per-position template (it carries no object information). CLIP's
   learned position embeddings start from 2-D sin-cos values (as in MAE).
2. ``--stage2 symbolic`` (the default, :mod:`.symbolic_stage`), the ViT frozen (as in LLaVA-1.5): (a) the
   projector and the LM learn the task on ground-truth scene tokens (multi-turn conversations, ``--turns``, loss on
   the answer tokens and their ``</s>``) while stage 1 runs in a second process (``--concurrent``); (b) a new
   first projector layer is distilled onto stage (a)'s projector outputs from the frozen ViT's tokens; (c) VQA on
   rendered images. Stages (a) and (c) add the object-retrieval loss (:mod:`.retrieval`, ``--retrieve``): the
   word closing each object's name predicts that object's attributes and position after 2 LM layers. The LM
   starts at std 0.1 (see :func:`.model.build`).
   Older variants: ``--stage2 align`` (:mod:`.vqa_stage`: answer loss plus LLaVA-style feature alignment of the
   projector, with a 1-object / plain-background curriculum) and ``--stage2 grounded`` (experimental,
   :mod:`.grounded_stage`: attention supervision of a few LM heads onto the image tokens each question is about,
   :mod:`.grounding`).
3. optional (``--joint-steps``, 0 by default): the same VQA training with the ViT trained too.

Seeds are fixed; the scenes come from ``TRAIN_SEED`` (the test split uses another seed stream).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks.synthetic.card import model_card
from benchmarks.synthetic.grounded_stage import train_grounded
from benchmarks.synthetic.model import ARCH, build
from benchmarks.synthetic.symbolic_stage import distill_projector, evaluate_symbolic, train_symbolic
from benchmarks.synthetic.vision_stage import train_vision, vision_worker
from benchmarks.synthetic.vqa_stage import evaluate, train_vqa
from tokenprune.bench.synthetic.questions import TRAIN_SEED


def stages_1_2_symbolic(model, processor, args, log, log_lines: list[str]) -> tuple[dict, float, dict]:
    """Stage 1 and stage 2 ``symbolic`` (2a scene tokens, 2b projector distillation, 2c VQA on images). Stage 2a
    needs no ViT, so with ``--concurrent`` stage 1 runs in a second process meanwhile (one thread each: on this
    2-core CPU two single-threaded jobs do more work per minute than one job on two threads). Returns the stage-1
    probe, stage 1's duration and stage 2's part times."""
    start = time.time()
    if args.concurrent:
        with tempfile.TemporaryDirectory() as tmp:
            child = mp.get_context("spawn").Process(target=vision_worker, args=(
                args.vision_steps, args.vision_batch, args.vision_lr, f"{tmp}/vision.pt"))
            child.start()
            torch.set_num_threads(max(1, args.threads - 1))
            heads = train_symbolic(model, processor, args.symbolic_steps, args.vqa_batch, args.symbolic_lr, args.turns,
                                   log, eval_every=args.eval_every, retrieve=args.retrieve)
            t_symbolic = time.time() - start
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"the stage-1 process failed (exit code {child.exitcode}); see its log above")
            done = torch.load(f"{tmp}/vision.pt")
        model.model.vision_tower.load_state_dict(done["tower"])
        probe, t_vision = done["probe"], done["seconds"]
        log_lines.extend(done["log"])
        torch.set_num_threads(args.threads)
        log(f"stage 1 ({t_vision / 60:.1f} min) and stage 2a ({t_symbolic / 60:.1f} min) ran concurrently")
    else:
        probe = train_vision(model, processor, args.vision_steps, args.vision_batch, args.vision_lr, log)
        t_vision = time.time() - start
        heads = train_symbolic(model, processor, args.symbolic_steps, args.vqa_batch, args.symbolic_lr, args.turns, log,
                               eval_every=args.eval_every, retrieve=args.retrieve)
        t_symbolic = time.time() - start - t_vision
    acc = evaluate_symbolic(model, processor, 20, seed=TRAIN_SEED + 1)
    log("  after stage 2a, dev accuracy on scene tokens " + json.dumps({k: round(v, 3) for k, v in acc.items()}))
    t0 = time.time()
    distill_projector(model, processor, args.distill_steps, args.vision_batch, args.distill_lr, log)
    t_distill = time.time() - t0
    acc = evaluate(model, processor, 20, seed=TRAIN_SEED + 1)
    log("  after stage 2b, dev accuracy on images " + json.dumps({k: round(v, 3) for k, v in acc.items()}))
    train_vqa(model, processor, args.vqa_steps, args.vqa_batch, args.vqa_lr, args.turns, log, args.eval_every,
              align=0.0, curriculum_on=False, retrieve=args.retrieve, heads=heads)
    return probe, t_vision, {"symbolic_seconds": round(t_symbolic, 1), "distill_seconds": round(t_distill, 1),
                             "concurrent": bool(args.concurrent)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("tokenprune/assets/synth-llava"))
    p.add_argument("--vision-steps", type=int, default=800)
    p.add_argument("--vision-batch", type=int, default=32)
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--vqa-steps", type=int, default=1400)
    p.add_argument("--vqa-batch", type=int, default=12)
    p.add_argument("--vqa-lr", type=float, default=1e-3)
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--eval-per-type", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--joint-steps", type=int, default=0)
    p.add_argument("--joint-lr", type=float, default=1e-3)
    p.add_argument("--joint-vision-lr", type=float, default=2e-4)
    p.add_argument("--align", type=float, default=1.0,
                   help="weight of the per-patch word-alignment loss on the projector in stage 2 (0: off)")
    p.add_argument("--stage2", choices=("symbolic", "align", "grounded"), default="symbolic",
                   help="stage 2 variant: 'symbolic' (the LM learns the task on ground-truth scene tokens, the "
                        "projector is distilled onto them, then VQA on images; symbolic_stage.py), 'align' (answer "
                        "loss + feature alignment, curriculum) or 'grounded' (answer loss + attention supervision of "
                        "a few LM heads, grounded_stage.py; experimental)")
    p.add_argument("--symbolic-steps", type=int, default=750, help="--stage2 symbolic: LM steps on scene tokens")
    p.add_argument("--symbolic-lr", type=float, default=1e-3)
    p.add_argument("--distill-steps", type=int, default=300, help="--stage2 symbolic: projector distillation steps")
    p.add_argument("--distill-lr", type=float, default=2e-3)
    p.add_argument("--retrieve", type=float, default=1.0,
                   help="--stage2 symbolic: weight of the object-retrieval loss in stages 2a and 2c (retrieval.py; 0: "
                        "off)")
    p.add_argument("--concurrent", action=argparse.BooleanOptionalAction, default=True,
                   help="--stage2 symbolic: run stage 1 in a second process during stage 2a (one thread each)")
    p.add_argument("--ground", type=float, default=1.0, help="weight of the attention supervision (--stage2 grounded)")
    p.add_argument("--eval-every", type=int, default=200, help="log dev accuracy every N VQA steps (0: never)")
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
        substages: dict = {}
        if args.stage2 == "symbolic":
            probe, t_vision, substages = stages_1_2_symbolic(model, processor, args, log, log_lines)
        else:
            probe = train_vision(model, processor, args.vision_steps, args.vision_batch, args.vision_lr, log)
            t_vision = time.time() - start
            if args.stage2 == "grounded":
                train_grounded(model, processor, args.vqa_steps, args.vqa_batch, args.vqa_lr, args.turns, log,
                               ground=args.ground, eval_every=args.eval_every)
            else:
                train_vqa(model, processor, args.vqa_steps, args.vqa_batch, args.vqa_lr, args.turns, log,
                          args.eval_every, align=args.align)
        t_vqa = time.time() - start - (0.0 if substages.get("concurrent") else t_vision)  # stage 2's wall time
        earlier: dict = {}
    else:  # stages 1-2 ran in an earlier process: take their weights and their times from its log
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.resume_stage3, dtype=torch.float32)
        earlier = json.loads((args.resume_stage3 / "training_log.json").read_text())
        t_vision, t_vqa = earlier["vision_seconds"], earlier["vqa_seconds"]
        probe = earlier.get("vision_probe", {})
        log(f"resumed after stages 1-2 from {args.resume_stage3} ({earlier['train_seconds'] / 60:.1f} min there; "
            f"test accuracy then {earlier['test_accuracy']['overall']:.3f})")
        start -= earlier["train_seconds"]
        substages = {k: earlier[k] for k in ("symbolic_seconds", "distill_seconds", "concurrent") if k in earlier}
    t3 = time.time()
    if args.joint_steps:
        train_vqa(model, processor, args.joint_steps, args.vqa_batch, args.joint_lr, args.turns, log,
                  args.eval_every, vision_lr=args.joint_vision_lr, first_index=50_000_000, stage="joint")
    t_joint = time.time() - t3
    t_train = time.time() - start  # wall time (stage 1 overlaps stage 2 with --concurrent)
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
        "joint_seconds": round(t_joint, 1), **substages, "test_accuracy": acc,
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
