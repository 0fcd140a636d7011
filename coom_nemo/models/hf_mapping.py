"""Weight mappings between Hugging Face and megatron-core, as tables.

A family's mapping is a list of :class:`Mapping` rows, in the manner
of Megatron-Bridge's ``MegatronMappingRegistry``: each row names
megatron-core tensor(s) and the HF tensor(s) they are made of, with
``*`` standing for a number, and converts both ways. Import, export
and the LoRA export (:mod:`coom_nemo.peft_export`) read the same
table, so they cannot disagree. The Llama, GPT-OSS and DeepSeek
converters all go through it.

:func:`convert` fills every tensor a model wants from a source state
dict and checks, by name and count, that nothing is left over on
either side: a wanted tensor no row makes, a row's source that is
missing, a source tensor no row used. Each is refused in one line
naming the first tensor (and how many more), so a weight can no longer
be dropped with only a log warning (NeMo 2.7.3's ``apply_transforms``,
nemo/lightning/io/state.py:154-207, logs "No matches found for source
key" and goes on, and keeps the initial value of a weight no pattern
reaches).

Rows for the TransformerEngine spec (a norm fused into the next
linear: ``linear_qkv.layer_norm_weight``; grouped experts:
``linear_fc1.weight<e>``) and for megatron-core's local spec
(``input_layernorm.weight``, ``local_experts.<e>.linear_fc1.weight``)
stand side by side: a model holds one of them, and the row whose names
it holds is used.

Where one side of a row has one ``*`` more than the other (HF's
GPT-OSS keeps a layer's experts in one tensor, megatron-core one per
expert), that ``*`` is the expert and ranges over every expert.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch


class CheckpointMismatchError(ValueError):
    """A tensor that the conversion cannot account for."""

    def __init__(self, tensor: str, problem: str, fix: str):
        self.tensor = tensor
        super().__init__(f"{tensor}: {problem}; {fix}")


def first_of(names: list[str]) -> str:
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


@dataclass(frozen=True)
class Mapping:
    """megatron-core tensor(s) and the HF tensor(s) they are made of;
    ``*`` stands for a number (a layer, an expert) on both sides.
    The base row copies one tensor each way.

    ``splits_rows``: the conversion only splits or reorders the output
    rows of a linear's weight, so it applies to a LoRA ``B`` too.
    """

    megatron: tuple[str, ...] | str
    hf: tuple[str, ...] | str
    splits_rows = True

    def __post_init__(self):
        for side in ("megatron", "hf"):
            if isinstance(getattr(self, side), str):
                object.__setattr__(self, side, (getattr(self, side),))

    def to_megatron(self, hf: list[torch.Tensor], config) -> list[torch.Tensor]:
        return hf

    def to_hf(self, megatron: list[torch.Tensor], config) -> list[torch.Tensor]:
        return megatron


direct = Mapping


def _qkv_shape(config) -> tuple[int, int, int]:
    heads, groups = config.num_attention_heads, config.num_query_groups or (
        config.num_attention_heads)
    head_dim = config.kv_channels or config.hidden_size // heads
    return groups, heads // groups, head_dim


@dataclass(frozen=True)
class QKV(Mapping):
    """megatron-core's fused ``linear_qkv`` (weight or bias): per query
    group, that group's query heads, then its key head, then its value
    head."""

    def to_megatron(self, hf, config):
        groups, per_group, head_dim = _qkv_shape(config)
        q, k, v = hf
        rest = q.shape[1:]
        parts = [q.reshape(groups, per_group * head_dim, *rest),
                 k.reshape(groups, head_dim, *rest), v.reshape(groups, head_dim, *rest)]
        return [torch.cat(parts, dim=1).reshape(-1, *rest)]

    def to_hf(self, megatron, config):
        groups, per_group, head_dim = _qkv_shape(config)
        rest = megatron[0].shape[1:]
        grouped = megatron[0].reshape(groups, (per_group + 2) * head_dim, *rest)
        q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """megatron-core's fused ``linear_fc1`` of a gated MLP: the gate
    projection's rows, then the up projection's."""

    def to_megatron(self, hf, config):
        return [torch.cat(hf, dim=0)]

    def to_hf(self, megatron, config):
        return [t.contiguous() for t in megatron[0].chunk(2, dim=0)]


def _same(tensor):
    return tensor


@dataclass(frozen=True)
class Stacked(Mapping):
    """HF's experts in one stacked tensor (one ``*`` less),
    megatron-core's one tensor per expert: ``from_hf`` turns an
    expert's slice into megatron-core's tensor, ``from_megatron``
    back."""

    from_hf: Callable = _same
    from_megatron: Callable = _same
    splits_rows = False

    def to_megatron(self, hf, config):
        return [self.from_hf(expert).contiguous() for expert in hf[0]]

    def to_hf(self, megatron, config):
        return [torch.stack([self.from_megatron(t) for t in megatron])]


LAYER, HF_LAYER = "decoder.layers.*.", "model.layers.*."
# Rows of every family: embeddings, the final norm, and the per-layer
# norms where they are modules of their own (the local spec; the TE
# spec too for an MoE layer's pre_mlp_layernorm and MLA's
# input_layernorm).
COMMON = [
    direct("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    direct("output_layer.weight", "lm_head.weight"),
    direct("decoder.final_layernorm.weight", "model.norm.weight"),
    direct(LAYER + "input_layernorm.weight", HF_LAYER + "input_layernorm.weight"),
    direct(LAYER + "pre_mlp_layernorm.weight", HF_LAYER + "post_attention_layernorm.weight"),
]
# TE fuses a dense layer's MLP norm into its linear_fc1
FUSED_MLP_NORM = direct(LAYER + "mlp.linear_fc1.layer_norm_weight",
                        HF_LAYER + "post_attention_layernorm.weight")


O_PROJ = direct(LAYER + "self_attention.linear_proj.weight", HF_LAYER + "self_attn.o_proj.weight")


def gqa_attention(kinds=("weight",)) -> list[Mapping]:
    """megatron-core's fused ``linear_qkv`` (``kinds``: weight, bias);
    TE fuses the input norm into it."""
    return [direct(LAYER + "self_attention.linear_qkv.layer_norm_weight",
                   HF_LAYER + "input_layernorm.weight"),
            *(QKV(LAYER + f"self_attention.linear_qkv.{kind}",
                  tuple(f"{HF_LAYER}self_attn.{p}_proj.{kind}" for p in "qkv"))
              for kind in kinds)]


def gated_mlp(megatron: str, hf: str, expert: str = "") -> list[Mapping]:
    """A gated MLP's two linears under ``megatron``/``hf`` prefixes
    (``expert="*"``: TE's grouped experts, ``weight<e>``)."""
    return [GatedMLP(f"{megatron}linear_fc1.weight{expert}",
                     (hf + "gate_proj.weight", hf + "up_proj.weight")),
            direct(f"{megatron}linear_fc2.weight{expert}", hf + "down_proj.weight")]


def name_pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\*", r"(\d+)"))


def filled(names, numbers, experts: int) -> list[str]:
    """``names`` with ``numbers`` for their first ``*``s; a ``*`` left
    over ranges over ``experts`` (name-major)."""
    filled = []
    for name in names:
        for number in numbers:
            name = name.replace("*", number, 1)
        filled += [name.replace("*", str(e)) for e in range(experts)] if "*" in name else [name]
    return filled


def convert(source: dict[str, torch.Tensor], wanted: dict[str, torch.Size],
            mappings: list[Mapping], *, to_hf: bool, config,
            what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of ``wanted`` (name -> shape) made from ``source``.

    ``to_hf`` says which way: False makes megatron-core tensors from HF
    ones, True the reverse. Raises :class:`CheckpointMismatchError`
    (one line) for a wanted tensor that no row makes, a shape that
    differs, or a source tensor that no row used.
    """
    def sides(row):
        return (row.megatron, row.hf) if to_hf else (row.hf, row.megatron)

    rows = [(row, name_pattern(template)) for row in mappings for template in sides(row)[1]]
    experts = getattr(config, "num_moe_experts", None) or 0
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
            source_names, target_names = sides(row)
            shared = min(source_names[0].count("*"), target_names[0].count("*"))
            numbers = numbers.groups()[:shared]
            sources = filled(source_names, numbers, experts)
            targets = filled(target_names, numbers, experts)
            if all(s in source for s in sources):
                hit = row, sources, targets
                break
            hit = hit or (None, sources, targets)
        if hit is None:
            raise CheckpointMismatchError(name, "no mapping makes this tensor", (
                f"add a row to the family's mapping table (the {what} cannot be converted)"))
        row, sources, targets = hit
        if row is None:
            missing = [s for s in sources if s not in source]
            raise CheckpointMismatchError(missing[0], f"missing from the {what}, but {name} is "
                                          "made of it", "give a complete checkpoint of this "
                                          "architecture")
        tensors = [source[s] for s in sources]
        values = row.to_hf(tensors, config) if to_hf else row.to_megatron(tensors, config)
        for target, value in zip(targets, values, strict=True):
            if target not in wanted:
                raise CheckpointMismatchError(target, f"made from {sources[0]}, but the target "
                                              "model has no such tensor", "the configs disagree")
            if tuple(value.shape) != tuple(wanted[target]):
                raise CheckpointMismatchError(
                    target, f"shape {tuple(value.shape)} from the {what}'s {sources[0]}, but "
                    f"the config expects {tuple(wanted[target])}", "convert into a config of "
                    "the checkpoint's shape")
            made[target] = value
        used.update(sources)
    unused = sorted(set(source) - used)
    if unused:
        raise CheckpointMismatchError(first_of(unused), f"in the {what} but used by no tensor "
                                      "of the target model", "its config does not match the "
                                      "checkpoint")
    return made


def shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in state.items()}


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


TIED = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


def hf_to_megatron(hf: dict[str, torch.Tensor], model, mappings: list[Mapping], config) -> None:
    """Fill every parameter of ``model`` (megatron-core, any spec) from
    HF tensors through ``mappings``; refuse in one line if one is left
    on either side."""
    if config.share_embeddings_and_output_weights and TIED in hf:
        if not torch.equal(hf[TIED], hf[EMBEDDING]):
            raise CheckpointMismatchError(TIED, f"differs from {EMBEDDING}, but "
                                          "tie_word_embeddings is true", "fix the checkpoint's "
                                          "config")
        hf = {k: v for k, v in hf.items() if k != TIED}
    state = megatron_state(model)
    made = convert(hf, shapes(state), mappings, to_hf=False, config=config, what="HF checkpoint")
    core = megatron_core(model)
    with torch.no_grad():
        for name, value in made.items():
            if state[name].is_meta:
                _materialize(core, name, value.to(state[name].dtype))
            else:
                state[name].copy_(value)


def _materialize(module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the meta tensor ``name``.

    NeMo's importer builds TE's layers on the meta device
    (nemo/lightning/_strategy_lib.py:190-193), where ``copy_`` writes
    nothing and the save then fails on "Cannot copy out of meta
    tensor"; megatron-core's attributes on the parameter (its
    tensor-parallel axis, ...) carry over.
    """
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = owner._parameters.get(attr)
    if old is None:
        owner._buffers[attr] = value
        return
    param = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    param.__dict__.update(old.__dict__)
    owner._parameters[attr] = param


def megatron_to_hf(state: dict[str, torch.Tensor], wanted: dict[str, torch.Size],
                   mappings: list[Mapping], config) -> dict[str, torch.Tensor]:
    """HF tensors (``wanted``: name -> shape, a transformers model's)
    of every tensor of a megatron-core ``state``."""
    if config.share_embeddings_and_output_weights:
        wanted = {k: v for k, v in wanted.items() if k != TIED}
    return convert(state, wanted, mappings, to_hf=True, config=config, what="NeMo checkpoint")
