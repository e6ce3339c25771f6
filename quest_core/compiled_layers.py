"""torch.compile of the model's decoder layers, for the CUDA-graph decode step (quest_core/cuda_graph.py).

A batch-1 decode step of an 8B model runs about 1,500 kernels, half of them tiny element-wise ones (RMSNorm alone
is seven, RoPE about ten); in a CUDA graph each still costs a launch slot. Inductor fuses them into a few Triton kernels
per layer. On CUDA it also autotunes the matrix products ("max-autotune-no-cudagraphs": the CUDA graph is ours),
timing Triton's kernels against cuBLAS for each shape: on the H200 an 8B decode step at 128K went from 6.90 to
6.23 ms with Quest and from 11.47 to 10.75 ms dense, for about 25 s more compiling at the first answer (issue 4's
note). Our parts stay outside the compiled graphs: `QuestCache.update`
and the quest attention are `torch.compiler.disable`d, so Dynamo breaks the graph around them (quest_core/hf.py).
Both breaks are inside the attention module's forward, a call nested in the layer's; by default Dynamo also splits the
layer where that call starts and returns, four graphs a layer (the input RMSNorm alone, q/k/v with RoPE, the o
product alone, the MLP). With `nested_graph_breaks` (where this torch's Dynamo has it) it resumes inside the nested
call: two graphs a layer, up to the cache update and after the attention, and Inductor fuses the RMSNorm into the
q/k/v products. On the H200 (probe of 2026-12-03, Llama-3.1-8B shapes, Quest budget 2048, one run, two answers of 128
tokens each way) Quest went from 195.3-195.7 to 202.9-203.6 tok/s at 32K and from 175.9-176.0 to 182.2-182.3 at
128K; on 2 CPU cores the tests' tiny Llama compiles in 7 s instead of 17.

Only the graph decoders' eager warm-up steps and their captures run the compiled layers, which the replays then
repeat; prefill and every other path run the model as it is. The batch graphs (several requests a step) compile
without autotuning: on the H200 with Llama-3.1-8B shapes, 8 requests at 32K, the matrix products of a step took
4.84 ms autotuned (Triton's kernels won most shapes when timed alone; a probe run on 2026-11-30) and 4.43 ms on
cuBLAS (bench/RESULTS.md, gpu_batch), and compiling skips the timing.

At batch 1 the autotuned products are near their bytes floor: on the H200 (probe of 2026-12-03, Llama-3.1-8B's 7
products a layer, 32 layers, 13.96 GB of weights, one CUDA graph) they took 3.59 ms, 1.08x the weights' bytes at the
4.2 TB/s copy bandwidth; q/k/v and gate/up each fused into one product 3.65 ms (on cuBLAS 4.29 against 4.93
unfused); a hand-written GEMV of ours (another run the same day) about 4.0 ms, 4.0-5.7 when it loaded its first
weights before waiting on the kernel before it (programmatic dependent launch). None is used.

Inductor's Triton kernels are generated with programmatic dependent launch (`triton.enable_pdl`; Hopper and later,
where Inductor emits it, and not for its matrix-product templates): in the graph each may start while the kernel
before it finishes, waiting for that kernel's writes only before the loads that need them, as our kernels and
FlashInfer's already do. On the H200 (probe of 2026-12-02, SmolLM2-135M shapes at 8K, the app's chat decoding)
dense went from 1,075 to 1,173 tok/s and Quest from 830 to 886; Llama-3.1-8B shapes, whose kernels are long enough
that a launch's latency is a small part of each, within 0.6% either way at 32K and 128K.
"""
import contextlib
import functools

import torch
import torch._inductor.config

_compiled_forward = {}  # (decoder layer class, mode) -> its compiled forward (Dynamo keeps an entry per layer index)
# programmatic dependent launch in the generated kernels, where this torch's Inductor offers it
_PDL = {"triton.enable_pdl": True} if hasattr(torch._inductor.config.triton, "enable_pdl") else {}
# resuming inside the attention module after its graph breaks, where this torch's Dynamo offers it
_NESTED_BREAKS = {"nested_graph_breaks": True} if hasattr(torch._dynamo.config, "nested_graph_breaks") else {}


@contextlib.contextmanager
def compiled_layers(model, autotune: bool = True):
    """Within the block, `model`'s decoder layers run their compiled forward (on CUDA with `autotune`, the matrix
    products autotuned). Layers whose forward is already replaced on the object (accelerate's device-map hooks do
    that) are left as they are."""
    layers = model.get_decoder().layers
    if any("forward" in vars(layer) for layer in layers):
        yield
        return
    mode = "max-autotune-no-cudagraphs" if autotune and next(model.parameters()).is_cuda else None
    for layer in layers:
        key = type(layer), mode
        if key not in _compiled_forward:
            _compiled_forward[key] = torch.compile(type(layer).forward, mode=mode)
        layer.forward = functools.partial(_compiled_forward[key], layer)
    try:
        # each layer is a guard of its own (its index is a constant of the graph): room for all of them
        with torch._dynamo.config.patch(recompile_limit=max(8, 4 * len(layers)), **_NESTED_BREAKS), \
                torch._inductor.config.patch(_PDL):
            yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's
