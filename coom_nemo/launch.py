"""Command line behind ``recipes/*.py``: build a recipe, check its plan,
run it here or submit it to Slurm.

``python recipes/llama31_405b.py --executor slurm --nodes 72 --dryrun``
prints the resolved recipe, the sbatch script and the summary line.
Slurm settings come from flags or, like MLPerf's ``config.sh``, from
the environment (``SLURM_ACCOUNT``, ``SLURM_PARTITION``, ``CONT``,
``MOUNTS``, ``WALLTIME``; ``NNODES``, ``GPUS_PER_NODE`` as in the MLPerf
reference's config.sh). A factory's own arguments beyond the common ones
become flags too (``--c4-dir``, ``--target-log-ppl``). Trailing
``key=value`` arguments override the recipe as ``nemo llm pretrain``
does (``trainer.max_steps=10``).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import typing
from pathlib import Path

from coom_nemo.factory import LAUNCH_ARGUMENTS

CONTAINER = "nvcr.io/nvidia/nemo:26.02"


# Factory arguments the common flags below set (see build()).
COMMON = tuple(LAUNCH_ARGUMENTS)  # have flags of their own below


def parse_args(argv, default_size: str, factory=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--dryrun", action="store_true", help="print, launch nothing")
    p.add_argument("--cpu", action="store_true",
                   help="CPU mode (gloo, fp32): for hosts without a GPU")
    p.add_argument("--size", default=default_size, help="model size preset")
    p.add_argument("--nodes", type=int, default=_env_int("NNODES"),
                   help="number of nodes (changes DP)")
    p.add_argument("--gpus-per-node", type=int, default=_env_int("GPUS_PER_NODE"),
                   help="GPUs per node (CPU mode: gloo processes)")
    p.add_argument("--layout", help="parallel layout, e.g. TP8.PP9.CP2.VP7")
    p.add_argument("--gbs", type=int, help="global batch size")
    p.add_argument("--mbs", type=int, help="micro batch size")
    p.add_argument("--seq-length", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--precision", default="bf16",
                   help="bf16, fp16, fp8-delayed, fp8-current, fp8-blockwise, fp32")
    p.add_argument("--data", nargs="+", help="indexed dataset prefixes (default: mock)")
    p.add_argument("--tokenizer", help="null:<vocab>, sentencepiece:<file>, hf:<path>")
    p.add_argument("--dir", help="log/checkpoint directory")
    p.add_argument("--name", help="run name")
    slurm = p.add_argument_group("slurm (defaults from the environment)")
    slurm.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT", "coom"))
    slurm.add_argument("--partition", default=os.environ.get("SLURM_PARTITION", "batch"))
    slurm.add_argument("--container-image", default=os.environ.get("CONT", CONTAINER))
    slurm.add_argument("--container-mounts", nargs="*",
                       default=[m for m in os.environ.get("MOUNTS", "").split(",") if m])
    slurm.add_argument("--time", default=os.environ.get("WALLTIME", "04:00:00"))
    slurm.add_argument("--job-dir", default=os.environ.get("COOM_JOB_DIR",
                                                           str(Path.cwd() / "coom_jobs")))
    if factory is not None:
        _add_factory_flags(p.add_argument_group("recipe"), factory)
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    return p.parse_args(argv)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _add_factory_flags(group, factory) -> None:
    """A flag for each factory argument that COMMON does not cover."""
    for name, param in inspect.signature(factory).parameters.items():
        if name in COMMON:
            continue
        kind = next((t for t in typing.get_args(param.annotation) if t is not type(None)),
                    param.annotation)
        flag = "--" + name.replace("_", "-")
        # SUPPRESS: an absent flag leaves the factory's own default
        common = dict(default=argparse.SUPPRESS, help=f"recipe default: {param.default}")
        if kind is bool:
            group.add_argument(flag, action="store_true", **common)
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], **common)
        else:
            group.add_argument(flag, type=kind, **common)


def factory_kwargs(args: argparse.Namespace, factory) -> dict:
    """Factory arguments given as flags beyond the common ones."""
    names = [n for n in inspect.signature(factory).parameters if n not in COMMON]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def build(factory, args: argparse.Namespace):
    """The recipe the arguments ask for, overrides applied, plan
    checked."""
    from nemo_run.cli.cli_parser import parse_cli_args

    from coom_nemo.recipe import check_recipe

    common = dict(
        dir=args.dir, name=args.name, size=args.size, num_nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, global_batch_size=args.gbs,
        micro_batch_size=args.mbs, seq_length=args.seq_length, max_steps=args.max_steps,
        precision=args.precision, layout=args.layout, data_paths=args.data,
        tokenizer=args.tokenizer, cpu=args.cpu,
    )
    # fine-tuning factories read JSONL and the checkpoint's tokenizer
    takes = inspect.signature(factory).parameters
    for name in [n for n in common if n not in takes]:
        if common.pop(name) is not None:
            flag = {"data_paths": "data"}.get(name, name)
            raise ValueError(f"--{flag}: this recipe does not take it; see --help")
    recipe = factory(**common, **factory_kwargs(args, factory))
    if args.overrides:
        parse_cli_args(recipe, args.overrides, recipe)
        check_recipe(recipe)
    return recipe


def check_this_host(recipe) -> None:
    """A local launch runs on this host: refuse what it cannot run
    (FP8 without TransformerEngine, a GPU recipe without a GPU) before
    any process starts. A Slurm job checks its own node instead, when
    its trainer is built (the login node may lack TE or GPUs)."""
    import fiddle as fdl

    from coom_nemo.trainer import check_host

    check_host(recipe.trainer.accelerator, fdl.build(recipe.trainer.plugins))


def slurm_executor(args: argparse.Namespace, recipe):
    import nemo_run as run

    nodes = recipe.trainer.num_nodes
    gpus = recipe.trainer.devices
    return run.SlurmExecutor(
        account=args.account,
        partition=args.partition,
        nodes=nodes,
        ntasks_per_node=gpus,
        gpus_per_node=gpus,
        time=args.time,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
        exclusive=True,
        mem="0",
        tunnel=run.LocalTunnel(job_dir=args.job_dir),
        packager=run.Packager(),
        env_vars={"TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "NCCL_NVLS_ENABLE": "0",
                  "NVTE_FLASH_ATTN": "1", "NVTE_FUSED_ATTN": "1"},
    )


def local_executor(recipe):
    """None runs in this process (one GPU, or CPU mode where Lightning
    starts the other gloo ranks itself); else torchrun on this node."""
    import nemo_run as run

    gpus = recipe.trainer.devices
    if recipe.trainer.accelerator == "cpu" or gpus == 1:
        return None
    return run.LocalExecutor(ntasks_per_node=gpus, launcher="torchrun")


def main(factory, default_size: str, argv=None) -> int:
    import nemo_run as run

    from coom_nemo.plan import PlanError

    args = parse_args(sys.argv[1:] if argv is None else argv, default_size, factory)
    try:
        recipe = build(factory, args)
        if args.executor == "local" and not args.dryrun:
            check_this_host(recipe)
    except (PlanError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    executor = slurm_executor(args, recipe) if args.executor == "slurm" else local_executor(
        recipe)
    name = recipe.log.name
    if args.dryrun:
        print(recipe)
    run.run(recipe, executor=executor, name=name, dryrun=args.dryrun,
            direct=executor is None)
    return 0
