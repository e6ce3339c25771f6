"""Build FlashInfer's JIT kernels for one dtype and head_dim ahead of the GPU tests and benchmarks, so that several
builds can run side by side (each takes a minute or more): `python bench/flashinfer_warmup.py bf16 128 &`.
It runs the flashinfer backend's prefill and dense and sparse decode (query groups 4 and 7) on a small cache."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from quest_core import kernels  # noqa: E402

kernels.load = lambda: None  # our own kernels build elsewhere; here only FlashInfer's
from quest_core.backend_flashinfer import FlashInferBackend  # noqa: E402
from quest_core.paged_cache import PagedLayer  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main(dtype_name: str, head_dim: str):
    dtype, head_dim = DTYPES[dtype_name], int(head_dim)
    backend = FlashInferBackend("cuda")
    for group in (4, 7):
        layer = PagedLayer(16)
        layer.update(*torch.randn(2, 1, 2, 100, head_dim, device="cuda", dtype=dtype))
        backend.prefill(torch.randn(2 * group, 100, head_dim, device="cuda", dtype=dtype), layer, head_dim ** -0.5)
        query = torch.randn(2, group, head_dim, device="cuda", dtype=dtype)
        backend.decode_dense(query, layer, head_dim ** -0.5)
        backend.decode_sparse(query, layer, backend.select(query, layer, 3, "sum"), head_dim ** -0.5)
    torch.cuda.synchronize()
    print(f"FlashInfer kernels ready: {dtype_name}, head_dim {head_dim}")


if __name__ == "__main__":
    main(*sys.argv[1:])
