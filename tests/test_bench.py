"""The GPU bench's CPU-checkable parts: proxies come from the real
recipe code, the summary has the pair lines RESULTS.md needs, and
TransformerEngine loads PyTorch's cuDNN."""

import dataclasses
import re
import sys
from contextlib import nullcontext
from unittest import mock

import pytest
from conftest import ROOT

import coom_nemo
from coom_nemo.models.base import has_transformer_engine
from coom_nemo.recipe import check_recipe

sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402


@pytest.mark.parametrize("family, total", [("llama", "2.80B"), ("moe", "2.85B")])
def test_proxies_are_the_family_recipes_at_one_gpu(family, total, tmp_path, capsys):
    recipe = bench.coom_recipe("proxy", bench.Variant(family, "coom", mbs=2), 10, str(tmp_path))
    plan = check_recipe(recipe)
    assert (plan.world_size, plan.mbs, plan.gbs, plan.seq_length) == (1, 2, 8, 4096)
    assert f"params={total}" in capsys.readouterr().out
    assert recipe.log.ckpt is None and recipe.trainer.enable_checkpointing is False


def test_summary_prints_one_pair_line_per_candidate_that_ran():
    results = {"llama-coom-te-fp8": dict(tok_s=44000.0, j_tok=0.018),
               "llama-coom-te-fp8-repeat": dict(tok_s=43900.0, j_tok=0.0183),
               "llama-coom-te-fp8-mbs4": dict(error="out of memory"),
               "llama-stock-te-fp8": dict(tok_s=40000.0),
               "llama-coom-te-bf16": dict(error="NaN"),
               "llama-coom-te-bf16#2": dict(tok_s=33000.0),
               "llama-coom-te-bf16-sdpa": dict(tok_s=33000.0),
               "llama-coom-te-bf16-sdpa#2": dict(tok_s=33100.0),
               "llama-coom-te-fp8-mbs2-sdpa": dict(tok_s=39000.0),
               "llama-coom-te-bf16-mbs2-sdpa": dict(tok_s=32500.0)}
    lines = bench.summary(results, {"gpu": "NVIDIA H200"})
    pair = re.compile(r"pair=(\S+) coom=(\S+) stock=(\S+) coom_tok_s=(\S+) stock_tok_s=(\S+) "
                      r"ratio_vs_stock=(\S+) gpu=(\S+)")
    pairs = [pair.fullmatch(line).groups() for line in lines if line.startswith("pair=")]
    assert pairs == [("llama-fp8-te", "llama-coom-te-fp8", "llama-stock-te-fp8", "44000",
                      "40000", "1.100", "H200"),
                     ("llama-fp8-te", "llama-coom-te-fp8-mbs4", "llama-stock-te-fp8", "nan",
                      "40000", "nan", "H200"),
                     ("llama-fp8-te", "llama-coom-te-fp8-mbs2-sdpa", "llama-stock-te-fp8",
                      "39000", "40000", "0.975", "H200")]
    assert "difference 1.7%" in next(line for line in lines if line.startswith("energy repeat"))
    assert "llama coom-mbs2-sdpa fp8/bf16 tokens/s = 1.200" in lines
    nan_lines = [line for line in lines if line.startswith("bf16 on the TE spec")]
    assert nan_lines == [
        "bf16 on the TE spec: 1 of 2 Llama proxy runs of llama-coom-te-bf16 without NaN or error",
        "bf16 on the TE spec: 1 of 1 Llama proxy runs of llama-coom-te-bf16-mbs2-sdpa without NaN "
        "or error",
        "bf16 on the TE spec: 2 of 2 Llama proxy runs of llama-coom-te-bf16-sdpa without NaN or "
        "error"]


def test_energy_choice_is_the_lowest_j_per_token_within_5_percent_of_the_fastest():
    runs = {"llama-coom-te-fp8-mbs8": dict(tok_s=50000.0, j_tok=0.0160),
            "llama-coom-te-fp8-mbs4": dict(tok_s=48000.0, j_tok=0.0150),  # 4% slower
            "llama-coom-te-fp8": dict(tok_s=40000.0, j_tok=0.0100),  # 20% slower
            "llama-coom-te-bf16#2": dict(tok_s=47400.0, j_tok=0.0155),  # 5.2% slower
            "llama-coom-sdpa-bf16": dict(tok_s=30000.0, j_tok=0.0230)}
    lines = bench.energy_choice(runs)
    assert len(lines) == 2  # TE node and TE-free node
    te = next(line for line in lines if "TE node" in line and "TE-free" not in line)
    assert te.startswith("energy choice llama on a TE node: llama-coom-te-fp8-mbs4 0.0150")
    assert "4.0% below the fastest, 2 of 4 configurations within 5%" in te


def test_repeats_and_the_budget_decide_what_runs(monkeypatch, tmp_path, capsys):
    ran = []

    def fake_run_child(name, args, log, env=None):
        ran.append(name)
        if name == "matmul":
            return dict(name="matmul", tflops=750.0, gpu="NVIDIA H200")
        bench.time.sleep(0.2)
        return dict(name=name, error="not a GPU")

    monkeypatch.setattr(bench, "run_child", fake_run_child)
    bench.main(["--only", "^llama-coom-te-bf16$", "--repeat", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert ran == ["matmul"] + ["llama-coom-te-bf16"] * 3
    assert "| llama-coom-te-bf16#3 | failed: not a GPU |" in out
    ran.clear()
    pair = ["llama-stock-te-bf16", "llama-coom-te-bf16-native-ce"]
    bench.main(["--only", *(f"^{n}$" for n in pair), "--repeat", "2", "--out", str(tmp_path)])
    assert ran == ["matmul"] + pair * 2  # rounds, interleaved
    assert "| llama-coom-te-bf16-native-ce#2 | failed: not a GPU |" in capsys.readouterr().out
    ran.clear()
    bench.main(["--only", "^llama-coom-te-bf16$", "--repeat", "5", "--budget", "0.5",
                "--out", str(tmp_path)])
    assert ran.count("llama-coom-te-bf16") < 5
    assert "# budget: llama-coom-te-bf16#" in capsys.readouterr().out


def test_transformer_engine_is_pointed_at_pytorchs_cudnn(monkeypatch):
    monkeypatch.delenv("CUDNN_PATH", raising=False)
    monkeypatch.delenv("CUDNN_HOME", raising=False)
    monkeypatch.setattr(coom_nemo, "torch_cudnn_dir", lambda: "/wheels/nvidia/cudnn")
    coom_nemo._one_cudnn()
    assert coom_nemo.os.environ["CUDNN_PATH"] == "/wheels/nvidia/cudnn"
    monkeypatch.setenv("CUDNN_PATH", "/opt/cudnn")  # a user's choice stays
    coom_nemo._one_cudnn()
    assert coom_nemo.os.environ["CUDNN_PATH"] == "/opt/cudnn"


# Peaks measured by bench/bench.py (torch.cuda.max_memory_allocated,
# GB = 1e9 bytes), bench/RESULTS.md and ../shared/gpu/README.md:
# (variant, peak GB, where[, model config as it ran]);
# before 2026-12-04 coom's TE runs used megatron-core's cross entropy
NATIVE_CE = {"cross_entropy_fusion_impl": "native"}

MEASURED_PEAKS = [
    ("llama-coom-te-bf16", 60.3, "H200 2026-11-29", NATIVE_CE),
    ("llama-coom-te-fp8", 61.2, "H100 2026-11-24 job B", NATIVE_CE),
    ("llama-coom-te-fp8-mbs2", 69.0, "H200 2026-11-29", NATIVE_CE),
    ("llama-coom-te-fp8-mbs2", 70.5, "H100 2026-11-24 job C", NATIVE_CE),
    ("llama-coom-sdpa-bf16", 61.6, "H100 2026-11-24 job B", NATIVE_CE),
    # megatron-core's local attention keeps each layer's s x s softmax
    ("llama-coom-local-bf16", 70.4, "H100 2026-11-24 job B", NATIVE_CE),
    ("moe-coom-te-bf16", 59.0, "H100 2026-11-24 job C", NATIVE_CE),
    ("llama-coom-te-bf16", 57.2, "H100 2026-12-07"),
    ("llama-coom-te-fp8-mbs2", 62.7, "H100 2026-12-07"),
    ("llama-coom-sdpa-bf16", 61.6, "H100 2026-12-07"),
    ("llama-coom-sdpa-bf16-mbs2", 71.1, "H100 2026-12-07"),
    # 2026-12-07, second session (bench/gpu_check/2026-12-07b-h100)
    ("llama-coom-te-bf16-mbs2", 63.9, "H100 2026-12-07b"),
    ("llama-coom-te-bf16-sdpa", 57.6, "H100 2026-12-07b"),
    ("llama-coom-te-fp8", 56.6, "H100 2026-12-07b"),
    ("llama-coom-te-fp8-mbs2-sdpa", 63.5, "H100 2026-12-07b"),
    # MoE with MTP: each routed copy's tensors, MTP's layer and logits
    # (the plan was 0.83 of the MBS-4 peak without them)
    ("moe-coom-te-bf16", 58.3, "H100 2026-12-07b"),
    ("moe-coom-te-bf16-mbs2", 64.2, "H100 2026-12-07b"),
    ("moe-coom-te-bf16-mbs4", 76.2, "H100 2026-12-07b"),
    # stock NeMo's configs, planned by the same check
    ("llama-stock-te-fp8", 59.7, "H100 2026-12-07"),
    ("llama-stock-te-bf16", 60.3, "H100 2026-12-07b"),
    ("llama-stock-local-bf16", 68.3, "H100 2026-12-07"),
    ("moe-stock-te-bf16", 58.3, "H100 2026-12-07"),
]


def proxy_plan(variant: str, gpu_memory_gb: float | None = None, changes=None):
    """A bench variant's plan, as built on this host: its coom recipe,
    or stock NeMo's parts; ``changes`` to its model config."""
    from coom_nemo.plan import Plan, PlanOptions
    from coom_nemo.recipe import _build

    v = bench.VARIANTS[variant]
    v = dataclasses.replace(v, config={**v.config, **(changes or {})})
    if v.impl == "stock":
        if v.te and not has_transformer_engine():
            # megatron-core refuses Llama's default RoPE fusion without
            # TE when the config is made; it moves no memory estimate
            v = dataclasses.replace(v, config={**v.config, "apply_rope_fusion": False})
        return Plan.from_parts(*bench.stock_parts(v, 10), PlanOptions(gpu_memory_gb=80.0))
    recipe = bench.coom_recipe(variant, v, 10, "/tmp/unused")
    if gpu_memory_gb is not None:
        recipe.plan.gpu_memory_gb = gpu_memory_gb
    # a plan made off the node is the recipe as a TE node builds it;
    # a run with TE hidden is planned as its own node does (CUDA there)
    as_node = nullcontext() if v.te else mock.patch("torch.cuda.is_available", lambda: True)
    with as_node:
        return Plan.from_parts(recipe.model, recipe.data, recipe.trainer, recipe.optim,
                               _build(recipe.plan))


@pytest.mark.parametrize("variant, peak_gb, where, changes",
                         [(*row, None)[:4] for row in MEASURED_PEAKS])
def test_plan_memory_estimate_is_within_10_percent_of_measured_peaks(variant, peak_gb, where,
                                                                     changes):
    plan = proxy_plan(variant, changes=changes)
    estimate_gb = plan.memory_estimate_gb()["total"] * 1024**3 / 1e9
    assert estimate_gb == pytest.approx(peak_gb, rel=0.10), where


def test_plan_refuses_the_micro_batch_that_ran_out_of_memory():
    """MBS 4 of the Llama proxy ran out of memory on an 80 GB H100
    (bench/RESULTS.md, job C, with megatron-core's native cross
    entropy, as then); the plan must not admit it there."""
    from coom_nemo.plan import PlanError

    recipe = bench.coom_recipe("proxy", bench.Variant(
        "llama", "coom", "fp8-delayed", mbs=4, config={"cross_entropy_fusion_impl": "native"}),
        10, "/tmp/unused")
    recipe.plan.gpu_memory_gb = 79.2  # what torch reported as the H100's total
    with pytest.raises(PlanError, match="exceeds 95% of 79 GiB"):
        check_recipe(recipe)


@pytest.mark.parametrize("gpu_memory_gb, refused", [(79.2, True), (139.8, False)])
def test_a_variant_the_plan_refuses_on_this_gpu_is_reported_not_run(gpu_memory_gb, refused):
    """MBS 8 of the FP8 Llama proxy (plan 107 GiB): refused on an H100's
    79.2 GiB, run on an H200's 139.8 GiB."""
    reason = bench.refusal(proxy_plan("llama-coom-te-fp8-mbs8", gpu_memory_gb))
    if refused:
        assert reason.startswith("not run: ") and "exceeds 95% of 79 GiB" in reason, reason
    else:
        assert reason is None


def test_the_child_reports_after_its_last_step_from_measured_steps(monkeypatch):
    """The child's callback hands its result over at the last step
    (the process then ends, skipping the teardown); step time is the
    median after the warm-up, flops from the model's own config."""
    import types

    import torch

    from coom_nemo.models.llama import llama31_config

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 61e9)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 64e9)
    import coom_nemo.energy

    monkeypatch.setattr(coom_nemo.energy, "open_meter", lambda: None)
    clock = iter([0.0, 1.0, 2.0, 2.5, 3.0, 3.6])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    results = []
    recorder = bench._Recorder(2, 5, lambda r: results.append(
        bench.measured("llama-coom-te-fp8", r, 2, 60.0)))
    import fiddle as fdl

    module = types.SimpleNamespace(config=fdl.build(llama31_config("8b", num_layers=8)))
    recorder.on_train_start(None, module)
    for step in range(5):
        assert not results
        recorder.on_train_batch_end(None, module, {"loss": torch.tensor(7.0 - step)}, None, step)
    [result] = results
    assert result["steps"] == 5 and result["losses"] == [7.0, 6.0, 5.0, 4.0, 3.0]
    assert result["step_ms"] == pytest.approx(500.0)  # median of 0.5, 0.5, 0.6
    assert result["tok_s"] == pytest.approx(bench.GBS * bench.SEQ / 0.5)
    assert (result["peak_gb"], result["reserved_gb"], result["estimate_gb"]) == (61, 64, 60)
    from coom_nemo.model_math import model_flops_per_token

    per_token = model_flops_per_token(module.config, bench.SEQ)
    assert 6 * 2.2e9 < per_token < 6 * 2.6e9  # 2.3B active matmul params + attention
    assert result["tflops"] == pytest.approx(per_token * result["tok_s"] / 1e12)


def test_every_bench_set_of_the_gpu_check_names_existing_variants():
    """A misspelt pattern would cost a lent node's time for nothing."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    sets = re.search(r"declare -A BENCH_SETS=\((.*?)\n\)", script, re.S)[1]
    patterns = re.findall(r"\^[\w.-]+\$", sets)
    assert len(patterns) > 10
    for pattern in patterns:
        assert [n for n in bench.VARIANTS if re.search(pattern, n)] == [pattern[1:-1]], pattern
    for pair, (stock, candidates) in bench.PAIRS.items():
        assert {stock, *candidates} <= set(bench.VARIANTS), pair
