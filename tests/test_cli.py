"""The CLIs users type: ``nemo llm pretrain --factory`` and
recipes/*.py."""

from pathlib import Path

import pytest
from conftest import PYTHON, ROOT

NEMO = str(Path(PYTHON).parent / "nemo")


@pytest.mark.parametrize("factory", ["coom_deepseek", "coom_llama31_405b", "coom_gpt_oss_20b",
                                     "coom_llama31_8b_mlperf"])
def test_nemo_cli_dryrun(run_cmd, factory):
    code, out = run_cmd([NEMO, "llm", "pretrain", "--factory", factory, "--dryrun", "--yes"])
    assert code == 0, out[-3000:]
    assert "Dry run for" in out
    assert "model=" in out and " active_params=" in out


def test_nemo_cli_unknown_factory(run_cmd):
    code, out = run_cmd([NEMO, "llm", "pretrain", "--factory", "coom_nope", "--dryrun",
                         "--yes"])
    assert code != 0
    assert "No matching factory found for: coom_nope" in out


def test_script_rejects_bad_layout_in_one_line(run_cmd):
    code, out = run_cmd([PYTHON, str(ROOT / "recipes" / "llama31_405b.py"), "--size", "debug",
                         "--cpu", "--gpus-per-node", "2", "--gbs", "6", "--mbs", "2",
                         "--dryrun"])
    assert code == 2
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == ["error: data.global_batch_size: GBS=6 is not divisible by MBS*DP = "
                      "2*2 = 4; use a multiple of 4"]


def test_nemo_cli_trains_a_debug_recipe_on_cpu(run_cmd, tmp_path):
    factory = f"coom_llama31_405b(size=debug, cpu=True, dir={tmp_path})"
    code, out = run_cmd([NEMO, "llm", "pretrain", "--factory", factory,
                         "trainer.max_steps=3", "--yes"])
    assert code == 0, out[-3000:]
    assert [line.split("|")[0].split()[1] for line in out.splitlines()
            if line.startswith("step") and "| loss" in line] == ["1/3", "2/3", "3/3"]
