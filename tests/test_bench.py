"""The GPU bench's CPU-checkable parts: proxies come from the real
recipe code, the summary has the pair lines RESULTS.md needs, and
TransformerEngine loads PyTorch's cuDNN."""

import re
import sys

import pytest
from conftest import ROOT

import coom_nemo
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


def test_summary_prints_one_pair_line_per_compared_pair():
    results = {"llama-coom-te-fp8": dict(tok_s=44000.0, j_tok=0.018),
               "llama-coom-te-fp8-repeat": dict(tok_s=43900.0, j_tok=0.0183),
               "llama-stock-te-fp8": dict(tok_s=40000.0),
               "llama-coom-te-bf16": dict(error="NaN")}
    lines = bench.summary(results)
    pair = re.compile(r"pair=(\S+) coom_tok_s=(\S+) stock_tok_s=(\S+) ratio_vs_stock=(\S+)")
    pairs = [pair.fullmatch(line).groups() for line in lines if line.startswith("pair=")]
    assert pairs == [("llama-fp8-te", "44000", "40000", "1.100")]
    assert "difference 1.7%" in next(line for line in lines if line.startswith("energy"))


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
# (variant, MBS, precision, TE, peak GB, where)
MEASURED_PEAKS = [
    ("llama", 1, "bf16", True, 60.3, "H200 2026-11-29, llama-coom-te-bf16"),
    ("llama", 1, "fp8-delayed", True, 61.2, "H100 2026-11-24 job B, llama-coom-te-fp8"),
    ("llama", 2, "fp8-delayed", True, 69.0, "H200 2026-11-29, llama-coom-te-fp8-mbs2"),
    ("llama", 2, "fp8-delayed", True, 70.5, "H100 2026-11-24 job C, llama-coom-te-fp8-mbs2"),
    ("llama", 1, "bf16", False, 61.6, "H100 2026-11-24 job B, llama-coom-sdpa-bf16"),
    ("moe", 1, "bf16", True, 59.0, "H100 2026-11-24 job C, moe-coom-te-bf16"),
]


@pytest.mark.parametrize("family, mbs, precision, te, peak_gb, where", MEASURED_PEAKS)
def test_plan_memory_estimate_is_within_10_percent_of_measured_peaks(
        family, mbs, precision, te, peak_gb, where, tmp_path):
    from coom_nemo.plan import Plan
    from coom_nemo.recipe import _build

    recipe = bench.coom_recipe("proxy", bench.Variant(family, "coom", precision, te=te, mbs=mbs),
                               10, str(tmp_path))
    plan = Plan.from_parts(recipe.model, recipe.data, recipe.trainer, recipe.optim,
                           _build(recipe.plan))
    estimate_gb = plan.memory_estimate_gb()["total"] * 1024**3 / 1e9
    assert estimate_gb == pytest.approx(peak_gb, rel=0.10), where


def test_plan_refuses_the_micro_batch_that_ran_out_of_memory():
    """MBS 4 of the Llama proxy ran out of memory on an 80 GB H100
    (bench/RESULTS.md, job C); the plan must not admit it there."""
    from coom_nemo.plan import PlanError

    recipe = bench.coom_recipe("proxy", bench.Variant("llama", "coom", "fp8-delayed", mbs=4), 10,
                               "/tmp/unused")
    recipe.plan.gpu_memory_gb = 79.2  # what torch reported as the H100's total
    with pytest.raises(PlanError, match="exceeds 95% of 79 GiB"):
        check_recipe(recipe)
