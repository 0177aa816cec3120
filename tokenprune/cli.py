"""Command line: ``tokenprune`` (also ``python -m tokenprune``)."""

from __future__ import annotations

import argparse
import json
import sys

from tokenprune.cli_types import parse_keep


def build_parser() -> argparse.ArgumentParser:
    from tokenprune import __version__

    parser = argparse.ArgumentParser(
        prog="tokenprune", description="Training-free visual-token pruning for Hugging Face vision-language models."
    )
    parser.add_argument("--version", action="version", version=f"tokenprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="prune one prompt on an offline LLaVA-1.5-shaped model and print a timing table",
        description="Build a LLaVA-1.5-architecture model offline (576 visual tokens per image, random weights), "
        "run one prompt on a generated image unpruned and pruned, and print visual tokens, sequence length, "
        "prefill time (median of several runs), speed-up and which patches were kept.",
    )
    demo.add_argument("--method", default="divprune", help="pruning method (see `tokenprune methods`)")
    demo.add_argument("--keep", type=parse_keep, default=0.11, help="ratio in (0, 1] or token count (default 0.11)")
    demo.add_argument("--repeats", type=int, default=5, help="timed runs per setting after one warm-up (default 5)")

    methods = sub.add_parser("methods", help="list the available pruning methods",
                             description="List the pruning methods with their paper, stage and needed signals.")
    methods.add_argument("--json", action="store_true", help="print JSON instead of a table")

    tables = sub.add_parser(
        "tables", help="check (or --write) the generated method and family tables of README.md and docs/",
        description="Compare the tables between the <!-- tokenprune:begin NAME --> markers of README.md and docs/ "
        "with what the registry says (tokenprune.catalog); exit 1 if one is stale, or rewrite them with --write.")
    tables.add_argument("--write", action="store_true", help="rewrite the stale tables in place")
    tables.add_argument("--root", default=".", help="repository root (default: the current directory)")

    from tokenprune.viz.command import add_parser as add_visualize

    add_visualize(sub, parse_keep)

    from tokenprune.bench.cli import add_commands

    add_commands(sub)  # flops, bench, bench-selection, bench-decoder

    from tokenprune.integrations.vllm import serve_bench, serve_chat

    serve = sub.add_parser(
        "serve-bench", help="vLLM serving benchmark: `vllm serve` with and without pruning, ratios side by side",
        description=serve_bench.__doc__.split("\n\n")[0] + " Needs vLLM (make vllm-env); --dry-run does not.")
    serve_bench.add_arguments(serve)
    serve.set_defaults(handler=lambda args: serve_bench.handle(args, serve, two_turn=serve_chat.handle_two_turn))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    if args.command == "demo":
        from tokenprune.demo import run
        from tokenprune.methods import make_method

        try:
            make_method(args.method)
        except (TypeError, ValueError) as err:
            parser.error(str(err))
        if args.repeats < 1:
            parser.error("--repeats must be >= 1")
        run(method=args.method, keep=args.keep, repeats=args.repeats)
        return 0
    if args.command == "methods":
        from tokenprune.methods import METHODS

        info = {
            name: {"paper": cls.paper, "stage": cls.stage, "needs": sorted(cls.needs)}
            for name, cls in sorted(METHODS.items())
        }
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            width = max(map(len, info))
            for name, item in info.items():
                needs = ", ".join(item["needs"]) or "-"
                print(f"{name:<{width}}  {item['stage']:<7} needs: {needs:<14} {item['paper']}")
            from tokenprune.patches import ADAPTERS

            print(f"\nmodel types (config.model_type): {', '.join(ADAPTERS)}")
        return 0
    if args.command == "tables":
        from tokenprune.catalog import stale_files

        stale = stale_files(args.root, write=args.write)
        for name in stale:
            print(f"{'rewrote' if args.write and 'missing' not in name else 'stale'}: {name}")
        if not stale:
            print("generated tables are up to date")
        return 1 if stale and (not args.write or any("missing" in name for name in stale)) else 0
    if args.command == "visualize":
        from tokenprune.viz.command import run as visualize

        return visualize(args, parser)
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
