"""Progressive growth on CPU: 2 -> 4 layers vs 4 layers from scratch.

For each seed: the debug Llama 3.1 with 2 layers trains SMALL steps, is
grown to 4 layers (G_stack: 0, 1, 0, 1) and trains TOTAL - SMALL more
steps, with and without a fresh LR warmup; beside it the 4-layer model
trains TOTAL steps from scratch, on the same data and LR peak. Loss
is plotted against cumulative training FLOPs (coom_nemo.model_math).
Run once, from the repository root, under the shared lock:

    flock /tmp/coom-heavy.lock .venv/bin/python bench/grow_experiment.py

Writes bench/grow_results/{curves.json,grow_loss_vs_flops.png,table.md}.
It builds data/english as scripts/demo.sh does, if missing.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT / "data" / "english"
TOKENIZER = f"sentencepiece:{DATA}/spm1024.model"
OUT = ROOT / "bench" / "grow_results"
RUNS = ROOT / "runs" / "grow_experiment"  # git-ignored
LR, MIN_LR, WARMUP = 3e-3, 3e-4, 10
SMOOTH = 20  # steps in the moving average of the training loss


def prepare_data():
    py = sys.executable
    if not (DATA / "indexed" / "train.idx").exists():
        subprocess.run([py, "-m", "data_prep.english_corpus", "--output", str(DATA)], check=True)
        if not (DATA / "spm1024.model").exists():
            subprocess.run([py, "-m", "data_prep.train_tokenizer", "--vocab-size", "1024",
                            "--input", str(DATA / "fortunes-train.txt"),
                            "--output", str(DATA / "spm1024")], check=True)
        subprocess.run([py, "-m", "data_prep.tinystories", "--input", str(DATA),
                        "--tokenizer", TOKENIZER, "--output", str(DATA / "indexed")],
                       check=True)


def run(name, layers, steps, seed, warmup, restore=None, data_seed=None):
    """Train the debug Llama: (losses, FLOPs per step, run dir)."""
    import fiddle as fdl
    import nemo_run as nrun
    from helpers import train

    from coom_nemo.model_math import model_flops_per_token
    from coom_nemo.recipe import FixedCosineAnnealingScheduler
    from coom_nemo.recipes import FACTORIES

    out = RUNS / name
    recipe = FACTORIES["coom_llama31_405b"](
        size="debug", cpu=True, dir=str(out), max_steps=steps, seed=seed,
        data_paths=[str(DATA / "indexed" / "train")], tokenizer=TOKENIZER,
        restore_path=str(restore) if restore else None)
    recipe.model.config.num_layers = layers
    recipe.optim.config.lr = LR
    recipe.optim.lr_scheduler = nrun.Config(FixedCosineAnnealingScheduler, max_steps=steps,
                                            warmup_steps=warmup, constant_steps=0,
                                            min_lr=MIN_LR)
    recipe.trainer.limit_val_batches = 0
    recipe.data.seed = seed if data_seed is None else data_seed
    config = fdl.build(recipe.model.config)
    flops = model_flops_per_token(config) * recipe.data.global_batch_size * config.seq_length
    recorder, _ = train(recipe)
    return recorder.losses, flops, out


def last_checkpoint(run_dir: Path) -> Path:
    return next(run_dir.glob("*/checkpoints/*-last"))


def smooth(losses):
    return [sum(losses[max(0, i - SMOOTH + 1):i + 1]) / len(losses[max(0, i - SMOOTH + 1):i + 1])
            for i in range(len(losses))]


def flops_to_reach(curve, target):
    """First cumulative FLOPs where the smoothed loss is <= target."""
    for flops, loss in curve:
        if loss <= target:
            return flops
    return None


def main():
    from coom_nemo import grow

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--small-steps", type=int, default=100)
    parser.add_argument("--total-steps", type=int, default=300)
    parser.add_argument("--report", action="store_true",
                        help="only redo the table and plot from curves.json")
    args = parser.parse_args()
    if args.report:
        return report(json.loads((OUT / "curves.json").read_text()), args.seeds)
    prepare_data()
    OUT.mkdir(parents=True, exist_ok=True)
    small_steps, total = args.small_steps, args.total_steps
    curves = {}
    for seed in args.seeds:
        small, f2, small_dir = run(f"s{seed}-small", 2, small_steps, seed, WARMUP)
        grown_ckpt = RUNS / f"s{seed}-grown"
        grow.grow_checkpoint(last_checkpoint(small_dir), grown_ckpt, grow.Growth(layers=4))
        spent = small_steps * f2
        for label, warmup in (("grown_rewarmup", WARMUP), ("grown_no_rewarmup", 0)):
            # the continuation draws batches in another order: the
            # grown model should not meet the small model's batches
            # first again
            losses, f4, _ = run(f"s{seed}-{label}", 4, total - small_steps, seed, warmup,
                                restore=grown_ckpt, data_seed=seed + 1000)
            curves[f"{label}/{seed}"] = [(spent + (i + 1 - small_steps) * f4, loss)
                                         for i, loss in enumerate(smooth(small + losses))
                                         if i >= small_steps]
        curves[f"small/{seed}"] = [((i + 1) * f2, loss) for i, loss in enumerate(smooth(small))]
        scratch, f4, _ = run(f"s{seed}-scratch", 4, total, seed, WARMUP)
        curves[f"scratch/{seed}"] = [((i + 1) * f4, loss) for i, loss in enumerate(
            smooth(scratch))]
        (OUT / "curves.json").write_text(json.dumps(curves))
    report(curves, args.seeds)


def report(curves, seeds):
    rows = ["| seed | scratch final loss | grown (re-warmup) final | grown (no re-warmup) final "
            "| FLOPs saved to reach scratch's final loss: re-warmup | no re-warmup |",
            "|---|---|---|---|---|---|"]
    for seed in seeds:
        scratch = curves[f"scratch/{seed}"]
        target, total = scratch[-1][1], scratch[-1][0]
        cells = [str(seed), f"{target:.3f}"]
        saved = []
        for label in ("grown_rewarmup", "grown_no_rewarmup"):
            curve = curves[f"{label}/{seed}"]
            cells.append(f"{curve[-1][1]:.3f}")
            reach = flops_to_reach(curve, target)
            saved.append("not reached" if reach is None
                         else f"{100 * (total - reach) / total:+.1f}%")
        rows.append("| " + " | ".join(cells + saved) + " |")
    (OUT / "table.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    plot(curves, seeds)


def plot(curves, seeds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"scratch": "black", "small": "tab:gray", "grown_rewarmup": "tab:blue",
              "grown_no_rewarmup": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, curve in curves.items():
        label, seed = key.split("/")
        xs, ys = zip(*curve, strict=True)
        ax.plot([x / 1e12 for x in xs], ys, color=colors[label], lw=1,
                label=label.replace("_", " ") if seed == str(seeds[0]) else None)
    ax.set_xlabel("cumulative training FLOPs (TFLOP)")
    ax.set_ylabel(f"training loss ({SMOOTH}-step moving average)")
    ax.set_title("debug Llama 3.1, English corpus: 2 -> 4 layers (stack) vs 4 from scratch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "grow_loss_vs_flops.png", dpi=120)


if __name__ == "__main__":
    main()
