"""Checkpoint conversion between Hugging Face and NeMo, for every
family: the import and export flows around a family's mapping table
(:mod:`coom_nemo.models.hf_mapping`), and the host and path checks
they share.

:class:`TableImporter` and :class:`TableExporter` are mixed in front
of NeMo 2.7.3's HF connectors of a family (whose checkpoint setup,
saving, loading and tokenizer handling they keep) and replace their
conversion: NeMo's ``apply_transforms`` drops what its name patterns
miss (nemo/lightning/io/state.py:154-207), and transformers'
``from_pretrained`` drops file tensors its model lacks and initialises
the ones the files lack. Here the checkpoint's tensors are checked
against transformers' model of the target config before anything is
built, and the table's :func:`~coom_nemo.models.hf_mapping.convert`
accounts for every tensor on both sides.
"""

from __future__ import annotations

import contextlib
import json
import logging
from functools import cached_property
from pathlib import Path

import torch
from nemo.lightning import io

from coom_nemo.models.hf_mapping import (
    TIED,
    CheckpointMismatchError,
    first_of,
    hf_to_megatron,
    megatron_state,
    megatron_to_hf,
    shapes,
)


def read_safetensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory: the files its
    ``model.safetensors.index.json`` names (as transformers reads
    them), else every ``*.safetensors``. A tensor in two files, a file
    the index names that is missing and one that cannot be read are
    refused in one line."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / name for name in names]
        absent = [file.name for file in files if not file.is_file()]
        if absent:
            raise FileNotFoundError(f"hf_dir: {absent[0]} (named in {index.name}) is missing "
                                    f"in {directory}; copy the whole checkpoint")
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"hf_dir: no *.safetensors in {directory}; give a Hugging "
                                "Face checkpoint directory")
    tensors, source = {}, {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key in source:
                        raise CheckpointMismatchError(
                            key, f"in both {source[key]} and {file.name}",
                            "keep one copy of each tensor (a stray file in the directory?)")
                    tensors[key], source[key] = f.get_tensor(key), file.name
        except SafetensorError as error:
            raise ValueError(f"hf_dir: {file} cannot be read ({error}); copy it again") \
                from None
    return tensors


def check_hf_tensors(tensors: dict[str, torch.Tensor], hf_config) -> None:
    """Refuse, in one line, a checkpoint tensor that transformers' model
    of ``hf_config`` lacks, one it has and the checkpoint lacks, or the
    first (in model order) shaped otherwise."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    expected = shapes(model.state_dict())
    if hf_config.tie_word_embeddings:  # saved once, as the embedding
        expected.pop(TIED, None)
        tensors = {k: v for k, v in tensors.items() if k != TIED}
    fix = "give a complete checkpoint of one architecture and its own config"
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointMismatchError(first_of(unexpected), "in the checkpoint but not in "
                                      f"transformers' {type(model).__name__} of the config", fix)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointMismatchError(first_of(missing), "missing from the checkpoint", fix)
    for name, want in expected.items():
        if tuple(tensors[name].shape) != tuple(want):
            raise CheckpointMismatchError(
                name, f"shape {tuple(tensors[name].shape)} in the checkpoint, but the config "
                f"expects {tuple(want)}", "import into a config of the checkpoint's shape (the "
                "default reads its config.json)")


class TableImporter:
    """HF directory -> NeMo checkpoint through the family's table.

    A family sets ``mappings`` (config -> rows), and may widen
    :meth:`hf_tensors` and :meth:`expected_hf_config`.
    """

    mappings = None

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        return read_safetensors(self)

    def expected_hf_config(self):
        """What the tensors must fit: the checkpoint's own config."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self))

    def apply(self, output_path: Path) -> Path:
        from nemo.lightning import teardown

        tensors = self.hf_tensors()
        check_hf_tensors(tensors, self.expected_hf_config())
        target = self.init()
        trainer = self.nemo_setup(target)
        hf_to_megatron(tensors, target, self.mappings(self.config), self.config)
        self.nemo_save(output_path, trainer)
        teardown(trainer, target)
        return output_path


class TableExporter:
    """NeMo checkpoint -> transformers model (and the tokenizer when it
    is a HF one) through the family's table: ``mappings`` (config ->
    rows) and ``hf_config_of`` (NeMo config -> transformers' config,
    refusing what the HF form cannot hold, before the weights load)."""

    mappings = hf_config_of = None

    def exported(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The megatron-core tensors that have a HF form (all)."""
        return state

    def apply(self, output_path: Path) -> Path:
        from nemo.collections.llm.gpt.model.base import torch_dtype_from_mcore_config
        from transformers import AutoModelForCausalLM
        from transformers.modeling_utils import no_init_weights

        hf_config = self.config
        source, _ = self.nemo_load(str(self))
        state = megatron_state(source)
        if any(".adapter." in name for name in state):
            raise ValueError("checkpoint: a LoRA run's checkpoint holds its adapters, not "
                             "the model; export them with export_lora (PEFT format)")
        with no_init_weights():
            target = AutoModelForCausalLM.from_config(
                hf_config, dtype=torch_dtype_from_mcore_config(source.config))
        tensors = megatron_to_hf(self.exported(state), shapes(target.state_dict()),
                                 self.mappings(self.nemo_config), self.nemo_config)
        # copies, in the HF model's dtype; a tied lm_head is the
        # embedding
        target.load_state_dict(tensors, strict=not hf_config.tie_word_embeddings)
        target.save_pretrained(output_path)
        save_hf_tokenizer(self.tokenizer, output_path)
        return output_path

    @cached_property
    def nemo_config(self):
        return io.load_context(str(self), subpath="model.config")

    @cached_property
    def tokenizer(self):
        return io.load_context(str(self), subpath="model.tokenizer")

    @cached_property
    def config(self):
        return self.hf_config_of(self.nemo_config)


class _Loader(io.ModelConnector):
    """Only for ``nemo_load``."""


@contextlib.contextmanager
def loaded(checkpoint):
    """The model of a NeMo checkpoint of any family (LoRA adapters in),
    built on this host, for inspection or export here."""
    with on_this_host():
        model, _ = _Loader(str(checkpoint)).nemo_load(str(checkpoint))
        yield model


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
