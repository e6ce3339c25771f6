"""Choosing an attention backend: `auto` takes flashinfer (with our CUDA kernels) on CUDA when it imports, else
torch; a backend that cannot run here falls back to torch with a log line, never silently."""
import logging

import torch

from .backend_torch import TorchBackend

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "flashinfer")


def make_backend(name: str, device) -> object:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchBackend()
    if device.type != "cuda":
        return _fallback("the flashinfer backend needs CUDA")
    try:
        from .backend_flashinfer import FlashInferBackend

        return FlashInferBackend(device)
    except ImportError as error:
        return _fallback(f"FlashInfer is not importable ({error})")


def _fallback(reason: str) -> TorchBackend:
    """The torch backend, logged, with `fallback_reason` saying why the one asked for cannot run (the app shows it)."""
    log.warning("%s; using the torch backend", reason)
    backend = TorchBackend()
    backend.fallback_reason = reason
    return backend
