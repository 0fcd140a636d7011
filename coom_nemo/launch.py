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
    p.add_argument("--verbose", action="store_true",
                   help="show framework output too (default: in the run's log file)")
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
        if kind is bool:  # --flag, and --no-flag for one that is on by default
            action = argparse.BooleanOptionalAction if param.default else "store_true"
            group.add_argument(flag, action=action, **common)
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

    from coom_nemo import console
    from coom_nemo.recipe import check_recipe, plan_check_deferred

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
    with plan_check_deferred():  # checked once below, overrides applied
        recipe = factory(**common, **factory_kwargs(args, factory))
    if args.overrides:
        check_overrides(recipe, args.overrides)
        parse_cli_args(recipe, args.overrides, recipe)
    plan = check_recipe(recipe)
    if console.is_rank_zero():
        console.plan_line(plan.summary_line())
    return recipe


def check_overrides(recipe, overrides) -> None:
    """Each ``key=value`` must name a field of the recipe; a typo gets
    one line with the closest names."""
    import difflib
    import re

    import fiddle as fdl

    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r}: write key=value, e.g. trainer.max_steps=10")
        key = re.split(r"[+\-*/]?=", override, maxsplit=1)[0]
        node, seen = recipe, []
        for part in key.split("."):
            if not isinstance(node, fdl.Buildable) or _takes_any(node):
                break
            part, indexed = part.split("[")[0], "[" in part  # callbacks[0]: checked no deeper
            names = _field_names(node)
            if part not in names:
                where = ".".join(seen) or "the recipe"
                close = difflib.get_close_matches(part, names, n=1)
                hint = (f"did you mean {'.'.join([*seen, close[0]])}?" if close
                        else f"its fields: {', '.join(sorted(names))}")
                raise ValueError(f"override {override!r}: {where} has no field {part!r}; {hint}")
            seen.append(part)
            node = None if indexed else getattr(node, part, None)


def _field_names(node) -> list[str]:
    params = inspect.signature(node.__fn_or_cls__).parameters
    return sorted(set(node.__arguments__) | set(params) - {"self"})


def _takes_any(node) -> bool:
    params = inspect.signature(node.__fn_or_cls__).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


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


def torchrun(recipe, job_dir: str) -> int:
    """Run ``recipe`` on this node's GPUs, one torchrun process each,
    and return torchrun's exit status (non-zero when any rank failed).

    The recipe is serialized as NeMo-Run serializes it and started
    through NeMo-Run's own runner (``fdl_runner``), as NeMo-Run's local
    executor does; NeMo-Run's experiment does not report how a local
    job ended (its job state stays SUBMITTED or RUNNING).
    """
    import subprocess
    import time

    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    name = recipe.log.name
    folder = Path(job_dir) / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "recipe.zlib.json"
    config.write_text(ZlibJSONSerializer().serialize(recipe))
    env = {**os.environ, "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "NCCL_NVLS_ENABLE": "0"}
    return subprocess.call(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={recipe.trainer.devices}", "-m", "nemo_run.core.runners.fdl_runner",
         "-n", name, str(config)], env=env)


def main(factory, default_size: str, argv=None) -> int:
    import nemo_run as run

    from coom_nemo import console
    from coom_nemo.guards import RunStoppedError
    from coom_nemo.plan import PlanError

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, default_size, factory)
    except SystemExit:  # --help, or a bad flag: argparse's lines only
        console.configure(verbose=False)
        raise
    console.configure(verbose=args.verbose or args.dryrun)
    try:
        recipe = build(factory, args)
        if args.executor == "local" and not args.dryrun:
            check_this_host(recipe)
    except (PlanError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = recipe.log.name
    if args.dryrun:
        print(recipe)
    # One GPU, or CPU mode (Lightning starts the other gloo ranks
    # itself): in this process. Several GPUs: torchrun on this node.
    if args.executor == "local" and (recipe.trainer.accelerator == "cpu"
                                     or recipe.trainer.devices == 1):
        try:
            run.run(recipe, name=name, dryrun=args.dryrun, direct=True)
        except PlanError:  # the run-folder check (coom_nemo.api); the console printed it
            return 2
        except RunStoppedError as error:  # a diverged loss (coom_nemo.guards)
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    console.stop()  # a launcher relays the workers' consoles as they are
    if args.executor == "slurm":
        run.run(recipe, executor=slurm_executor(args, recipe), name=name, dryrun=args.dryrun)
        return 0
    if args.dryrun:
        run.run(recipe, executor=run.LocalExecutor(ntasks_per_node=recipe.trainer.devices,
                                                   launcher="torchrun"), name=name, dryrun=True)
        return 0
    code = torchrun(recipe, args.job_dir)
    if code:
        print(f"error: the {name} job failed (torchrun exit status {code}); the failing "
              "rank's error is above", file=sys.stderr)
    return code
