"""Checkpoint conversion that accounts for every tensor.

NeMo 2.7.3's ``io.apply_transforms`` fills what its name patterns
reach and keeps the rest (nemo/lightning/io/state.py:154-207): a
checkpoint tensor whose target name the model lacks is dropped with a
"No matches found" log line, and a weight that no pattern reaches keeps
its initial value. :func:`convert_checked` runs a conversion with every
target tensor set to NaN and every source read recorded, then refuses,
in one line, a source tensor nothing read or a target tensor left
(partly) unset.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from nemo.lightning.io.state import _ModelState


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor that the target cannot hold, or a target
    tensor the checkpoint does not make."""

    def __init__(self, tensor: str, problem: str, fix: str):
        self.tensor = tensor
        super().__init__(f"{tensor}: {problem}; {fix}")


class _ReadRecorder(dict):
    """A state dict that remembers which keys were read."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def first_of(names: list[str]) -> str:
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def _module(model):
    return getattr(model, "module", None) or model


def convert_checked(convert, source: dict[str, torch.Tensor], target, *,
                    source_name: str = "checkpoint", target_name: str = "model",
                    source_config=None):
    """``convert(_ModelState(source, source_config), target)``, refused
    (before anything is saved) unless it read every tensor of
    ``source`` and set every floating-point tensor of ``target``'s
    state dict (``target`` must not share storage with ``source``).

    TransformerEngine's ``_extra_state`` entries are not weights and
    are left out on both sides.
    """
    recorded = _ReadRecorder(source)
    with torch.no_grad():
        for tensor in _module(target).state_dict().values():
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                tensor.fill_(float("nan"))
    converted = convert(_ModelState(recorded, source_config), target)
    # ``recorded`` as the conversion left it (it may rename keys)
    unread = sorted(name for name in recorded
                    if name not in recorded.read and not name.endswith("_extra_state"))
    if unread:
        raise CheckpointMismatchError(
            first_of(unread), f"in the {source_name} but converted into no tensor of the "
            f"{target_name}", f"convert into a {target_name} config of the {source_name}'s "
            "architecture (a tensor would otherwise be dropped)")
    unset = [name for name, tensor in _module(target).state_dict().items()
             if torch.is_tensor(tensor) and tensor.is_floating_point()
             and torch.isnan(tensor).any()]
    if unset:
        raise CheckpointMismatchError(
            first_of(unset), f"in the {target_name} but made from no tensor of the "
            f"{source_name}", f"give a {source_name} with every tensor of this architecture "
            "(it would otherwise keep its initial value)")
    return converted


@contextlib.contextmanager
def on_this_host():
    """NeMo's connectors build the model with ``accelerator="cpu"``:
    on a host without CUDA that needs CPU mode. Afterwards the process
    groups go, so a later run in this process starts clean."""
    from coom_nemo import cpu_mode
    from coom_nemo.strategy import release_global_state

    host = contextlib.nullcontext() if torch.cuda.is_available() else cpu_mode.cpu_mode()
    with host:
        try:
            yield
        finally:
            release_global_state()


def new_output(output_path, field: str = "output_path") -> Path:
    """``output_path`` as a Path, refused if it exists (nothing is
    overwritten)."""
    output = Path(output_path)
    if output.exists():
        raise FileExistsError(f"{field}: {output} already exists; give a new directory "
                              "(nothing is overwritten)")
    return output


def nemo_checkpoint(checkpoint) -> Path:
    """``checkpoint`` as a Path, refused unless it is a NeMo checkpoint
    directory."""
    source = Path(checkpoint)
    if not (source / "context").is_dir():
        raise FileNotFoundError(f"checkpoint: {source}/context does not exist; give a NeMo "
                                "checkpoint directory (with context/ and weights/)")
    return source


def save_hf_tokenizer(tokenizer, output_path) -> None:
    """Write a NeMo tokenizer's HF form beside exported weights, or warn
    that it has none."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hasattr(hf, "save_pretrained"):
        hf.save_pretrained(output_path)
    else:
        logging.getLogger(__name__).warning(
            "the checkpoint's tokenizer (%s) has no HF form: add one to %s",
            type(tokenizer).__name__, output_path)
