"""Two-turn chat through the OpenAI server: what vLLM's prefix cache gives turn 2 with and without pruning
(``tokenprune serve-bench --two-turn``; results and how they were measured: docs/vllm.md).

Per setting (unpruned, then each method at each keep) one server on 127.0.0.1 (prefix caching on) holds
``requests`` conversations, one image each: every turn 1 (image + question), then every turn 2 (turn 1 + its answer
+ another question, the same image), one request at a time. vLLM keys its prefix-cache blocks on the image item's
hash: an image-only selection (DivPrune) gives turn 2 the same item, so the image's blocks are reused; a
prompt-dependent one (CDPruner, MMTok) salts the hash with the text after the image, which turn 2 changes, so the
image is encoded and selected again for the new question and only the text before it is reused. Reported: turn-1 and
turn-2 time to first token (p50), turn-2 prompt tokens, and turn 2's prefix-cache hit rate (``prefix_cache_hits`` /
``prefix_cache_queries`` from the server's ``/metrics``, in tokens).
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics

from tokenprune.integrations.vllm.serve_bench import (
    HOST,
    Plan,
    _get,
    _image_url,
    check,
    run_files,
    serving,
    stream_chat,
    user_turn,
    write_results,
)

QUESTIONS = ("describe the image in detail .", "what color is the shape at the top left ?")


def prefix_cache_counts(metrics: str) -> tuple[float, float]:
    """``(hits, queries)``: vLLM's prefix-cache counters (tokens) summed over the engine's label sets."""
    def total(name: str) -> float:
        pattern = rf"^vllm:{name}(?:_total)?(?:\{{[^}}]*\}})? ([0-9.e+-]+)$"
        return sum(float(v) for v in re.findall(pattern, metrics, flags=re.M))
    return total("prefix_cache_hits"), total("prefix_cache_queries")


def measure_two_turn(plan: Plan, keep: float | None, template: str, log) -> dict:
    """One server: every conversation's turn 1, then every turn 2; the figures of this setting."""
    with serving(plan, keep, template, log) as model:
        def counts() -> tuple[float, float]:
            return prefix_cache_counts(_get(f"http://{HOST}:{plan.port}/metrics"))

        stream_chat(plan, model, [user_turn(_image_url(plan, 10_000), QUESTIONS[0])])  # warm-up, another image
        images = [_image_url(plan, seed) for seed in range(plan.requests)]
        before = counts()
        first = [stream_chat(plan, model, [user_turn(url, QUESTIONS[0])]) for url in images]
        middle = counts()
        second = [stream_chat(plan, model, [user_turn(url, QUESTIONS[0]),
                                            {"role": "assistant", "content": turn["text"]},
                                            user_turn(None, QUESTIONS[1])])
                  for url, turn in zip(images, first, strict=True)]
        after = counts()

    def rate(a: tuple[float, float], b: tuple[float, float]) -> float:
        return (b[0] - a[0]) / (b[1] - a[1]) if b[1] > a[1] else 0.0

    return {"turn1_ttft_p50_s": statistics.median(t["ttft_s"] for t in first),
            "turn2_ttft_p50_s": statistics.median(t["ttft_s"] for t in second),
            "turn1_prompt_tokens": statistics.mean(t["prompt_tokens"] for t in first),
            "turn2_prompt_tokens": statistics.mean(t["prompt_tokens"] for t in second),
            "turn1_hit_rate": rate(before, middle), "turn2_hit_rate": rate(middle, after)}


COLUMNS = (("turn1_ttft_p50_s", "turn-1 TTFT p50 s", True), ("turn2_ttft_p50_s", "turn-2 TTFT p50 s", True),
           ("turn2_prompt_tokens", "turn-2 prompt tok", True),
           ("turn2_hit_rate", "turn-2 prefix-cache hit rate", False))


def markdown(results: dict) -> str:
    """The two-turn table: one row per setting, ratios pruned/unpruned for times and sizes."""
    plan, rows = results["plan"], results["two_turn"]
    base = rows["unpruned"]
    out = [f"Model `{plan['model']}` ({plan['model_type']}), {plan['requests']} two-turn conversations one request "
           f"at a time, {plan['max_tokens']} output tokens per turn, one {plan['image_size'][0]}x"
           f"{plan['image_size'][1]} image per conversation, prefix caching on, device {plan['device']}.", "",
           "| setting | " + " | ".join(name + (" | ratio" if ratio else "") for _, name, ratio in COLUMNS) + " |",
           "|---" * (1 + sum(2 if ratio else 1 for *_, ratio in COLUMNS)) + "|"]
    for label, row in rows.items():
        cells = []
        for key, _, ratio in COLUMNS:
            cells.append(f"{row[key]:.0%}" if key.endswith("rate") else f"{row[key]:.3g}")
            if ratio:
                cells.append(f"{row[key] / base[key]:.2f}" if base[key] else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def run_two_turn(plan: Plan, methods: list[str], out_dir: str) -> dict:
    """Unpruned, then every method at every keep, servers one after the other; writes
    ``serve_two_turn_<model_type>.json/.md`` to ``out_dir``."""
    # prefix caching on explicitly; on the CPU build 32-token blocks (its default of 128 is coarse for these prompts;
    # GPUs default to 16)
    extra = ("--enable-prefix-caching", *(("--block-size", "32") if plan.device == "cpu" else ()))
    plan = dataclasses.replace(plan, extra_args=(*plan.extra_args, *extra))
    plans = [dataclasses.replace(plan, method=method) for method in methods]
    for each in plans:
        check(each)
    os.makedirs(out_dir, exist_ok=True)
    results = {"plan": dataclasses.asdict(plan), "methods": list(methods), "two_turn": {}}
    settings = [("unpruned", plan, None)] + [(f"{p.method} {k}", p, k) for p in plans for k in plan.keeps]
    with run_files("chat", plan.model_type) as (template, log):
        for label, each, keep in settings:
            print(f"[serve-bench two-turn] {label} ...", flush=True)
            results["two_turn"][label] = measure_two_turn(each, keep, template, log)
    write_results(os.path.join(out_dir, f"serve_two_turn_{plan.model_type}"), results, markdown(results))
    return results


def handle_two_turn(plan: Plan, args) -> int:
    """``serve-bench --two-turn``: run, print the table."""
    print(markdown(run_two_turn(plan, args.methods or [plan.method], args.out)))
    return 0
