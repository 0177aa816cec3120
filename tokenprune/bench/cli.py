"""The ``flops``, ``bench``, ``bench-selection`` and ``bench-decoder`` commands (registered by
:func:`add_commands`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tokenprune.cli_types import parse_keep


def _add_model_arguments(parser: argparse.ArgumentParser, attn_help: str) -> None:
    """The options that say which model a benchmark builds (``tokenprune.bench.models.load``)."""
    parser.add_argument("--model", default="tiny",
                        help="tiny, demo, llava-1.5-7b, llava-1.5-13b or a checkpoint directory (default tiny)")
    parser.add_argument("--layers", type=int, default=None, help="build the preset with this many LLM layers")
    parser.add_argument("--vision-layers", type=int, default=None, help="... and this many vision-tower layers")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--attn", default="sdpa", help=attn_help)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _add_quantization_arguments(parser)


def _add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """bitsandbytes loading, with transformers' own names (``BitsAndBytesConfig``): the model a user runs."""
    group = parser.add_argument_group("quantization (bitsandbytes; a preset is saved and reloaded quantized)")
    group.add_argument("--load-in-4bit", action="store_true", help="load the model in 4-bit")
    group.add_argument("--load-in-8bit", action="store_true", help="load the model in 8-bit (LLM.int8)")
    group.add_argument("--bnb-4bit-quant-type", default=None, choices=("nf4", "fp4"), help="4-bit type (default fp4)")
    group.add_argument("--bnb-4bit-use-double-quant", action="store_true", help="quantize the 4-bit scales too")
    group.add_argument("--bnb-4bit-compute-dtype", default=None,
                       help="dtype of the 4-bit matmuls, e.g. float32 or bfloat16 (default float32)")


def _quantization(args: argparse.Namespace):
    """The ``BitsAndBytesConfig`` the flags ask for (None: full precision); a parser error if they do not fit."""
    from tokenprune.quantization import bnb_config

    flags = {"load_in_4bit": args.load_in_4bit, "load_in_8bit": args.load_in_8bit,
             "bnb_4bit_quant_type": args.bnb_4bit_quant_type, "bnb_4bit_compute_dtype": args.bnb_4bit_compute_dtype,
             "bnb_4bit_use_double_quant": args.bnb_4bit_use_double_quant}
    options = {key: value for key, value in flags.items() if value not in (None, False)}
    try:
        return bnb_config(options)
    except ValueError as err:
        args.command_parser.error(str(err).replace("load_in_4bit=True", "--load-in-4bit")
                                  .replace("load_in_8bit=True", "--load-in-8bit"))


def _add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every timing benchmark shares: repeats, warm-up, CPU threads, JSON output."""
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", nargs="?", const="-", default=None,
                        help="write JSON to PATH (or stdout without PATH)")


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",") if part.strip()]
    return parse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``flops``, ``bench`` and ``bench-selection`` to the ``tokenprune`` sub-command parser."""
    from tokenprune.budget.flops import FORMULAS

    flops = sub.add_parser(
        "flops", help="analytic LLM prefill FLOPs, KV-cache bytes and decode FLOPs for a per-layer token schedule",
        description="Prefill FLOPs (multiply-accumulates, the papers' convention) of the LLM for the tokens each "
        "layer processes, KV-cache bytes and decode FLOPs per token. Example (PyramidDrop's table): tokenprune "
        "flops --model llava-1.5-7b --tokens-per-layer 576x2,288x30 --formula pdrop",
    )
    flops.add_argument("--model", default="llava-1.5-7b",
                       help="a preset (see --list) or a checkpoint directory / config.json (default llava-1.5-7b)")
    flops.add_argument("--tokens-per-layer", default=None,
                       help="e.g. 576x2,288x30 (tokens x layers) or 576 for every layer (default: the preset's "
                       "visual tokens)")
    flops.add_argument("--text-tokens", type=int, default=0,
                       help="unprunable tokens added to every layer (PyramidDrop counts image tokens only: 0)")
    flops.add_argument("--unpruned", type=int, default=None,
                       help="tokens per layer of the unpruned prompt for the ratio (default: the schedule's largest)")
    flops.add_argument("--formula", default="exact",
                       help=f"{', '.join(FORMULAS)} (aliases f2=fastv, f3/sparsevlm=pdrop, gqa=exact; default exact)")
    flops.add_argument("--kv-dtype", default="fp16", help="KV-cache dtype: fp16, bf16, fp32, fp8 (default fp16)")
    flops.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    flops.add_argument("--ffn-share", type=float, default=1.0,
                       help="share of FFN neurons each decode step computes (CoreMatching's neuron_keep; default 1)")
    flops.add_argument("--list", action="store_true", help="list the model presets and exit")
    flops.add_argument("--json", action="store_true", help="print a JSON object instead of a line")
    flops.set_defaults(handler=run_flops, command_parser=flops)

    bench = sub.add_parser(
        "bench", help="measure prefill/decode latency, TTFT, peak memory, KV cache: unpruned, pruned, physical limit",
        description="For a model (a preset with real shapes and random weights, or a checkpoint directory), "
        "methods and budgets, measure after warm-up (median, min, max of repeats): prefill unpruned / pruned / "
        "physical limit (the same model on an input that already has only the kept tokens, vision tower "
        "included), time to first token, decode time per token, peak memory, KV-cache bytes (measured and "
        "analytic) and the estimated LLM prefill TFLOPs.",
    )
    bench.add_argument("--config", default=None, help="a JSON file of these options (command-line flags override)")
    _add_model_arguments(bench, attn_help="attn_implementation (default sdpa)")
    bench.add_argument("--prompt", default=None, help="prompt with the model's image placeholder")
    bench.add_argument("--method", type=_csv(str), default=["divprune"], help="comma list, or 'all' (default divprune)")
    bench.add_argument("--keep", type=_csv(parse_keep), default=None, help="comma list of budgets, e.g. 64,128,0.25")
    bench.add_argument("--flops", type=_csv(float), default=None, help="comma list of FLOPs targets, e.g. 0.25,0.5")
    _add_timing_arguments(bench)
    bench.add_argument("--decode-tokens", type=int, default=8,
                       help="tokens generated to time TTFT and decoding; 0 skips (default 8)")
    bench.add_argument("--csv", nargs="?", const="-", default=None, help="write CSV to PATH (or stdout without PATH)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(handler=run_bench, command_parser=bench)

    selection = sub.add_parser(
        "bench-selection", help="micro-benchmark every selector at real sizes vs one LLM layer's prefill",
        description="Time every registered method's selection on synthetic signals (N tokens, D dims) and one "
        "Llama-7B-shaped decoder layer's prefill over N tokens, plus naive reference implementations (same "
        "output asserted).",
    )
    selection.add_argument("--sizes", type=_csv(int), default=[576, 2880], help="token counts (default 576,2880)")
    selection.add_argument("--dim", type=int, default=4096, help="feature width D (default 4096)")
    selection.add_argument("--method", type=_csv(str), default=None, help="comma list (default: every method)")
    selection.add_argument("--dtype", default="bfloat16", help="features' and layer's dtype (default bfloat16)")
    _add_timing_arguments(selection)
    selection.add_argument("--reference-repeats", type=int, default=None,
                           help="timed runs of each naive reference (default: --repeats)")
    selection.add_argument("--no-layer", action="store_true", help="skip timing the LLM layer")
    selection.set_defaults(handler=run_selection, command_parser=selection)
    add_decoder_command(sub)


def add_decoder_command(sub: argparse._SubParsersAction) -> None:
    decoder = sub.add_parser(
        "bench-decoder", help="cost of decoder-stage selection (attention-row recomputation) vs the eager route",
        description="For every decoder-stage method (or --method): the pruned prefill, the time spent inside the "
        "attention-row recomputation and the whole selection step during it (as fractions of the prefill), and "
        "side by side the alternative of running each scoring layer eager with output_attentions (its extra time "
        "over the same layer on sdpa), with a check that the selection made on the eager probabilities agrees.",
    )
    _add_model_arguments(decoder, attn_help="attn_implementation of the prefill (default sdpa)")
    decoder.add_argument("--width-divisor", type=int, default=1,
                         help="narrow the preset's LLM by this factor (hidden, MLP, heads; head dim kept) so that all "
                         "its layers fit a CPU; per-layer cost ratios are unchanged (default 1)")
    decoder.add_argument("--method", type=_csv(str), default=None, help="comma list (default: every decoder method)")
    decoder.add_argument("--keep", type=parse_keep, default=64, help="budget (default 64 tokens)")
    _add_timing_arguments(decoder)
    decoder.add_argument("--markdown", default=None, help="also write the markdown table to PATH")
    decoder.add_argument("--no-progress", action="store_true", help="no progress bar")
    decoder.set_defaults(handler=run_decoder, command_parser=decoder)

    accuracy = sub.add_parser(
        "bench-accuracy", help="accuracy retention of every method at several budgets on the shipped trained model",
        description="Run every registered method that works on LLaVA-1.5 (vision and decoder stage) at each budget "
        "on the synthetic VQA test split with the shipped trained model (tokenprune/assets/synth-llava); report "
        "accuracy per question type and overall, %% of the unpruned accuracy and the LLM prefill FLOPs of each "
        "setting. Writes OUT/accuracy_retention.{json,md,png}.",
    )
    accuracy.add_argument("--per-type", type=int, default=20, help="test questions per question type (default 20)")
    accuracy.add_argument("--keep", type=_csv(float), default=[0.5, 0.25, 0.11, 0.05],
                          help="comma list of ratios (default 0.5,0.25,0.11,0.05)")
    accuracy.add_argument("--method", type=_csv(str), default=None, help="comma list (default: every method)")
    accuracy.add_argument("--batch", type=int, default=20, help="questions per forward (default 20)")
    accuracy.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    accuracy.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    accuracy.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                          help="output directory (default benchmarks/results)")
    _add_quantization_arguments(accuracy)
    accuracy.add_argument("--overlap", action="store_true",
                          help="with a quantization flag: also measure, per method, the overlap of the kept indices "
                          "between the full-precision and the quantized model (writes OUT/quantized_overlap_*)")
    accuracy.set_defaults(handler=run_accuracy, command_parser=accuracy)


def run_decoder(args: argparse.Namespace) -> int:
    from tokenprune.bench import decoder_cost
    from tokenprune.bench.measure import torch_threads
    from tokenprune.bench.models import load

    with torch_threads(args.threads):
        try:
            bm = load(args.model, layers=args.layers, vision_layers=args.vision_layers, dtype=args.dtype,
                      attn_implementation=args.attn, device=args.device, width_divisor=args.width_divisor,
                      quantization_config=_quantization(args))
            rows = decoder_cost.run(bm, args.method, args.keep, repeats=args.repeats, warmup=args.warmup,
                                    progress=False if args.no_progress else None)
        except ValueError as err:
            args.command_parser.error(str(err))
    table = decoder_cost.format_markdown(rows)
    if args.json != "-":
        print(table)
    if args.json:
        _emit(json.dumps(rows, indent=2), args.json)
    if args.markdown:
        _emit(table, args.markdown)
    return 0


def run_flops(args: argparse.Namespace) -> int:
    from tokenprune.budget import flops as F

    parser = args.command_parser
    if args.list:
        for s in F.PRESETS.values():
            print(f"{s.name:<15} d={s.hidden_size:<5} m={s.intermediate_size:<6} L={s.num_layers:<3} "
                  f"H={s.num_heads:<3} H_kv={s.num_kv_heads:<3} d_h={s.d_head}  "
                  f"visual tokens: {s.visual_tokens or '-'}")
        return 0
    try:
        shape = F.PRESETS.get(args.model.lower())
        if shape is None:
            if not Path(args.model).exists():
                raise ValueError(f"unknown model preset {args.model!r}; presets: {', '.join(F.PRESETS)} "
                                 "(or give a checkpoint directory / config.json)")
            from transformers import AutoConfig

            shape = F.ModelShape.from_config(AutoConfig.from_pretrained(args.model), name=args.model)
        if args.layers:
            shape = shape.with_layers(args.layers)
        formula = F.resolve_formula(args.formula)
        if args.tokens_per_layer is None and shape.visual_tokens is None:
            raise ValueError(f"{shape.name} has no fixed visual-token count; give --tokens-per-layer")
        schedule = F.parse_schedule(args.tokens_per_layer or str(shape.visual_tokens), shape.num_layers)
        tokens = [t + args.text_tokens for t in schedule]
        unpruned = (args.unpruned + args.text_tokens) if args.unpruned is not None else max(tokens)
        kv = F.dtype_bytes(args.kv_dtype)
        F.decode_flops(shape, 1, formula, args.ffn_share)  # validates --ffn-share
    except ValueError as err:
        parser.error(str(err))
    result = {
        "model": shape.name, "formula": formula, "layers": shape.num_layers, "text_tokens": args.text_tokens,
        "schedule": _run_length(tokens), "tokens_per_layer": tokens, "avg_tokens": sum(tokens) / len(tokens),
        "tflops": F.prefill_flops(shape, tokens, formula) / 1e12,
        "tflops_unpruned": F.prefill_flops(shape, unpruned, formula) / 1e12,
        "kv_bytes": F.kv_bytes(shape, tokens, kv), "kv_bytes_unpruned": F.kv_bytes(shape, unpruned, kv),
        "kv_dtype": args.kv_dtype,
        "decode_gflops_per_token": F.decode_flops(shape, tokens, formula, args.ffn_share) / 1e9,
        "decode_gflops_per_token_unpruned": F.decode_flops(shape, unpruned, formula) / 1e9,
    }
    result["flops_ratio"] = result["tflops"] / result["tflops_unpruned"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{shape.name}, {formula} formula: prefill {result['tflops']:.3f} TFLOPs "
              f"({100 * result['flops_ratio']:.1f}% of {unpruned} tokens in all {shape.num_layers} layers: "
              f"{result['tflops_unpruned']:.3f}); "
              f"KV cache {result['kv_bytes'] / 1e6:.1f} MB {args.kv_dtype} (avg {result['avg_tokens']:.1f} tokens per "
              f"layer); decode {result['decode_gflops_per_token']:.2f} GFLOPs per token")
    return 0


def _run_length(tokens: list[int]) -> str:
    """``[576, 576, 288]`` -> ``"576x2,288x1"`` (the form ``--tokens-per-layer`` reads)."""
    runs: list[list[int]] = []
    for t in tokens:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return ",".join(f"{t}x{n}" for t, n in runs)


def _apply_config(args: argparse.Namespace) -> None:
    """Options from ``--config`` JSON fill in every option left at its default on the command line."""
    parser = args.command_parser
    if not args.config:
        return
    data: dict[str, Any] = json.loads(Path(args.config).read_text())
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest in ("config", "handler", "command_parser") or not hasattr(args, dest):
            parser.error(f"{args.config}: unknown option {key!r}")
        if getattr(args, dest) == parser.get_default(dest):
            if dest in ("method", "keep", "flops") and not isinstance(value, list):
                value = [value]
            if dest == "keep":
                value = [parse_keep(str(v)) for v in value]
            setattr(args, dest, value)


def _emit(text: str, target: str | None) -> None:
    if target == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    elif target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {target}", file=sys.stderr)


def run_bench(args: argparse.Namespace) -> int:
    from tokenprune.bench import report
    from tokenprune.bench.measure import torch_threads
    from tokenprune.bench.models import load
    from tokenprune.bench.run import Budget, run
    from tokenprune.budget import validate_flops
    from tokenprune.methods import METHODS

    _apply_config(args)
    parser = args.command_parser
    methods = sorted(METHODS) if args.method == ["all"] else args.method
    unknown = [m for m in methods if m.lower() not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known methods: {', '.join(sorted(METHODS))}")
    if not args.keep and not args.flops:
        args.keep = [0.11]
    try:
        for f in args.flops or []:
            validate_flops(f)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    budgets = [Budget(m, keep=k) for m in methods for k in args.keep or []]
    budgets += [Budget(m, flops=f) for m in methods for f in args.flops or []]
    with torch_threads(args.threads):
        try:
            bm = load(args.model, layers=args.layers, vision_layers=args.vision_layers, dtype=args.dtype,
                      attn_implementation=args.attn, device=args.device, prompt=args.prompt,
                      quantization_config=_quantization(args))
            rows = run(bm, budgets, repeats=args.repeats, warmup=args.warmup, decode_tokens=args.decode_tokens,
                       progress=False if args.no_progress else None)
        except ValueError as err:
            parser.error(str(err))
    if "-" not in (args.json, args.csv):
        print(report.format_table(rows))
    if args.json:
        _emit(report.to_json(rows), args.json)
    if args.csv:
        _emit(report.to_csv(rows), args.csv)
    return 0


def run_selection(args: argparse.Namespace) -> int:
    from tokenprune.bench import selection
    from tokenprune.bench.measure import torch_threads

    with torch_threads(args.threads):
        rows = selection.run(tuple(args.sizes), d=args.dim, dtype=args.dtype, repeats=args.repeats,
                             warmup=args.warmup, methods=args.method, layer=not args.no_layer,
                             reference_repeats=args.reference_repeats)
    if args.json != "-":
        print(selection.format_table(rows))
    if args.json:
        _emit(json.dumps(rows, indent=2), args.json)
    return 0


def run_accuracy(args: argparse.Namespace) -> int:
    from tokenprune.bench.accuracy import markdown, run, write
    from tokenprune.quantization import describe

    if args.per_type < 1:
        args.command_parser.error(f"--per-type must be >= 1; got {args.per_type}")
    config = _quantization(args)
    if args.overlap:
        return _run_overlap(args, config)
    result = run(n_per_type=args.per_type, keeps=tuple(args.keep), methods=args.method, batch=args.batch,
                 attn_implementation=args.attn, threads=args.threads, quantization_config=config)
    stem = "accuracy_retention" if config is None else f"accuracy_retention_{describe(config)}"
    paths = write(result, args.out, stem=stem)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _run_overlap(args: argparse.Namespace, config) -> int:
    """``bench-accuracy --overlap``: kept-index overlap full precision vs quantized, at the first ``--keep``."""
    from tokenprune.bench import quantized_overlap
    from tokenprune.quantization import describe

    if config is None:
        args.command_parser.error("--overlap compares with a quantized model: add --load-in-4bit or --load-in-8bit")
    result = quantized_overlap.run(config, n_per_type=args.per_type, keep=args.keep[0], methods=args.method,
                                   batch=args.batch, attn_implementation=args.attn, threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quantized_overlap_{describe(config)}"
    table = quantized_overlap.markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json, {stem}.md")
    return 0
