"""The launch arguments every coom factory takes, declared once.

``nemo llm pretrain --factory "coom_deepseek(size=debug, cpu=True)"``
and the ``recipes/*.py`` flags parse values by the factory's signature,
so the arguments must be real parameters of it. :func:`launch_arguments`
adds them to a factory written as ``def recipe(own args, **launch)``.
"""

# No `from __future__ import annotations`: the annotations below are
# the types NeMo-Run parses CLI values into.
import functools
import inspect
from typing import Optional

# name: (type, default). ``size``'s default is each factory's own.
LAUNCH_ARGUMENTS = {
    "size": (str, None),  # a key of the recipe's presets
    "dir": (Optional[str], None),  # logs and checkpoints
    "name": (Optional[str], None),  # run name; default <family>_<size>
    "num_nodes": (Optional[int], None),  # changes data parallelism only
    "gpus_per_node": (Optional[int], None),  # CPU mode: gloo processes
    "global_batch_size": (Optional[int], None),
    "micro_batch_size": (Optional[int], None),
    "seq_length": (Optional[int], None),
    "max_steps": (Optional[int], None),
    "precision": (str, "bf16"),  # bf16 fp16 fp8-delayed fp8-current fp8-blockwise
    "layout": (Optional[str], None),  # e.g. "TP8.PP9.VP7.CP4"
    "data_paths": (Optional[list[str]], None),  # indexed prefixes; None: mock
    "tokenizer": (Optional[str], None),  # null:<vocab> sentencepiece:<f> hf:<dir>
    "cpu": (bool, False),  # CPU mode (gloo, fp32)
}


def launch_arguments(size: str, exclude: tuple[str, ...] = ()):
    """Decorator: give ``fn(own args..., **launch)`` the launch
    arguments (minus ``exclude``) as parameters, defaults filled in."""

    def decorate(fn):
        own = [p for p in inspect.signature(fn).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        launch = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    default=size if name == "size" else default,
                                    annotation=annotation)
                  for name, (annotation, default) in LAUNCH_ARGUMENTS.items()
                  if name not in exclude]
        signature = inspect.Signature(
            launch + own, return_annotation=inspect.signature(fn).return_annotation)

        @functools.wraps(fn)
        def factory(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check_launch_arguments(bound.arguments)
            return fn(**bound.arguments)

        factory.__signature__ = signature
        return factory

    return decorate


# Counts that must be 1 or more when given; flags as recipes/*.py
# spells them.
COUNTS = {"num_nodes": "--nodes", "gpus_per_node": "--gpus-per-node",
          "global_batch_size": "--gbs", "micro_batch_size": "--mbs",
          "seq_length": "--seq-length", "max_steps": "--max-steps"}


def check_launch_arguments(arguments: dict) -> None:
    """One line for a launch argument that cannot work, before the
    recipe is built (``max_steps=0`` would run the whole schedule)."""
    for name, flag in COUNTS.items():
        value = arguments.get(name)
        if value is not None and value < 1:
            raise ValueError(f"{name}: is {value}; use 1 or more ({flag})")
