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
