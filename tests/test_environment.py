"""Guards for the environment traps of this CPU setup (torchvision next to the CPU torch wheel, the patches/ layout)."""

import importlib.util
import subprocess
import sys


def test_torchvision_is_absent_or_importable():
    """A torchvision that does not match torch breaks transformers' image processors (feasibility §1)."""
    if importlib.util.find_spec("torchvision") is None:
        return
    result = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    assert result.returncode == 0, (
        "torchvision is installed but does not import next to this torch; it breaks the image processors. "
        f"Uninstall it (pip uninstall torchvision).\n{result.stderr[-500:]}"
    )


def test_installed_as_tokenprune_patches():
    import tokenprune.patches

    assert tokenprune.patches.ADAPTERS["llava"].__module__ == "tokenprune.patches.llava"
