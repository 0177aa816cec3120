"""Guards for the environment traps of this CPU setup (torchvision next to the CPU torch wheel, the patches/ layout)."""

import importlib.util
import os
import subprocess
import sys

import torch


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


def test_each_test_process_runs_on_its_share_of_the_cores():
    """``make test`` runs pytest-xdist workers: together they start no more torch threads than there are cores (each
    ``cores // workers``, at least 1), and the processes a test starts get the same share; one process: 2 threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not workers:
        assert torch.get_num_threads() == 2
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    assert threads == max(1, cores // workers) and (workers * threads <= cores or threads == 1)
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True)
    assert int(child.stdout) == threads
