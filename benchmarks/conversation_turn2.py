"""What "an image is pruned once" costs and saves in a conversation, on the bundled trained model.

Two questions per scene of the synthetic VQA test seed (the conversation format the model was trained on:
``USER : <image>\\n{q1} ASSISTANT : {a1}</s>USER : {q2} ASSISTANT :``). Turn 1 is answered with pruning at
``--keep``. Turn 2 is then answered twice:

* reuse: ``generate`` on turn 1's cache (the image as turn 1 pruned it; no pixels, no re-encoding);
* fresh: the whole conversation with its image on a new cache (the image encoded and pruned again, for q2).

Per method: turn-2 accuracy both ways, the share of identical answers, and the turn-2 call's time (prefill + one
token) both ways, median per question, CPU time of this process (the machine is shared).

    python benchmarks/conversation_turn2.py --scenes 40 --keep 0.25   # -> results/conversation_turn2.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from tokenprune import disable_pruning, enable_pruning
from tokenprune.bench.accuracy import MODEL_OPTIONS
from tokenprune.bench.synthetic.questions import PROMPT, TEST_SEED, training_example
from tokenprune.bench.synthetic.scenes import render
from tokenprune.tiny_models import trained_llava

METHODS = ("divprune", "fastervlm", "visionzip", "cdpruner", "mmtok", "fastv", "pdrop", "sparsevlm", "dart")
RESULTS = Path(__file__).resolve().parent / "results"


def conversations(n: int) -> list:
    """``n`` (scene, q1, q2): two distinct questions about one scene, from the held-out test seed."""
    out, index = [], 0
    while len(out) < n:
        scene, turns = training_example(TEST_SEED, index, max_turns=2)
        index += 1
        if len(turns) == 2:
            out.append((render(scene), turns[0], turns[1]))
    return out


@torch.inference_mode()
def turn2(model, processor, items: list) -> dict:
    tok = processor.tokenizer
    right = {"reuse": 0, "fresh": 0}
    same, times = 0, {"reuse": [], "fresh": []}
    for image, q1, q2 in items:
        inputs = processor(images=image, text=PROMPT.format(question=q1.question), return_tensors="pt")
        out = model.generate(**inputs, past_key_values=DynamicCache(), max_new_tokens=1, do_sample=False,
                             return_dict_in_generate=True)
        follow = tok(f"USER : {q2.question} ASSISTANT :", return_tensors="pt").input_ids
        ids = torch.cat([out.sequences, torch.tensor([[tok.eos_token_id]]), follow], dim=1)
        answers = {}
        for mode in ("reuse", "fresh"):
            kwargs = (dict(input_ids=ids, past_key_values=out.past_key_values) if mode == "reuse" else
                      dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids)))
            start = time.process_time()
            reply = model.generate(**kwargs, max_new_tokens=1, do_sample=False)
            times[mode].append(time.process_time() - start)
            answers[mode] = tok.convert_ids_to_tokens(reply[0, -1:].tolist())[0]
            right[mode] += int(answers[mode] == q2.answer)
        same += int(answers["reuse"] == answers["fresh"])
    n = len(items)
    return {"accuracy_reuse": right["reuse"] / n, "accuracy_fresh": right["fresh"] / n, "same_answer": same / n,
            "ms_reuse": 1e3 * statistics.median(times["reuse"]), "ms_fresh": 1e3 * statistics.median(times["fresh"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = trained_llava()
    items = conversations(args.scenes)
    rows = [{"method": "unpruned", **turn2(model, processor, items)}]
    print(rows[-1], flush=True)
    for name in args.methods:
        enable_pruning(model, name, keep=args.keep, **MODEL_OPTIONS.get(name, {}))
        try:
            rows.append({"method": name, **turn2(model, processor, items)})
        finally:
            disable_pruning(model)
        print(rows[-1], flush=True)
    lines = [f"Turn 2 of {args.scenes} two-question conversations, keep={args.keep}, bundled trained model "
             f"(synth-llava), CPU time of one process, {args.threads} thread(s), shared machine.", "",
             "| method | turn-2 acc., reuse | turn-2 acc., fresh | same answer | turn-2 ms, reuse | turn-2 ms, fresh |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy_reuse']:.3f} | {r['accuracy_fresh']:.3f} | "
                     f"{r['same_answer']:.3f} | {r['ms_reuse']:.1f} | {r['ms_fresh']:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "conversation_turn2.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (RESULTS / "conversation_turn2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
