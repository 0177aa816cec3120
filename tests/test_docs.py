"""The README and the docs site: the README stays a short gateway, every code block marked runnable runs offline
as written and prints what its ``# -> ...`` comments promise, and the generated tables say what the registry says.

A block is runnable when the line before its fence is ``<!-- runnable -->``; ``<!-- runnable: vllm -->`` blocks
need the vLLM CPU build and run in ``tests_vllm/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tokenprune import catalog, disable_pruning, enable_pruning
from tokenprune.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "results" not in p.relative_to(ROOT / "docs").parts)
BLOCK = re.compile(r"<!-- runnable(?:: (\w+))? -->\n```python\n(.*?)```", flags=re.S)


def runnable_blocks(extra: str | None = None) -> list[tuple[str, str]]:
    """``(where, code)`` of every block marked runnable (``extra=None``) or ``runnable: <extra>``."""
    found = []
    for path in [README, *PAGES]:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            if match.group(1) == extra:
                line = text[: match.start()].count("\n") + 1
                found.append((f"{path.relative_to(ROOT)}:{line}", match.group(2)))
    return found


def expected_lines(code: str) -> list[str]:
    """What the block's ``print(...)  # -> text`` comments say it prints."""
    return [line.split("# -> ", 1)[1].strip() for line in code.splitlines() if "print(" in line and "# -> " in line]


def test_readme_is_a_short_gateway():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first_bash = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert [line.split()[0:2] for line in first_bash.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


def test_readme_links_point_at_files_that_exist():
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
    assert targets and [t for t in targets if not (ROOT / t).exists()] == []


def test_the_pages_that_promise_runnable_blocks_have_them():
    where = {w.split(":")[0] for w, _ in runnable_blocks()}
    assert {"docs/getting-started.md", "docs/families.md", "docs/new-method.md", "docs/synthetic-model.md"} <= where
    vllm = [w for w, _ in runnable_blocks("vllm")]
    assert vllm and all(w.startswith("docs/vllm.md") for w in vllm)


@pytest.mark.parametrize("where, code", runnable_blocks(), ids=[w for w, _ in runnable_blocks()])
def test_runnable_block_runs_as_written(where, code, capsys):
    registry = dict(METHODS)
    try:
        exec(compile(code, where, "exec"), {"__name__": "docs_snippet"})
    finally:  # a block may register a method (docs/new-method.md): the registry is restored
        METHODS.clear()
        METHODS.update(registry)
    printed = [line.strip() for line in capsys.readouterr().out.splitlines()]
    missing = [line for line in expected_lines(code) if line not in printed]
    assert missing == [], f"{where} did not print {missing}; it printed {printed}"


def test_expected_output_comments_are_checked():
    code = 'print("a")  # -> a\nprint(1 + 1)  # -> 2\nx = 3  # -> not a print'
    assert expected_lines(code) == ["a", "2"]


def test_committed_tables_match_the_registry():
    assert catalog.stale_files(ROOT) == [], "run `tokenprune tables --write` and commit the result"


def test_render_rewrites_only_between_markers():
    text = "a\n<!-- tokenprune:begin x -->\nold\n<!-- tokenprune:end x -->\nb <!-- tokenprune:begin y -->"
    assert catalog.render(text, {"x": "new"}) == text.replace("old", "new")
    with pytest.raises(KeyError, match="unknown generated table"):
        catalog.render("<!-- tokenprune:begin z -->\n<!-- tokenprune:end z -->", {"x": "new"})


def test_a_method_added_to_the_registry_appears_in_the_tables(monkeypatch):
    from tokenprune.methods import FEATURES, PruningMethod

    class Probe(PruningMethod):
        name = "probeonly"
        paper = "Probe paper (2099)"
        needs = frozenset({FEATURES})

    monkeypatch.setitem(METHODS, Probe.name, Probe)
    tables = catalog.tables()
    assert "| `probeonly` | vision | Probe paper (2099) | `features` |" in tables["methods-short"]
    assert "`probeonly`" in tables["methods-vision"] and "probeonly" not in tables["methods-decoder"]
    on_llava = len(METHODS) - sum(cls.video_only for cls in METHODS.values())  # video-only methods: no LLaVA-1.5
    assert f"| {on_llava} of {len(METHODS)} |" in tables["families"]  # runs on LLaVA-1.5 like every image method


def _tiny(model_type: str):
    from tokenprune.real_depth import REAL_DEPTH_FAMILIES, real_depth

    assert model_type in REAL_DEPTH_FAMILIES, (
        f"{model_type!r} has an adapter but no real-depth tiny builder: add it to tokenprune.real_depth.real_depth "
        "so that every method can be checked at its default layers")
    return real_depth(model_type)[0]


@pytest.mark.parametrize("model_type", sorted(catalog.adapters()))
def test_family_support_in_the_tables_is_what_enable_pruning_does(model_type):
    """The tables decide support without a model; here every method is enabled on a real-depth tiny model of the
    family (so every default layer exists) and must succeed exactly where the tables say it runs."""
    model = _tiny(model_type)
    adapter = catalog.adapters()[model_type]
    disagree = []
    for name, cls in sorted(METHODS.items()):
        reason = catalog.unsupported_reason(cls(), adapter, model_type)
        try:
            enable_pruning(model, name, keep=0.5)
            ran = True
        except (ValueError, NotImplementedError):
            ran = False
        finally:
            disable_pruning(model)
        if ran != (reason is None):
            disagree.append(f"{name}: tables say {'runs' if reason is None else reason!r}, enable_pruning {ran=}")
    assert disagree == []


def test_tables_command_checks_and_rewrites(tmp_path, capsys):
    from tokenprune.cli import main

    assert main(["tables", "--root", str(ROOT)]) == 0
    (tmp_path / catalog.SERVING_RESULT).parent.mkdir(parents=True)  # the serving table's source
    (tmp_path / catalog.SERVING_RESULT).write_text((ROOT / catalog.SERVING_RESULT).read_text())
    for name in catalog.TABLE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        text = (ROOT / name).read_text()
        (tmp_path / name).write_text(re.sub(r"(<!-- tokenprune:end \S+ -->)", r"| `gone` | stale row |\n\1", text))
    assert main(["tables", "--root", str(tmp_path)]) == 1
    assert "stale: README.md" in capsys.readouterr().out
    assert main(["tables", "--root", str(tmp_path), "--write"]) == 0
    assert all((tmp_path / n).read_text() == (ROOT / n).read_text() for n in catalog.TABLE_FILES)
    assert "| 0.25 | 154 |" in catalog.serving_table(tmp_path)  # generated from the committed serve-bench result
    (tmp_path / "README.md").write_text("no markers")
    assert main(["tables", "--root", str(tmp_path), "--write"]) == 1  # markers must be placed by hand
