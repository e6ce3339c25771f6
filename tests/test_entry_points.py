"""Every entry point starts from the model's own settings (quest_core.config.default_config) unless told otherwise,
the warm-up runs the backend the app serves with, and settings that cannot run are refused with a message."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from launch import warm_up
from quest_core import __main__ as cli
from quest_core.backend_torch import TorchBackend
from quest_core.backends import make_backend
from quest_core.config import Decoding, QuestConfig
from quest_core.session import Session

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def short_doc(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "doc.txt"
    path.write_text(ROOT.joinpath("assets", "hamlet_opening.txt").read_text()[:3000])
    return path


def run_cli(capsys, *argv):
    code = cli.main(["generate", *argv, "--max-new-tokens", "4", "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def test_the_cli_uses_the_models_settings_unless_flags_say_otherwise(capsys, short_doc):
    code, result = run_cli(capsys, "--doc", str(short_doc), "--question", "Who?")
    assert code == 0 and (result["page_size"], result["group_rule"]) == (4, "mass")  # 64-dim heads
    assert result["repetition_penalty"] == Decoding().repetition_penalty
    code, result = run_cli(capsys, "--doc", str(short_doc), "--question", "Who?", "--page-size", "16",
                           "--group-rule", "sum")
    assert code == 0 and (result["page_size"], result["group_rule"]) == (16, "sum")


def test_a_budget_of_one_page_is_refused_with_a_message(capsys, short_doc):
    code, err = run_cli(capsys, "--doc", str(short_doc), "--question", "Who?", "--budget", "16", "--page-size", "16")
    assert code == 2 and "at least two pages" in err
    with pytest.raises(ValueError, match="at least two pages"):
        QuestConfig(budget=16, page_size=16)
    assert QuestConfig(budget=17, page_size=16).budget_pages == 2


def test_the_cli_runs_an_adaptive_budget_and_refuses_a_share_outside_0_1(capsys, short_doc):
    code, result = run_cli(capsys, "--doc", str(short_doc), "--question", "Who?", "--budget", "256",
                           "--page-top-p", "0.9", "--min-budget", "32", "--backend", "torch")
    assert code == 0 and (result["top_p"], result["min_budget"], result["budget"]) == (0.9, 32, 256)
    assert 32 // 4 <= result["mean_pages_read"] <= 256 // 4
    code, err = run_cli(capsys, "--doc", str(short_doc), "--question", "Who?", "--page-top-p", "1.5")
    assert code == 2 and "top_p must be in (0, 1]" in err


def test_the_cli_ranks_in_two_levels_and_refuses_a_negative_factor(capsys, short_doc):
    code, result = run_cli(capsys, "--doc", str(short_doc), "--question", "Who?", "--budget", "128", "--page-size", "2",
                           "--coarse-factor", "4", "--backend", "torch")
    assert code == 0 and (result["coarse_factor"], result["page_size"], result["budget"]) == (4, 2, 128)
    code, err = run_cli(capsys, "--doc", str(short_doc), "--question", "Who?", "--coarse-factor", "-1")
    assert code == 2 and "coarse_factor must be >= 0" in err


def test_a_session_starts_from_the_models_settings(default_model):
    session = Session(*default_model)
    assert (session.config.page_size, session.config.group_rule) == (4, "mass")
    assert session.decoding == Decoding()


class CountingBackend(TorchBackend):
    """The torch backend, counting the sparse steps it runs."""

    def __init__(self):
        self.sparse_steps = 0

    def decode_sparse(self, *args):
        self.sparse_steps += 1
        return super().decode_sparse(*args)


def test_the_warm_up_runs_the_backend_and_settings_the_app_serves_with(default_model):
    backend = CountingBackend()
    warm_up(*default_model, backend, log=lambda message: None)
    assert backend.sparse_steps > 0


def test_float32_on_a_gpu_falls_back_to_torch_once_with_the_reason():
    backend = make_backend("auto", "cuda", torch.float32)  # decided before FlashInfer is imported: no GPU needed
    assert isinstance(backend, TorchBackend) and "not float32" in backend.describe()
    assert make_backend("auto", "cpu", torch.float32).describe() == "torch"


def test_a_gpu_without_a_cuda_compiler_or_prebuilt_kernels_falls_back_to_torch_with_the_reason(monkeypatch):
    """As on a GPU Space: the CUDA runtime, no nvcc, FlashInfer without its prebuilt kernels."""
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *args: None if name == "flashinfer_jit_cache" else find_spec(name, *args))
    backend = make_backend("auto", "cuda", torch.bfloat16)
    assert isinstance(backend, TorchBackend) and "neither prebuilt" in backend.describe()
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvcc")  # a compiler: FlashInfer is tried
    assert "neither prebuilt" not in make_backend("auto", "cuda", torch.bfloat16).describe()


def test_the_name_kernels_is_left_to_pypi():
    """transformers probes for Hugging Face's `kernels` package: ours must not answer to that name."""
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not str(spec.origin).startswith(str(ROOT))


def test_kernel_phases_finds_one_place_for_each_of_its_timers_in_the_kernels():
    """bench/kernel_phases.py times the kernels by inserting timers at fixed places of their source: a change to the
    kernels that moves one should fail here, not on the GPU."""
    from bench import kernel_phases
    source = kernel_phases.timed_source()
    assert source.count("trace_mark(") == len(kernel_phases.MARKS) + 1  # each timer, and its definition


@pytest.mark.parametrize("tied", [False, True])
def test_the_benches_bytes_floor_reads_the_matrices_and_norms_once_and_one_embedding_row(tied):
    """bench/e2e.py's and bench/batch_gpu.py's floor: a decode step reads each matrix and norm weight once, and of the
    input embedding one row, unless the output projection shares its table (tied), which it then reads whole."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.e2e import step_weight_bytes
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    read = [module.weight for module in model.modules()
            if isinstance(module, torch.nn.Linear) or type(module).__name__.endswith("RMSNorm")]
    expected = sum(weight.numel() for weight in read) * 2 + (0 if tied else config.hidden_size * 2)
    assert step_weight_bytes(model) == expected


def test_the_e2e_benchs_longest_kernels_count_the_gpu_kernels_of_a_step_by_name():
    """bench/e2e.py's table of a step's longest kernels, from a profiler's events (names as the H200 run saw them):
    GPU kernels only, by name up to the template arguments, per step, the most GPU time first."""
    from types import SimpleNamespace

    from bench.e2e import longest_kernels
    gpu, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    times = {"triton_red_fused_mm_t_view_0": [8.0] * 4,  # the q and o projections: two a step
             "void score_topk_kernel<__nv_bfloat16, 1, 0>(__nv_bfloat16 const*, long)": [12.0, 12.0],
             "void sparse_decode_kernel<__nv_bfloat16, 16, 4>(__nv_bfloat16 const*)": [10.0, 12.0],
             "nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT": [246.0, 246.0]}
    events = [SimpleNamespace(name=name, device_type=gpu, device_time=us)
              for name, each in times.items() for us in each]
    events.append(SimpleNamespace(name="aten::mm", device_type=cpu, device_time=9999.0))  # the host's, not a kernel
    profiler = SimpleNamespace(events=lambda: events)
    assert longest_kernels(profiler, steps=2, count=4) == [
        ("nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT", 1.0, 246.0), ("triton_red_fused_mm_t_view_0", 2.0, 8.0),
        ("score_topk_kernel", 1.0, 12.0), ("sparse_decode_kernel", 1.0, 11.0)]


def test_the_e2e_benchs_busy_time_counts_overlapping_kernels_once():
    """bench/e2e.py's GPU busy time: the union of the kernels' intervals per step, so that a programmatic dependent
    started inside the kernel before it counts once, and the gaps between kernels not at all."""
    from types import SimpleNamespace

    from bench.e2e import busy_us
    gpu, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    intervals = [(30.0, 40.0), (0.0, 10.0), (5.0, 12.0), (6.0, 8.0), (20.0, 25.0)]  # out of order: busy 12 + 5 + 10
    events = [SimpleNamespace(name="k", device_type=gpu, time_range=SimpleNamespace(start=a, end=b))
              for a, b in intervals]
    events.append(SimpleNamespace(name="aten::mm", device_type=cpu, time_range=SimpleNamespace(start=0.0, end=99.0)))
    assert busy_us(SimpleNamespace(events=lambda: events), steps=2) == 13.5
