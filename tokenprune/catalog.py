"""The method and family tables of the README and the docs, computed from the registry so they cannot drift (and the
architecture page's room diagram, computed from the imports: :mod:`tokenprune.import_graph`).

Everything comes from the code: the methods (:data:`tokenprune.methods.METHODS`: name, stage, paper, the signals
they declare, their dataclass defaults, a decoder method's layer plan) and the adapters
(:data:`tokenprune.patches.ADAPTERS`: which signals a family computes, whether its vision tower has a [CLS] token,
whether it runs the encoder's layer loop). Whether a method runs on a family is decided by the same checks that
``enable_pruning`` runs (:meth:`PruningMethod.check_family` and the adapter's signal list), without a model.

The committed tables sit between ``<!-- tokenprune:begin NAME -->`` and ``<!-- tokenprune:end NAME -->`` in the
files of :data:`TABLE_FILES`; ``tokenprune tables --write`` rewrites them and a test fails when they are stale.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenprune.import_graph import room_diagram
from tokenprune.methods import METHODS, PruningMethod, TwoStageMethod
from tokenprune.methods.decoder_base import DecoderMethod

# Display names of the families; a model_type missing here is shown as itself.
FAMILY_NAMES = {
    "llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE", "qwen3_5": "Qwen3.5", "qwen3_5_moe": "Qwen3.5-MoE",
    "gemma3": "Gemma 3",
}
FAMILY_NAMES["internvl"] = "InternVL3"
FAMILY_NAMES["llava_onevision"] = "LLaVA-OneVision"
REFERENCE_DEPTH = 32  # LLM depth at which decoder plans are shown (LLaVA-1.5-7B's 32 layers)
STAGE_PAGES = {"vision": "vision", "vision-encoder": "vision", "decoder": "decoder", "two-stage": "two-stage"}
# Which generated table goes into which committed file (relative to the repository root).
TABLE_FILES = {
    "README.md": ("families", "methods-short", "serving"),
    "docs/families.md": ("families",),
    "docs/methods/index.md": ("methods",),
    "docs/methods/vision.md": ("methods-vision",),
    "docs/methods/decoder.md": ("methods-decoder",),
    "docs/methods/two-stage.md": ("methods-two-stage",),
    "docs/architecture.md": ("architecture",),
}


def adapters() -> dict:
    """``model_type -> adapter class`` (late import: the adapters import the core)."""
    from tokenprune.patches import ADAPTERS

    return dict(ADAPTERS)


def family_name(model_type: str) -> str:
    return FAMILY_NAMES.get(model_type, model_type)


def unsupported_reason(method: PruningMethod, adapter: type, model_type: str | None = None) -> str | None:
    """Why ``method`` (an instance with default options) cannot run on ``adapter``'s family (``model_type``: the
    first of the adapter's), or None if it can."""
    model_type = model_type or adapter.model_types[0]
    vision, decoder = method.stages() if isinstance(method, TwoStageMethod) else (method, None)
    if vision.stage == "decoder":
        vision, decoder = None, vision
    if vision is not None and vision.video_only and not adapter.video_units:
        return "merges the frames of a video; this adapter does not hand it whole videos"
    try:
        method.check_family(adapter.cls_token)
        if decoder is not None:
            first = min(stage.layer for stage in decoder.plan(REFERENCE_DEPTH))
            reason = adapter.decoder_reason(model_type, decoder.name, first)
            if reason:
                return reason
            adapter.decoder_plan(decoder.name, decoder.plan(REFERENCE_DEPTH), model_type=model_type)  # Qwen3.5
            if decoder.sparse_ffn() and adapter.mixture_of_experts(model_type):
                return "sparsifies the FFN's neurons; this family's LLM FFNs are mixtures of experts"
        if vision is None:
            return None  # the decoder loop is shared by every family
        missing = vision.signals_needed(adapter.cls_token) - adapter.signals
        reason = adapter.method_reason(vision)
        if reason:
            return reason
    except (ValueError, NotImplementedError) as err:
        return str(err)
    if vision.stage == "vision-encoder" and not adapter.encoder_loop:
        return "prunes inside the vision encoder's layer loop, which this adapter does not run"
    if missing:
        return f"needs {sorted(missing)}, which this adapter does not compute"
    return None


def supported_families(method: PruningMethod) -> list[str]:
    return [t for t, adapter in adapters().items() if unsupported_reason(method, adapter, t) is None]


def _signals(method: PruningMethod, cls_token: bool) -> str:
    vision = method.stages()[0] if isinstance(method, TwoStageMethod) else method
    if vision.stage == "decoder":
        return "-"
    try:
        needs = vision.signals_needed(cls_token)
    except (ValueError, NotImplementedError):
        return "✗"
    return ", ".join(f"`{s}`" for s in sorted(needs)) or "none"


def _plan(method: PruningMethod) -> str:
    """Where a decoder stage prunes on a 32-layer LLM: ``layer (scored at)`` per stage."""
    decoder = method.stages()[1] if isinstance(method, TwoStageMethod) else method
    if not isinstance(decoder, DecoderMethod):
        return "-"
    try:
        plan = decoder.plan(REFERENCE_DEPTH)
    except (ValueError, NotImplementedError):
        return "-"
    return "layers " + ", ".join(f"{p.layer} ({p.score_layer})" for p in plan) + f", {decoder.positions.upper()}"


def _defaults(method: PruningMethod) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in method.options().items()) or "-"


def _families(method: PruningMethod) -> str:
    names = supported_families(method)
    return "all" if names == list(adapters()) else ", ".join(family_name(t) for t in names) or "none yet"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _instances(stage_page: str | None = None) -> list[PruningMethod]:
    return [cls() for name, cls in sorted(METHODS.items())
            if stage_page is None or STAGE_PAGES.get(cls.stage, cls.stage) == stage_page]


def method_table(stage_page: str | None = None) -> str:
    """The full table (every method, or one docs page's stage group): paper, signals, families, defaults."""
    header = ["name", "stage", "paper", "signals ([CLS] towers)", "signals (no [CLS])",
              f"decoder stage on {REFERENCE_DEPTH} layers: pruned (scored at), positions on LLaVA", "families",
              "defaults"]
    rows = [[f"`{m.name}`", m.stage, m.paper, _signals(m, True), _signals(m, False), _plan(m), _families(m),
             _defaults(m)] for m in _instances(stage_page)]
    return _table(header, rows)


def short_method_table() -> str:
    """The README's table: name, stage, paper, signal."""
    rows = []
    for m in _instances():
        parts = [_signals(m, True) if m.stage != "decoder" else "", "" if _plan(m) == "-" else f"LLM {_plan(m)}"]
        rows.append([f"`{m.name}`", m.stage, m.paper, "; then ".join(p for p in parts if p)])
    return _table(["name", "stage", "paper", "signal"], rows)


def family_table() -> str:
    """One row per ``model_type``: adapter, [CLS] token, decoder positions, how many methods run there."""
    methods = _instances()
    rows = []
    for model_type, adapter in adapters().items():
        runs = [m.name for m in methods if unsupported_reason(m, adapter, model_type) is None]
        cannot = sorted(set(METHODS) - set(runs))
        rows.append([
            family_name(model_type), f"`{model_type}`", f"`{adapter.__module__}.{adapter.__name__}`",
            "yes" if adapter.cls_token else "no", "KEEP" if adapter.decoder_keep_positions else "per method",
            f"{len(runs)} of {len(METHODS)}", ", ".join(f"`{n}`" for n in cannot) or "-",
        ])
    header = ["family", "`model_type`", "adapter", "[CLS] token", "decoder positions", "methods", "cannot run"]
    return _table(header, rows)


def tables() -> dict[str, str]:
    """Every generated table by marker name."""
    out = {"families": family_table(), "methods": method_table(), "methods-short": short_method_table()}
    out.update({f"methods-{page}": method_table(page) for page in sorted(set(STAGE_PAGES.values()))})
    out["architecture"] = room_diagram()  # the rooms and arrows of the package, from its imports
    return out


SERVING_RESULT = "benchmarks/results/serve_llava.json"  # the committed `tokenprune serve-bench` run (docs/vllm.md)


def serving_table(root: str | Path) -> str:
    """The README's serving table from the committed serve-bench result under ``root``: per keep, the prompt length
    and the server's time to first token, throughput and KV-cache blocks as ratios pruned / unpruned (the full
    table with absolute figures is in docs/vllm.md)."""
    import json

    path = Path(root) / SERVING_RESULT
    if not path.exists():
        return f"(no `{SERVING_RESULT}`: run `tokenprune serve-bench` in `.venv-vllm`, docs/vllm.md)"
    run = json.loads(path.read_text())
    server, offline, base = run["server"], run["offline"], run["server"]["unpruned"]
    rows = []
    for keep in ["unpruned", *(str(k) for k in run["plan"]["keeps"])]:
        got = server[keep]
        rows.append([keep, str(offline[keep]["prompt_tokens"]),
                     *(f"{got[key] / base[key]:.2f}" for key in
                       ("ttft_p50_s", "ttft_p99_s", "requests_per_s", "output_tokens_per_s", "kv_blocks_peak"))])
    header = ["keep", "prompt tokens", "TTFT p50", "TTFT p99", "requests/s", "output tokens/s", "KV blocks"]
    return _table(header, rows)


def render(text: str, generated: dict[str, str]) -> str:
    """``text`` with every marked table replaced by its generated version."""
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in generated:
            raise KeyError(f"unknown generated table {name!r}; known: {sorted(generated)}")
        return f"<!-- tokenprune:begin {name} -->\n{generated[name]}\n<!-- tokenprune:end {name} -->"

    return re.sub(r"<!-- tokenprune:begin (\S+) -->\n.*?<!-- tokenprune:end \1 -->", replace, text, flags=re.S)


def stale_files(root: str | Path, write: bool = False) -> list[str]:
    """The files of :data:`TABLE_FILES` under ``root`` whose tables differ from the registry (rewritten if
    ``write``). A file that lacks one of its markers counts as stale (the marker must be placed by hand)."""
    root = Path(root)
    generated = {**tables(), "serving": serving_table(root)}
    stale = []
    for name, expected in TABLE_FILES.items():
        path = root / name
        text = path.read_text() if path.exists() else ""
        new = render(text, generated)
        missing = [t for t in expected if f"<!-- tokenprune:begin {t} -->" not in text]
        if new != text or missing:
            stale.append(name + (f" (markers missing: {', '.join(missing)})" if missing else ""))
            if write and not missing:
                path.write_text(new)
    return stale
