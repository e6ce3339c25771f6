"""Quest's decode attention against the floor of its reads, measured on this GPU: kernels that only read the bytes
Quest's two kernels read (bench/read_floor.cu: a layer's page bounds, then the selected pages' K and V), with the
dependency between the two, next to FlashInfer's dense decode and our Quest in the same run, at issue 16's target
configurations. The copy bandwidth's floor (bench/attention_kernels.py) leaves out what any kernel pays to start,
to reach full bandwidth over a few MB and to wait for the kernel before it; this one does not.

Each read is timed at several grids and block sizes, and the fastest counts. Before timing, each kernel's XOR of what
it read must equal torch's XOR of the same bytes (every byte read once). CUDA graphs over layer copies, as
bench/attention_kernels.py times (each call reads a copy that is not in L2).

    python bench/read_floor.py    # writes its section of bench/RESULTS.md
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.cpp_extension import load as build

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.attention_kernels import SHAPES, copy_bandwidth, cycling, graph_us, layer_copies, measure  # noqa: E402
from bench.results import write_section  # noqa: E402
from quest_core import kernels  # noqa: E402
from quest_core.backend_flashinfer import ONE_KERNEL_KV_HEADS  # noqa: E402

DTYPE = torch.bfloat16
TARGETS = [  # shape, context, budget, the target: Quest at least this many times faster than dense
    ("llama2-7b", 32768, 2048, 6.0),
    ("llama3-8b", 131072, 2048, 10.0),
    ("llama3-8b", 32768, 2048, 4.0),
    ("smollm2", 8192, 1024, 1.3),
]


def load_module():
    return build(name="quest_read_floor", sources=[str(Path(__file__).with_name("read_floor.cu"))],
                 extra_cuda_cflags=["-O3"], extra_cflags=["-O3"])


def xor_of(tensor: torch.Tensor) -> np.ndarray:
    """The XOR of a tensor's 16-byte vectors, as 4 int32 words (the kernels' sink, its slots XORed)."""
    words = tensor.contiguous().view(torch.int32).cpu().numpy().reshape(-1, 4)
    return np.bitwise_xor.reduce(words, axis=0)


def random_rows(num_pages: int, num_kv_heads: int, k: int) -> torch.Tensor:
    """Each KV head's k selected pages as one-head rows p * Hkv + h: k - 1 distinct full pages, the current last."""
    pages = torch.stack([torch.cat([torch.randperm(num_pages - 1)[:k - 1], torch.tensor([num_pages - 1])])
                         for _ in range(num_kv_heads)])
    return (pages * num_kv_heads + torch.arange(num_kv_heads)[:, None]).to(torch.int32).cuda()


def layer(shape, num_pages: int):
    """A layer's page bounds [Hkv, pages, 2D] and K, V [pages, Hkv, P, D], random."""
    bounds = torch.randn(shape.num_kv_heads, num_pages, 2 * shape.head_dim, device="cuda", dtype=DTYPE)
    keys, values = (torch.randn(num_pages, shape.num_kv_heads, shape.page, shape.head_dim, device="cuda", dtype=DTYPE)
                    for _ in range(2))
    return bounds, keys, values


def expected_xor(bounds, keys, values, rows, num_pages: int):
    """torch's XOR of what each read must read: the bounds of the pages in use, the selected pages' K and V."""
    one_head = lambda t: t.view(-1, t.shape[2], t.shape[3])[rows.view(-1).long()]  # noqa: E731
    return xor_of(bounds[:, :num_pages]), xor_of(one_head(keys)) ^ xor_of(one_head(values))


def check_reads(module, bounds, keys, values, rows, num_pages: int, blocks_per_head: int, splits: int,
                threads: int) -> None:
    """Each read kernel's XOR equals torch's: it read every byte it should, once."""
    bounds_xor, pages_xor = expected_xor(bounds, keys, values, rows, num_pages)
    sink = torch.zeros(module.sink_slots, 4, dtype=torch.int32, device="cuda")
    counters = torch.zeros(bounds.shape[0], 2, dtype=torch.int32, device="cuda")
    calls = {"read_bounds": (lambda: module.read_bounds(bounds, num_pages, blocks_per_head, threads, sink),
                             bounds_xor),
             "read_pages": (lambda: module.read_pages(keys, values, rows, splits, threads, sink), pages_xor),
             "read_chain": (lambda: module.read_chain(bounds, num_pages, keys, values, rows, blocks_per_head,
                                                      threads, counters, sink), bounds_xor ^ pages_xor)}
    for name, (call, expected) in calls.items():
        for _ in range(2):  # twice: the chain's counters must be left at zero for the next call
            sink.zero_()
            call()
            got = np.bitwise_xor.reduce(sink.cpu().numpy(), axis=0)
            if not np.array_equal(got, expected):
                raise AssertionError(f"{name} read other bytes than it should: XOR {got} against torch's {expected}")


def fastest(make_call, configs, copies: int, calls: int):
    """The fastest (graph µs, config) of make_call(config) over the configs."""
    return min((graph_us(cycling(make_call(config), copies), calls), config) for config in configs)


def read_floors(module, shape, context: int, budget: int) -> dict:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    num_pages, k, heads = -(-context // shape.page), -(-budget // shape.page), shape.num_kv_heads
    copies = layer_copies(shape, context, budget)
    calls = copies * -(-20 // copies)
    layers = [layer(shape, num_pages) for _ in range(copies)]
    rows = [random_rows(num_pages, heads, k) for _ in range(copies)]
    sink = torch.zeros(module.sink_slots, 4, dtype=torch.int32, device="cuda")
    counters = torch.zeros(heads, 2, dtype=torch.int32, device="cuda")
    check_reads(module, *layers[0], rows[0], num_pages, max(1, sms // heads), min(k, max(1, sms // heads)), 256)

    def bounds_call(config):
        blocks, threads = config
        return lambda i: module.read_bounds(layers[i][0], num_pages, blocks, threads, sink)

    def pages_call(config):
        splits, threads = config
        return lambda i: module.read_pages(layers[i][1], layers[i][2], rows[i], splits, threads, sink)

    def chain_call(config):
        blocks, threads = config
        return lambda i: module.read_chain(layers[i][0], num_pages, layers[i][1], layers[i][2], rows[i], blocks,
                                           threads, counters, sink)

    bounds_us, bounds_config = fastest(bounds_call, [(max(1, n * sms // heads), t) for n in (1, 2, 4)
                                                     for t in (256, 512, 1024)], copies, calls)
    pages_us, pages_config = fastest(pages_call, [(min(k, max(1, int(n * sms) // heads)), t) for n in (0.5, 1, 2, 4)
                                                  for t in (128, 256, 512)], copies, calls)
    first, second = bounds_call(bounds_config), pages_call(pages_config)
    two_kernels_us = graph_us(cycling(lambda i: (first(i), second(i)), copies), calls)
    chain_configs = [(min(k, max(1, int(n * sms * module.chain_blocks_per_sm(t)) // heads)), t) for n in (0.5, 1)
                     for t in (256, 512, 1024)]
    one_kernel_us, chain_config = fastest(chain_call, chain_configs, copies, calls)
    return dict(read_bounds_us=bounds_us, read_bounds_grid=bounds_config, read_pages_us=pages_us,
                read_pages_grid=pages_config, two_kernels_us=two_kernels_us, one_kernel_us=one_kernel_us,
                one_kernel_grid=chain_config)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    quest_module = kernels.load()
    if quest_module is None:
        sys.exit("the CUDA kernels did not build")
    module = load_module()
    bandwidth = copy_bandwidth()
    rows = []
    for name, context, budget, target in TARGETS:
        shape = SHAPES[name]
        quest = measure(shape, context, [budget], quest_module, bandwidth)[0]
        torch.cuda.empty_cache()
        row = dict(shape=shape.title, context=context, budget=budget, target=target,
                   dense_graph_us=quest["dense_graph_us"], quest_graph_us=quest["quest_graph_us"],
                   score_topk_graph_us=quest["score_topk_graph_us"],
                   sparse_attention_graph_us=quest["sparse_attention_graph_us"],
                   one_kernel_graph_us=quest["one_kernel_graph_us"], bytes_floor_us=quest["bytes_floor_us"],
                   **read_floors(module, shape, context, budget))
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = ["| heads | context | budget | dense µs | Quest, two kernels µs (score + top-k, sparse) | "
             "Quest, one kernel µs | target: Quest µs at most | bytes at copy bandwidth µs | read bounds µs | "
             "read pages µs | both reads, two kernels µs | both reads, one kernel µs | the target less the faster "
             "reads µs | the faster Quest / the faster reads |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        reads, target_us = min(r["two_kernels_us"], r["one_kernel_us"]), r["dense_graph_us"] / r["target"]
        quest = min(r["quest_graph_us"], r["one_kernel_graph_us"])
        table.append(f"| {r['shape']} | {r['context']} | {r['budget']} | {r['dense_graph_us']:.1f} | "
                     f"{r['quest_graph_us']:.1f} ({r['score_topk_graph_us']:.1f}, "
                     f"{r['sparse_attention_graph_us']:.1f}) | {r['one_kernel_graph_us']:.1f} | {target_us:.1f} "
                     f"({r['target']}x) | {r['bytes_floor_us']:.1f} | {r['read_bounds_us']:.1f} | "
                     f"{r['read_pages_us']:.1f} | {r['two_kernels_us']:.1f} | {r['one_kernel_us']:.1f} | "
                     f"{target_us - reads:.1f} | {quest / reads:.2f}x |")
    grids = "; ".join(f"{r['shape']} {r['context']}: bounds {r['read_bounds_grid']}, pages {r['read_pages_grid']}, "
                      f"one kernel {r['one_kernel_grid']}" for r in rows)
    body = ("One layer's decode attention, batch 1, bf16, CUDA graphs over layer copies (each call's data comes from "
            "DRAM, as in a decode step). Dense is FlashInfer's decode and Quest our kernels, as "
            "bench/attention_kernels.py measures them, in this run (group rules: rule sum on the Llama heads, mass "
            "on SmolLM2's; the one kernel is what the flashinfer backend runs for layers of at most "
            f"{ONE_KERNEL_KV_HEADS} KV heads). The reads are bench/read_floor.cu's kernels, which compute nothing "
            "but an XOR of what they read (checked against torch's): the page bounds of every page in use, then "
            "each KV head's selected pages' K and V (random pages), either as two kernels (the second a "
            "programmatic dependent) or as one whose blocks wait for their head's others in between. Each is the "
            f"fastest of several grids (blocks a head or splits, threads: {grids}). The copy bandwidth of this run: "
            f"{bandwidth / 1e12:.2f} TB/s.\n\n" + "\n".join(table))
    if not args.no_write:
        write_section("read_floor", "GPU: Quest's decode attention against the floor of its reads", body)
    print(json.dumps({"bench": "read_floor", "rows": rows}))


if __name__ == "__main__":
    main()
