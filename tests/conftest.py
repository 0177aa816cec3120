import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tokenprune import enable_pruning  # noqa: E402
from tokenprune.tiny_models import random_image, tiny_llava  # noqa: E402

PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
OTHER_PROMPT = "USER : <image>\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"
TWO_IMAGES = "USER : <image>\n<image>\nhow many dog are there ? ASSISTANT :"
# The tiny vision towers have 2-3 layers: methods whose official layer lies deeper are pointed at an existing one.
TINY_OPTIONS = {"hiprune": {"object_layer": 0}}


def runnable_methods(model_type="llava"):
    """Registered vision-side methods that can run on images, on LLaVA-1.5 by default; in-encoder methods (FlowCut)
    only where the family's adapter runs the encoder's layer loop. Decoder-stage methods: ``decoder_methods()``;
    video-only methods: ``video_methods()``."""
    from tokenprune.methods import METHODS
    from tokenprune.patches import ADAPTERS

    loop = ADAPTERS[model_type].encoder_loop
    return sorted(
        name for name, cls in METHODS.items()
        if not cls.unavailable and not cls.video_only
        and (cls.stage == "vision" or (cls.stage == "vision-encoder" and loop))
    )


def moved_parameters(model, run) -> set[str]:
    """Names of ``model``'s parameters that ``run()`` changed."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def assert_trains_projector_and_lm_only(model, run) -> None:
    """``run()`` (a stage of the synthetic model's recipe) moves the projector and the LM and never the ViT."""
    moved = moved_parameters(model, run)
    assert moved and not any("vision_tower" in n for n in moved)
    assert any("multi_modal_projector" in n for n in moved) and any("language_model" in n for n in moved)


def hook_and_attribute_census(model):
    """Everything enable_pruning could leave behind: instance attributes and hooks of every module."""
    hooks = {
        name: tuple(len(getattr(m, attr)) for attr in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
            "_state_dict_hooks", "_load_state_dict_pre_hooks", "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
        ))
        for name, m in model.named_modules()
    }
    return set(model.__dict__), {n: set(m.__dict__) for n, m in model.named_modules()}, hooks


def decoder_methods():
    """Registered decoder-stage (in-LLM) methods."""
    from tokenprune.methods import METHODS

    return sorted(name for name, cls in METHODS.items() if cls.stage == "decoder")


def two_stage_methods():
    """Registered two-stage methods (one name that prunes before and inside the LLM, e.g. ToDRE)."""
    from tokenprune.methods import METHODS

    return sorted(name for name, cls in METHODS.items() if cls.stage == "two-stage" and not cls.video_only)


def video_methods():
    """Registered methods that merge the frames of a video (HoliTom): they decline images (at the call) and
    families without whole-video units (at enable time); their invariants live in tests/test_holitom.py (the
    functions) and tests/test_holitom_models.py (on models)."""
    from tokenprune.methods import METHODS

    return sorted(name for name, cls in METHODS.items() if cls.video_only)


def worker_threads() -> int:
    """Torch threads for this test process. One process (plain ``pytest``): 2. Under pytest-xdist (``make test``)
    each worker takes its share of the cores, ``cores // workers`` and at least 1, so that N workers never run more
    threads than there are cores (OpenMP threads spinning against each other cost 10-50x on a busy machine)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not workers:
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


THREADS = worker_threads()
torch.set_num_threads(THREADS)
if "PYTEST_XDIST_WORKER" in os.environ:  # processes a test starts (notebook kernels, the CLI) take the same share
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Every test leaves torch's thread count as it found it: a test (or the bench code it calls, which sets
    ``--threads``) that changes it must not change the share the following tests of this worker run on."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): they gain
    nothing from a second thread, and on a loaded machine OpenMP's spinning makes each op far slower with two
    (measured: a Qwen3.5 tiny generate 5.2 s -> 0.1 s); restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["eager", "sdpa"])
def attn(request):
    return request.param


@pytest.fixture
def llava(attn):
    return tiny_llava(attn_implementation=attn)


def encode(processor, prompts, images):
    """Processor output for a batch (left padding), images in prompt order."""
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@pytest.fixture
def one_prompt(llava):
    _, processor = llava
    return encode(processor, [PROMPT], [random_image(80, 96, seed=1)])


# Spans hold merged rows (or a data-dependent count): oracle in tests/test_methods_vision.py.
MERGING = {"visionzip", "visiondrop", "recoverable"}
# Decoder-stage layers on the 4-LLM-layer tiny models of the family files, so that every method prunes at least once.
DECODER_OPTIONS = {"fastv": {"k": 2}, "dart": {"k": 2}, "feather": {"layers": (1, 2)},
                   "transprune": {"layers": (1, 2, 3)}, "todre": {"layer": 1, "tau": 1.0},
                   "sparsevlm": {"layers": (0, 1, 2)}, "adaptinfer": {"layers": (0, 1, 2)},
                   "vflowopt": {"layers": (1, 2)}}
DECODER_OPTIONS["catp"] = {"layer": 1}  # 4 layers: in-context pool scored at 0 and 1, cut from 2; query from 3


def enable(model, method, keep, **kwargs):
    return enable_pruning(model, method, keep=keep, **TINY_OPTIONS.get(method, {}), **kwargs)


def runs_without_cls(name: str) -> bool:
    """Can the registered method ``name`` run on a vision tower without a [CLS] token (Qwen3-VL, Gemma 3)?"""
    from tokenprune.methods import METHODS

    try:
        METHODS[name].signals_needed(cls_token=False)
    except ValueError:
        return False
    return True


def left_clean(model) -> bool:
    """No pruning handle and no instance ``forward``/``generate`` left on the model, nor (Qwen's M-RoPE) cached
    ``rope_deltas``."""
    from tokenprune.api import _HANDLE_ATTR

    rope_deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
    return not ({_HANDLE_ATTR, "forward", "generate"} & set(model.__dict__)) and rope_deltas is None


def built(cache, key, build):
    """``cache[key]`` (a module-level dict of tiny models), built by ``build()`` on first use only (unlike
    ``cache.setdefault(key, build())``, which builds a model on every call and throws it away)."""
    if key not in cache:
        cache[key] = build()
    return cache[key]


def cached_model(cache, key, build):
    """The body of a family's model fixture: :func:`built`'s ``(model, processor)``, yielded; pruning a test left
    on is removed after it. Use as ``yield from cached_model(_MODELS, attn, lambda: tiny_gemma3(attn))``."""
    from tokenprune.api import _HANDLE_ATTR, disable_pruning

    model, processor = built(cache, key, build)
    yield model, processor
    if _HANDLE_ATTR in model.__dict__:
        disable_pruning(model)


def cached_and_uncached_record(model, inputs, **gen):
    """``model.generate(**inputs, **gen)`` with and without the KV cache: both return the prompt's own ids first and
    the same ids (a pruned cache answers as a full recompute of the pruned sequence). Returns ``(ids, record)``: the
    pruning record of the cached run (read before the uncached run, whose steps replace ``handle.last``), ``None``
    on an unpruned model."""
    from tokenprune import get_handle

    handle = get_handle(model)
    with torch.no_grad():
        cached = model.generate(**inputs, **gen)
        record = None if handle is None else handle.last
        uncached = model.generate(**inputs, **gen, use_cache=False)
    prompt = inputs["input_ids"]
    assert torch.equal(cached[:, : prompt.shape[1]], prompt)
    assert torch.equal(cached, uncached)
    return cached, record


def generate_cached_and_uncached(model, inputs, **gen):
    """The ids of :func:`cached_and_uncached_record`."""
    return cached_and_uncached_record(model, inputs, **gen)[0]


def generate_cached_and_uncached_logits(model, inputs, **gen):
    """:func:`generate_cached_and_uncached` step by step: the same ids, and every step's logits within 1e-4 (the
    positions, masks and pruned KV cache of a cached step agree with a full recompute). Returns the cached run's
    output (``sequences``, ``logits``)."""
    gen = dict(gen, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **gen)
        uncached = model.generate(**inputs, **gen, use_cache=False)
    prompt = inputs["input_ids"]
    assert torch.equal(cached.sequences[:, : prompt.shape[1]], prompt)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_uncached, rtol=1e-4, atol=1e-4)
    return cached


def assert_rows_match_alone(model, rows: list[dict], batch: dict):
    """Each row of the padded ``batch`` keeps the same tokens of each of its images and gives the same last-position
    logits (within 1e-4) as its prompt alone (``rows``: the inputs of each row's prompt, in order). Returns the
    record of the batch's forward."""
    from tokenprune import get_handle

    handle = get_handle(model)
    alone_logits, alone_kept = [], []
    with torch.no_grad():
        for inputs in rows:
            alone_logits.append(model(**inputs).logits[0, -1])
            alone_kept += [im.kept for im in handle.last.images]
        logits = model(**batch).logits[:, -1]
    record = handle.last
    assert all(torch.equal(a, b) for a, b in zip(alone_kept, [im.kept for im in record.images], strict=True))
    for row, out in enumerate(alone_logits):
        torch.testing.assert_close(logits[row], out, rtol=1e-4, atol=1e-4)
    return record


def assert_keep_all_is_unpruned(model, inputs, enable_all, **gen):
    """``enable_all()`` (pruning at keep=1.0, returning its handle) gives the unpruned model's logits and greedy ids
    bit for bit; ``disable_pruning`` then leaves no handle, hook or attribute behind (:func:`left_clean`, and the
    census taken after a first unpruned generate, which adds HF attributes of its own) and the unpruned logits
    again. Returns the keep=1.0 record."""
    from tokenprune import disable_pruning

    with torch.no_grad():
        ref_logits, ref_ids = model(**inputs).logits, model.generate(**inputs, **gen)
        census = hook_and_attribute_census(model)
        handle = enable_all()
        logits, ids = model(**inputs).logits, model.generate(**inputs, **gen)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    disable_pruning(model)
    assert left_clean(model) and hook_and_attribute_census(model) == census
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)
    return handle.last
