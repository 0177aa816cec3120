"""``tokenprune visualize``: writes a valid PNG, with the built-in model or a checkpoint loaded by path."""

import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from tokenprune import tiny_models
from tokenprune.cli import build_parser, main
from tokenprune.viz import GAP, HEADER, LEGEND

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "photo.jpg"
    tiny_models.demo_image(96).save(path)
    return path


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["visualize", "--help"])
    assert exit_.value.code == 0
    assert "--method" in capsys.readouterr().out


def test_builtin_model_writes_the_overlay_next_to_the_working_directory(picture, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["visualize", str(picture), "--method", "uniform", "--keep", "16", "--size", "200"]) == 0
    out = capsys.readouterr().out
    assert "uniform: kept 16/256 visual tokens" in out
    assert assert_png(tmp_path / "photo.tokenprune.png") == (200, HEADER + 200 + LEGEND)


def test_model_path_and_a_grid_of_methods_and_budgets(picture, tmp_path, capsys):
    model, processor = tiny_models.tiny_llava()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    out = tmp_path / "grid.png"
    argv = ["visualize", str(picture), "--model", str(checkpoint), "--method", "random,uniform", "--keep", "0.5,8",
            "--prompt", "USER : <image>\nhow many dog ? ASSISTANT :", "-o", str(out), "--size", "100"]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    width, height = assert_png(out)
    assert width > 2 * 100 and height == 2 * HEADER + 2 * (HEADER + 100 + GAP) + LEGEND


@pytest.mark.parametrize("extra, message", [
    (["--method", "nope"], "known methods"), (["--keep", "0.2,many"], "ratio like 0.11"),
    (["--keep", "1.5"], "(0, 1]"), (["--size", "3"], "--size"),
])
def test_bad_arguments(picture, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["visualize", str(picture), *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(SystemExit) as exit_:
        main(["visualize", str(bad)])
    assert exit_.value.code == 2
    assert "cannot read IMAGE" in capsys.readouterr().err


def test_docs_picture_is_committed_and_made_by_the_command_shown(tmp_path):
    """The docs' "See what was kept" page: its command is a valid `visualize` call writing the picture shown."""
    root = Path(__file__).resolve().parents[1]
    page = root / "docs" / "visualize.md"
    section = page.read_text()
    command = next(line for line in section.splitlines() if line.startswith("tokenprune visualize"))
    args = build_parser().parse_args(shlex.split(command)[1:])
    picture = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", section).group(1)
    path = (page.parent / picture).resolve()
    assert (root / str(args.out)).resolve() == path  # the command (run from the repository root) writes the picture
    assert path.stat().st_size < 200_000
    width, height = assert_png(path)
    rows, columns = len(args.method), len(args.keep)
    assert height == 2 * HEADER + rows * (HEADER + args.size + GAP) + LEGEND and width > columns * args.size


def test_internvl_checkpoint_without_torchvision_draws_tiles_and_thumbnail(tmp_path, capsys):
    """An InternVL checkpoint (AutoProcessor cannot build its processor without torchvision: the real one minus its
    video processor is loaded) and a picture cut into several tiles: tiles panel + thumbnail panel."""
    from tokenprune.integrations.image_only_processors import image_only_internvl_processor
    from tokenprune.tiny_internvl import named_tokenizer, tiny_internvl

    model, tiny = tiny_internvl()
    checkpoint = tmp_path / "internvl"
    model.save_pretrained(checkpoint)
    image_only_internvl_processor()(tiny.image_processor, named_tokenizer(tiny.tokenizer),
                                    image_seq_length=tiny.image_seq_length).save_pretrained(checkpoint)
    picture = tmp_path / "wide.png"
    tiny_models.random_image(128, 192, seed=0).save(picture)  # 192 px wide: 2 x 2 tiles at most 4 tiles
    out = tmp_path / "tiles.png"
    argv = ["visualize", str(picture), "--model", str(checkpoint), "--method", "divprune", "--keep", "0.25",
            "--prompt", "USER : <IMG_CONTEXT>\nwhat is it ? ASSISTANT :", "-o", str(out), "--size", "120"]
    assert main(argv) == 0
    assert "divprune: kept 20/80 visual tokens" in capsys.readouterr().out  # 2 x 2 tiles + thumbnail, 16 each
    width, height = assert_png(out)
    assert width >= 2 * 120 + GAP and height == HEADER + 80 + LEGEND
