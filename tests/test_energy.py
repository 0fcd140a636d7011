"""Energy metrics from NVML's counter, with a fake NVML on CPU."""

import time
from types import SimpleNamespace

import nemo_run as run
import pytest
from helpers import train

from coom_nemo.energy import EnergyMetrics, open_meter
from coom_nemo.recipes import llama31_405b

WATTS = 300.0


def fake_nvml(watts=WATTS):
    """A GPU drawing ``watts``: the counter grows with wall time."""
    start = time.perf_counter()
    return SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetHandleByUUID=lambda uuid: uuid,
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: int(
            1000 * watts * (time.perf_counter() - start)),
    )


def test_energy_per_step_and_token_from_the_counter(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake_nvml())
    recipe = llama31_405b.pretrain_recipe(size="debug", cpu=True, max_steps=6,
                                          dir=str(tmp_path))
    recipe.log.ckpt = None
    recipe.trainer.callbacks.append(run.Config(EnergyMetrics, every_n_steps=2))
    _, trainer = train(recipe)
    energy = next(cb for cb in trainer.callbacks if isinstance(cb, EnergyMetrics))
    tokens_per_step = 8 * 128  # debug preset: GBS 8, seq 128
    assert energy.total_tokens == 6 * tokens_per_step
    # energy / time is the fake GPU's power; the counter is in mJ
    assert energy.total_joules / energy.total_seconds == pytest.approx(WATTS, rel=0.02)
    metrics = trainer.callback_metrics
    assert float(metrics["power_w_per_gpu"]) == pytest.approx(WATTS, rel=0.05)
    assert float(metrics["energy_j_per_token"]) * tokens_per_step == pytest.approx(
        float(metrics["energy_j_per_step"]), rel=1e-4)
    lines = [line for line in capsys.readouterr().out.splitlines() if "J/token" in line]
    assert [line.split("|")[0].split()[1] for line in lines[:3]] == ["2", "4", "6"]
    assert lines[-1].startswith("energy: ") and f"{6 * tokens_per_step} tokens" in lines[-1]


def test_without_an_energy_counter_the_callback_stays_quiet(monkeypatch, caplog):
    def unsupported(handle):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    nvml = fake_nvml()
    nvml.nvmlDeviceGetTotalEnergyConsumption = unsupported
    assert open_meter(nvml) is None
    assert "energy metrics off" in caplog.text


def test_gpu_recipes_log_energy_and_cpu_recipes_do_not():
    def callbacks(recipe):
        return [cb.__fn_or_cls__ for cb in recipe.trainer.callbacks]

    assert EnergyMetrics in callbacks(llama31_405b.pretrain_recipe())
    assert EnergyMetrics not in callbacks(llama31_405b.pretrain_recipe(size="debug", cpu=True))
