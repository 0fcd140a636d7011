"""1 vs 2 GPUs through the real launch path (``recipes/*.py``, torchrun
via NeMo-Run for two), in one job.

    python bench/scaling.py [--steps 12] [--only PATTERN ...]

Proxies as in bench/bench.py: the Llama 3.1 8B widths with 8 layers and
coom_deepseek's 16b widths with 4 layers (1 dense, 3 MoE, MTP), sequence
4096, MBS 1, mock data. The global batch is 8 sequences per GPU, so
each GPU does the same work per step at 1 and 2 GPUs (weak scaling):
scaling efficiency = (tokens/s per GPU at 2) / (tokens/s at 1). With TP2
each sequence is split over both GPUs, so a GPU does half the work per
sequence and the batch stays 8 per GPU as well.

tokens/s and model TFLOP/s per GPU: the median, over the steps after
the first 4, of what the recipe's own step metrics log to TensorBoard
(``tokens_per_sec``, ``model_tflops_per_gpu``, ``energy_j_per_token``).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ, PER_GPU_BATCH = 4096, 8
LLAMA = ["recipes/llama31_405b.py", "--size", "8b", "--no-mlperf",
         "model.config.num_layers=8"]
MOE = ["recipes/deepseek_moe.py", "--size", "16b", "model.config.num_layers=4",
       "model.config.moe_layer_freq=[0,1,1,1]"]
# The recipe's own Llama 3.1 8B (32 layers, vocabulary 128256) at
# its sequence length 8192: the per-GPU rate beside NVIDIA's.
LLAMA_8B = ["recipes/llama31_405b.py", "--size", "8b", "--no-mlperf"]
# name: (script and model, GPUs, layout, extra flags)
CONFIGS = {
    "llama-1gpu": (LLAMA, 1, "TP1", []),
    "llama-dp2": (LLAMA, 2, "TP1", []),
    "llama-tp2": (LLAMA, 2, "TP2", []),
    "moe-1gpu": (MOE, 1, "EP1", []),
    "moe-ep2": (MOE, 2, "EP2", []),
    "llama31-8b-bf16-dp2": (LLAMA_8B, 2, "TP1", ["--seq-length", "8192"]),
    "llama31-8b-fp8-dp2": (LLAMA_8B, 2, "TP1", ["--seq-length", "8192",
                                                "--precision", "fp8-current"]),
}


def command(name: str, steps: int, workdir: Path) -> list[str]:
    model, gpus, layout, extra = CONFIGS[name]
    flags = [a for a in model[1:] if a.startswith("--") or not a.count("=")]
    overrides = [a for a in model[1:] if a not in flags]
    return [sys.executable, str(ROOT / model[0]), *flags, "--gpus-per-node", str(gpus),
            "--layout", layout, "--gbs", str(PER_GPU_BATCH * gpus), "--mbs", "1",
            "--seq-length", str(SEQ), "--max-steps", str(steps), "--dir", str(workdir / name),
            *extra, *overrides, "log.ckpt=None", "trainer.enable_checkpointing=False",
            f"trainer.val_check_interval={steps + 1}", "trainer.limit_val_batches=0"]


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return found


def measure(name: str, steps: int, workdir: Path, log) -> dict:
    _, gpus, layout, _ = CONFIGS[name]
    cmd = command(name, steps, workdir)
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=540)
    log.write(f"\n===== {name} rc={done.returncode} {time.time() - started:.0f}s\n"
              f"{' '.join(cmd)}\n{done.stdout}{done.stderr}")
    log.flush()
    if done.returncode:
        errors = [line for line in (done.stdout + done.stderr).splitlines()
                  if re.search(r"Error|error", line)]
        return dict(name=name, error=(errors[-1] if errors else f"rc={done.returncode}")[:200])
    values = scalars(workdir / name)
    skip = 4

    def median(tag, per_gpu=False):
        series = values.get(tag, [])[skip:]
        return statistics.median(series) / (gpus if per_gpu else 1) if series else None

    return dict(name=name, gpus=gpus, layout=layout,
                tok_s_per_gpu=median("tokens_per_sec", per_gpu=True),
                tflops_per_gpu=median("model_tflops_per_gpu"),
                j_per_token=median("energy_j_per_token"),
                losses=values.get("reduced_train_loss", []))


def table(results: dict) -> list[str]:
    lines = ["| config | GPUs | layout | tokens/s per GPU | model TFLOP/s per GPU | "
             "efficiency vs 1 GPU | J/token |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} ||||||")
            continue
        one = results.get(name.split("-")[0] + "-1gpu", {}).get("tok_s_per_gpu")
        if name.startswith("llama31-8b"):
            one = None
        eff = f"{r['tok_s_per_gpu'] / one:.1%}" if one and r["tok_s_per_gpu"] else "-"
        joules = f"{r['j_per_token']:.4f}" if r.get("j_per_token") else "-"
        lines.append(f"| {name} | {r['gpus']} | {r['layout']} | {r['tok_s_per_gpu'] / 1e3:.1f}K "
                     f"| {r['tflops_per_gpu']:.0f} | {eff} | {joules} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--only", nargs="*", help="regexes of config names (default: all)")
    p.add_argument("--workdir", default="/tmp/coom_scaling")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    names = [n for n in CONFIGS if not args.only or any(re.search(x, n) for x in args.only)]
    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with open(out / "scaling.log", "a") as log:
        for name in names:
            results[name] = measure(name, args.steps, workdir, log)
            print(json.dumps(results[name]), flush=True)
            (out / "scaling.json").write_text(json.dumps(results, indent=1))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} python bench/scaling.py --steps {args.steps}")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
