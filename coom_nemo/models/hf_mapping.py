"""Weight mappings between Hugging Face and megatron-core, as tables.

A family's mapping is a list of :class:`Mapping` rows, in the manner
of Megatron-Bridge's ``MegatronMappingRegistry``: each row names a
megatron-core parameter and the HF tensor(s) it is made of, with ``*``
standing for a layer number, and converts both ways. Import and export
read the same table, so they cannot disagree.

:func:`convert` fills every tensor a model wants from a source state
dict and checks, by name and count, that nothing is left over on
either side: a wanted tensor no row makes, a row's source that is
missing, a source tensor no row used. Each is refused in one line
naming the first tensor (and how many more), so a weight can no longer
be dropped with only a log warning (NeMo 2.7.3's ``apply_transforms``
logs "No matches found for source key" and goes on).

Rows for the TransformerEngine spec (the norm fused into the next
linear, ``linear_qkv.layer_norm_weight``) and for megatron-core's
local spec (``input_layernorm.weight``) stand side by side: a model
holds one of them, and the row whose names it holds is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


class MappingError(ValueError):
    """A tensor that the mapping cannot account for."""


@dataclass(frozen=True)
class Mapping:
    """One megatron-core parameter and the HF tensor(s) it is made of;
    ``*`` stands for a layer number in both."""

    megatron: str
    hf: tuple[str, ...]

    def to_megatron(self, hf: list[torch.Tensor], config) -> torch.Tensor:
        return hf[0]

    def to_hf(self, megatron: torch.Tensor, config) -> list[torch.Tensor]:
        return [megatron]


def direct(megatron: str, hf: str) -> Mapping:
    return Mapping(megatron, (hf,))


def _qkv_shape(config) -> tuple[int, int, int]:
    heads, groups = config.num_attention_heads, config.num_query_groups or (
        config.num_attention_heads)
    head_dim = config.kv_channels or config.hidden_size // heads
    return groups, heads // groups, head_dim


@dataclass(frozen=True)
class QKV(Mapping):
    """megatron-core's fused ``linear_qkv``: per query group, that
    group's query heads, then its key head, then its value head."""

    def to_megatron(self, hf, config):
        groups, per_group, head_dim = _qkv_shape(config)
        q, k, v = hf
        rest = q.shape[1:]
        parts = [q.reshape(groups, per_group * head_dim, *rest),
                 k.reshape(groups, head_dim, *rest), v.reshape(groups, head_dim, *rest)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def to_hf(self, megatron, config):
        groups, per_group, head_dim = _qkv_shape(config)
        rest = megatron.shape[1:]
        grouped = megatron.reshape(groups, (per_group + 2) * head_dim, *rest)
        q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """megatron-core's fused ``linear_fc1`` of a gated MLP: the gate
    projection's rows, then the up projection's."""

    def to_megatron(self, hf, config):
        return torch.cat(hf, dim=0)

    def to_hf(self, megatron, config):
        return [t.contiguous() for t in megatron.chunk(2, dim=0)]


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\*", r"(\d+)"))


def _filled(names, numbers) -> list[str]:
    filled = []
    for name in names:
        for number in numbers:
            name = name.replace("*", number, 1)
        filled.append(name)
    return filled


def convert(source: dict[str, torch.Tensor], wanted: dict[str, torch.Size],
            mappings: list[Mapping], *, to_hf: bool, config,
            what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of ``wanted`` (name -> shape) made from ``source``.

    ``to_hf`` says which way: False makes megatron-core tensors from HF
    ones, True the reverse. Raises :class:`MappingError` (one line)
    for a wanted tensor that no row makes, a shape that differs, or a
    source tensor that no row used.
    """
    rows = [(row, _pattern(template)) for row in mappings
            for template in (row.hf if to_hf else (row.megatron,))]
    made: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in wanted:
        if name in made:
            continue
        hit = None
        for row, pattern in rows:
            numbers = pattern.fullmatch(name)
            if numbers is None:
                continue
            sources = _filled((row.megatron,) if to_hf else row.hf, numbers.groups())
            targets = _filled(row.hf if to_hf else (row.megatron,), numbers.groups())
            if all(s in source for s in sources):
                hit = row, sources, targets
                break
            hit = hit or (None, sources, targets)
        if hit is None:
            raise MappingError(f"{name}: no mapping makes this tensor; the {what} cannot "
                               "be converted (add a row to the family's mapping table)")
        row, sources, targets = hit
        if row is None:
            missing = [s for s in sources if s not in source]
            raise MappingError(f"{missing[0]}: missing from the {what}, but {name} is made "
                               "of it; give a complete checkpoint of this architecture")
        tensors = [source[s] for s in sources]
        values = row.to_hf(tensors[0], config) if to_hf else [row.to_megatron(tensors, config)]
        for target, value in zip(targets, values, strict=True):
            if target not in wanted:
                raise MappingError(f"{target}: made from {sources[0]}, but the target model "
                                   "has no such tensor; the configs disagree")
            if tuple(value.shape) != tuple(wanted[target]):
                raise MappingError(
                    f"{target}: shape {tuple(value.shape)} from the {what}'s {sources[0]}, "
                    f"but the config expects {tuple(wanted[target])}; convert into a config "
                    "of the checkpoint's shape")
            made[target] = value
        used.update(sources)
    unused = sorted(set(source) - used)
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise MappingError(f"{unused[0]}{more}: in the {what} but used by no tensor of the "
                           "target model; its config does not match the checkpoint")
    return made


def megatron_core(model):
    """The megatron-core GPTModel inside a NeMo model (under its
    precision and DDP wrappers)."""
    while not hasattr(model, "decoder"):
        model = model.module
    return model


def megatron_state(model) -> dict[str, torch.Tensor]:
    """Parameters of a megatron-core model by name (TE's FP8
    ``_extra_state`` entries are not weights)."""
    return {name: tensor for name, tensor in megatron_core(model).state_dict().items()
            if not name.endswith("_extra_state")}
