"""A model larger than one GPU: decode tok/s and TTFT of a Llama-3.1-70B-shaped model with random bf16 weights
(about 141 GB, built from a config, nothing downloaded), its decoder layers split evenly over 2 GPUs under
accelerate's hooks as `device_map` places them, batch 1: HF `generate` (sdpa, eager) vs ours dense vs ours Quest.
Both of ours decode eagerly: a CUDA graph holds one GPU's work (quest_core/cuda_graph.py).

    python bench/multi_gpu.py      # 32K context; writes the gpu_multi section of bench/RESULTS.md
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.e2e import hf_generate, ours, random_prompt  # noqa: E402
from bench.results import write_section  # noqa: E402
from quest_core.backends import make_backend  # noqa: E402
from quest_core.config import default_config  # noqa: E402
from quest_core.hf import QuestCache, use_quest  # noqa: E402


def split_map(num_layers: int, num_gpus: int) -> dict:
    """accelerate's device map: the decoder layers in even stretches, the embedding on the first GPU, the final
    norm and the head on the last."""
    per_gpu = -(-num_layers // num_gpus)
    return {"model.embed_tokens": 0, "model.rotary_emb": 0,
            **{f"model.layers.{i}": i // per_gpu for i in range(num_layers)},
            "model.norm": num_gpus - 1, "lm_head": num_gpus - 1}


def llama_70b_shaped(max_context: int, num_gpus: int):
    """Built empty (no memory), then each weight made, random, on its block's GPU; dispatched as from_pretrained
    with a device map does (skipping the cache argument, as transformers does)."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=max_context,
                         rope_theta=500000.0, tie_word_embeddings=False)
    with init_empty_weights():
        model = LlamaForCausalLM(config).eval()
    device_map = split_map(config.num_hidden_layers, num_gpus)
    for name, parameter in model.named_parameters():
        device = next(device for block, device in device_map.items() if name.startswith(block + "."))
        value = torch.empty(parameter.shape, dtype=torch.bfloat16, device=device)
        if parameter.dim() > 1:
            value.normal_(0, config.initializer_range)
        else:  # the RMSNorm weights
            value.fill_(1.0)
        set_module_tensor_to_device(model, name, device, value=value, dtype=torch.bfloat16)
    return dispatch_model(model, device_map, skip_keys=model._skip_keys_device_placement)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} GPUs, {torch.cuda.device_count()} visible")
    started = time.perf_counter()
    model = llama_70b_shaped(max(args.contexts) + args.new_tokens + 16, args.gpus)
    build_s = time.perf_counter() - started
    memory = [torch.cuda.memory_allocated(gpu) / 2**30 for gpu in range(args.gpus)]
    backend = make_backend("auto", "cuda:0", torch.bfloat16)
    quest = default_config(model.config, budget=args.budget)
    rows = []
    for context in args.contexts:
        prompt = random_prompt(model.config.vocab_size, context)
        hf_ttft, hf_speed = hf_generate(model, prompt, args.new_tokens)
        use_quest(model)
        cache = QuestCache(model.config.num_hidden_layers, quest.with_changes(mode="dense"), backend)
        ours(model, cache, prompt[:512], 8)  # warm-up: kernel builds, plans on both GPUs
        dense_ttft, dense_speed, _ = ours(model, cache, prompt, args.new_tokens)
        cache.set_config(quest)
        quest_ttft, quest_speed, _ = ours(model, cache, prompt, args.new_tokens)
        row = dict(context=context, hf_ttft_s=hf_ttft, hf_tok_s=hf_speed, dense_ttft_s=dense_ttft,
                   dense_tok_s=dense_speed, quest_ttft_s=quest_ttft, quest_tok_s=quest_speed,
                   cache_devices=sorted({str(layer.keys.device) for layer in cache.layers}),
                   cuda_graph=not cache.graph_decoder.failed)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del cache
        torch.cuda.empty_cache()
    table = ["| context | HF generate tok/s | ours dense tok/s | ours Quest tok/s | Quest / dense | dense / HF | "
             "TTFT HF s | TTFT ours dense s | TTFT ours Quest s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['context']} | {r['hf_tok_s']:.1f} | {r['dense_tok_s']:.1f} | {r['quest_tok_s']:.1f} | "
                     f"{r['quest_tok_s'] / r['dense_tok_s']:.2f}x | {r['dense_tok_s'] / r['hf_tok_s']:.2f}x | "
                     f"{r['hf_ttft_s']:.2f} | {r['dense_ttft_s']:.2f} | {r['quest_ttft_s']:.2f} |")
    body = (f"Llama-3.1-70B shapes (80 layers, 64 q / 8 kv heads, d 128, vocab 128256) with random bf16 weights, "
            f"the decoder layers split evenly over {args.gpus} GPUs (weights "
            f"{' + '.join(f'{gib:.0f}' for gib in memory)} GiB, built in {build_s:.0f} s) under accelerate's hooks, "
            f"batch 1, {args.new_tokens} new tokens (EOS suppressed), Quest budget {args.budget}, page 16, 2 dense "
            f"layers; backend {backend.name}, each layer's paged cache on its layer's GPU "
            f"({', '.join(rows[0]['cache_devices'])}). HF is `generate` with its dynamic cache (sdpa, eager). Ours "
            "decode eagerly (a CUDA graph holds one GPU's work: "
            f"{'captured' if any(r['cuda_graph'] for r in rows) else 'the eager fallback ran, as it should'}); "
            "tok/s leaves out the first two decode steps, TTFT prefills the whole prompt.\n\n" + "\n".join(table))
    if not args.no_write:
        write_section("gpu_multi", f"Across {args.gpus} GPUs: Llama-3.1-70B shapes, HF generate vs ours dense vs "
                      "ours Quest", body)
    print(json.dumps({"bench": "gpu_multi", "rows": rows}))


if __name__ == "__main__":
    main()
