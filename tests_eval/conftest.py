"""Fixtures of the offline lmms-eval smoke run: a generated local task and tiny saved models (run in .venv-eval)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TASK = "tokenprune_tiny_vqa"
QUESTIONS = [("what color is the circle ?", "red"), ("how many are there ?", "two"), ("is there a dog ?", "no")]

# What the released chat wrappers need: messages with content lists ({"type": "image"} / {"type": "text"}).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER : {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT : {% for c in message['content'] %}{{ c['text'] }}{% endfor %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% if message['role'] == 'user' %}USER : {% else %}ASSISTANT : {% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
# InternVL's and Gemma 3's image placeholders (each processor expands its own into the image's tokens).
INTERNVL_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace("<image>\n", "<IMG_CONTEXT>\n")
GEMMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER : {% elif message['role'] == 'system' %}"
    "SYSTEM : {% else %}ASSISTANT : {% endif %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def write_task(root: Path, n: int = 6, size: int = 64) -> Path:
    """A ``load_from_disk`` dataset of ``n`` generated pictures with questions (``size`` px wide; every other one
    ``size`` px high, the rest 7/8, 9/8, 11/8 ... of it), and its task YAML; returns the ``--include_path`` folder."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    from tokenprune.tiny_models import demo_image, random_image

    images = [demo_image(size) if i % 2 == 0 else random_image(size * (6 + i) // 8, size, seed=i) for i in range(n)]
    rows = {
        "question_id": [str(i) for i in range(n)],
        "image": images,
        "question": [QUESTIONS[i % len(QUESTIONS)][0] for i in range(n)],
        "answer": [QUESTIONS[i % len(QUESTIONS)][1] for i in range(n)],
    }
    features = Features(question_id=Value("string"), image=Image(), question=Value("string"), answer=Value("string"))
    data_dir = root / "data"
    DatasetDict({"test": Dataset.from_dict(rows, features=features)}).save_to_disk(str(data_dir))
    task_dir = root / "tasks"
    task_dir.mkdir()
    shutil.copy(HERE / "tiny_task_utils.py", task_dir / "utils.py")
    (task_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        f"dataset_path: {data_dir}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 3\n  temperature: 0\n  do_sample: false\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: accuracy\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: nonempty\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return task_dir


def save_tiny_llava(path: Path) -> Path:
    from tokenprune.tiny_models import tiny_llava

    model, processor = tiny_llava()
    processor.chat_template = LLAVA_CHAT_TEMPLATE
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


QWEN_PROCESSORS = {"2": "Qwen2VLProcessor", "2.5": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
                   "qwen3_5": "Qwen3VLProcessor"}


def save_tiny_qwen(path: Path, version: str) -> Path:
    """A tiny Qwen2-VL (``"2"``), Qwen2.5-VL (``"2.5"``), Qwen3-VL (``"qwen3_vl"``) or Qwen3.5 (``"qwen3_5"``) with
    the real processor class the lmms-eval wrapper loads, minus its video processor (no torchvision here)."""
    import transformers

    from tokenprune.integrations.image_only_processors import image_only_qwen_processor
    from tokenprune.tiny_models import tiny_qwen
    from tokenprune.tiny_qwen3 import tiny_qwen3

    model, tiny = tiny_qwen(version) if version in ("2", "2.5") else tiny_qwen3(version)
    base = getattr(transformers, QWEN_PROCESSORS[version])
    processor = image_only_qwen_processor(base)(tiny.image_processor, tiny.tokenizer, QWEN_CHAT_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_onevision(path: Path) -> Path:
    """A tiny LLaVA-OneVision with the real ``LlavaOnevisionProcessor`` minus its video processor (what
    ``tokenprune_llava_hf`` loads without torchvision)."""
    from tokenprune.integrations.image_only_processors import image_only_onevision_processor
    from tokenprune.tiny_onevision import tiny_onevision

    model, tiny = tiny_onevision()
    processor = image_only_onevision_processor()(
        tiny.image_processor, tiny.tokenizer, num_image_tokens=tiny.num_image_tokens,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy, chat_template=LLAVA_CHAT_TEMPLATE,
        vision_aspect_ratio=tiny.vision_aspect_ratio,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_internvl(path: Path) -> Path:
    """A tiny InternVL3 with the real ``InternVLProcessor`` minus its video processor, and a tokenizer that names
    InternVL's image tokens as the released ones do (``start_image_token``, ``context_image_token``, ...)."""
    from tokenprune.integrations.image_only_processors import image_only_internvl_processor
    from tokenprune.tiny_internvl import named_tokenizer, tiny_internvl

    model, tiny = tiny_internvl()
    processor = image_only_internvl_processor()(
        tiny.image_processor, named_tokenizer(tiny.tokenizer), image_seq_length=tiny.image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_gemma3(path: Path) -> Path:
    """A tiny Gemma 3 with its real ``Gemma3Processor`` (builds without torchvision)."""
    from tokenprune.tiny_gemma3 import tiny_gemma3

    model, processor = tiny_gemma3()
    processor.chat_template = GEMMA3_CHAT_TEMPLATE
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lmms_eval_smoke")


@pytest.fixture(scope="session")
def task_dir(workdir) -> Path:
    return write_task(workdir)


@pytest.fixture(scope="session")
def large_task_dir(workdir) -> Path:
    """The same task with 128 px pictures (more than a few visual tokens for wrappers that keep the image size)."""
    return write_task(workdir / "large", size=128)


@pytest.fixture(scope="session")
def llava_dir(workdir) -> Path:
    return save_tiny_llava(workdir / "tiny_llava")


@pytest.fixture(scope="session")
def qwen2_dir(workdir) -> Path:
    return save_tiny_qwen(workdir / "tiny_qwen2", "2")


@pytest.fixture(scope="session")
def qwen25_dir(workdir) -> Path:
    return save_tiny_qwen(workdir / "tiny_qwen25", "2.5")

