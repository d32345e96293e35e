"""Shared fixtures: tiny random models of every supported family, their saved folders, the real teacher, the
distillation tests' teacher/student folders and corpus, and the flow's services and tiny run config."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

# Tests never reach a hub; the cache of converted models and token blocks is shared across test sessions.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from minitron.config import load_config_file  # noqa: E402
from minitron.models import make_byte_tokenizer, save_model  # noqa: E402

pytest_plugins = ["tests.services"]  # real local services: moto S3, mlflow server (see tests/services.py)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "nemotron")

# GQA with 2 query heads per KV group, explicit head_dim, 4 layers: every slicing bug shows up at this size.
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, NemotronConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "nemotron": NemotronConfig}[family]
    kwargs = dict(TINY, eos_token_id=256, bos_token_id=256, pad_token_id=256)
    kwargs.update(overrides)
    return cls(**kwargs)


def build_tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny random *ForCausalLM in fp32 eval mode. Weights are non-trivial (no zero biases or unit norms), so a
    slicing mistake in any tensor changes the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))  # break the 1.0/0.0 init so norms and biases are tested too
    return model.eval()


@pytest.fixture
def tiny_model():
    """Factory: tiny_model("qwen2", tie_word_embeddings=False) → model."""
    return build_tiny_model


@pytest.fixture
def tiny_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> Path:
    """A saved tiny Llama folder with a tokenizer."""
    return save_model(build_tiny_model("llama"), tiny_tokenizer, tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real teacher, SmolLM2-135M-Instruct (converted once from the GGUF, then cached)."""
    from minitron.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def own_token_cache(tmp_path, monkeypatch):
    """Token stores in this test's own cache; converted models and the Shakespeare texts stay shared."""
    from minitron.models import cache_dir

    shared = cache_dir()
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    for name in ("models", "data"):
        if (shared / name).exists():
            (tmp_path / "cache" / name).symlink_to(shared / name)


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """A small folder of .txt documents (distinct, deterministic text)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly mobs".split()
    for d in range(12):
        paragraphs = [" ".join(words[(d * 7 + p * 3 + i) % len(words)] for i in range(40)) for p in range(5)]
        (folder / f"doc{d:02d}.txt").write_text("\n\n".join(paragraphs))
    return folder

# ----------------------------------------------------------------------------------------------------------------
# the distillation tests' models (test_distill_loop, test_distill_ddp, test_ray)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine makes 2 spinning OpenMP threads crawl
    (a module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def depth_pruned(teacher, keep=(0, 3)):
    """A student the way depth pruning makes one: the teacher with only some decoder layers left."""
    student = copy.deepcopy(teacher)
    layers = student.model.layers
    student.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def sharp_teacher():
    """A random tiny Llama with peaked next-token distributions (a scaled final norm), so the KL has room."""
    teacher = build_tiny_model("llama", seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(4.0)
    return teacher


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, tokenizer, teacher = tmp_path_factory.mktemp("models"), make_byte_tokenizer(), sharp_teacher()
    return (save_model(teacher, tokenizer, root / "teacher"),
            save_model(depth_pruned(teacher), tokenizer, root / "student"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 small documents of pseudo-words, once per module (shared by the runs compared below)."""
    folder = tmp_path_factory.mktemp("corpus")
    for d in range(12):
        paragraphs = [" ".join(f"w{(d * 31 + p * 13 + i * 7) % 97}" for i in range(60)) for p in range(5)]
        (folder / f"doc{d:02d}.txt").write_text("\n\n".join(paragraphs))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# the flow against real services (test_flow, test_ray)

TINY_YAML = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
BUCKET = "minitron-checkpoints"


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180), temporary_settings(
            {PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}):
        yield


@pytest.fixture
def services(prefect_harness, s3_env, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MINITRON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MINITRON_WORK", str(tmp_path / "home" / "work"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MINITRON_CHECKPOINT_STORE", f"s3://{BUCKET}/runs")
    return mlflow_server


def tiny(**overrides):
    return load_config_file(TINY_YAML, [f"{k}={v}" for k, v in overrides.items()])


def children_of(parent_id: str) -> dict:
    from tasks.tracking import child_runs

    return {r.info.run_name: r for r in child_runs(parent_id)}
