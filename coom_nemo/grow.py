"""Progressive model expansion: grow a coom checkpoint in depth and
width, then keep training from it.

``python -m coom_nemo.grow SOURCE OUTPUT --layers 4`` reads a NeMo 2
checkpoint of any coom family, saved at any parallel layout (it is
loaded whole, in one CPU process: megatron-core's distributed
checkpoint reshards it), and writes a larger one that a recipe restores
through ``restore_path``. The grown shape is recorded in
``OUTPUT/grow.json``; the factories read it and build the grown model.

Depth (``--layers``, ``--depth``):

- ``stack`` (G_stack, Du et al., NeurIPS 2024): grown layer k holds
  source layer ``k mod L`` (2 -> 4 layers: 0, 1, 0, 1).
- ``midas`` (MIDAS, Saunshi et al., 2024): the ``n = L' - L`` middle
  layers are repeated in place (4 -> 6: 0, 1, 2, 1, 2, 3).
- ``--preserve``: the repeated copies start with their attention output
  projection and their MLP / expert / shared-expert down projections
  (weights and biases) at zero, as LLaMA Pro's added blocks do, so each
  copy adds nothing to the residual stream: the grown model computes
  the source's function exactly.

Width, always function-preserving (Net2Net / HyperCloning-style
duplication):

- ``--hidden H'`` (a multiple ``d`` of H): the residual stream becomes
  ``d`` copies of the source's, ``x' = [x, ..., x]``. Weights writing to
  it (embedding, attention output, down projections, MTP's ``eh_proj``)
  repeat their hidden rows; weights reading it split their hidden
  columns into parts that sum to the source's. Norms keep the function
  with their weight repeated: RMS (and LayerNorm's mean and variance)
  over ``d`` copies of ``x`` equals that over ``x``, so
  ``norm'(x') = [norm(x), ..., norm(x)]``. Heads and head widths stay.
  Tied input/output embeddings cannot both repeat and split: refused.
- ``--ffn F'`` / ``--moe-ffn F'``: each hidden neuron of the dense MLP /
  of every expert and shared expert is repeated (both GLU halves);
  the down projection splits the neuron's column among its copies.
- ``--experts E'`` (a multiple ``m`` of E): every expert gets ``m - 1``
  copies next to it, router rows (and expert bias) repeated, and the
  router's top-k becomes ``m k``. The copies of an expert tie, so top-k
  picks all of them or none; each copy gets the weight ``p / m``
  (softmax over repeated logits, or sigmoid scores normalised over the
  chosen), and the copies' down projections (``m a_c W``, ``sum a_c =
  1``) sum back to the source expert. Group-limited routing keeps its
  choice: copies stay in their expert's group, whose score (the sum of
  its best ``k / groups`` experts) is scaled by ``m``.

Splits are random (``--split random``, default: each part a random
share, the shares summing to one) so that the copies get different
gradients and can drift apart in training; ``even`` splits equally,
and its copies then stay identical under training (symmetric).

GPT-OSS's sliding-window alternation follows the grown layer index,
megatron-core's rule (transformer/utils.py
``is_layer_window_attention``: layer ``k`` (0-based) is windowed unless
``(k + 1) % freq == 0``). A live layer (one that is not a zeroed copy)
must therefore land on an index of its source layer's kind; a growth
that would move one to the other kind is refused (e.g. stacking an odd
number of layers). Zeroed copies may sit anywhere: they compute nothing.
A per-layer list pattern (``window_attn_skip_freq=[...]``) is grown with
the layers instead, as ``moe_layer_freq`` is (DeepSeek's dense first
layer).

MTP layers (DeepSeek) keep their depth and grow in width. The optimizer
state is not grown: a run restored from the grown checkpoint starts with
a fresh optimizer and a fresh LR schedule (the recipe's warmup, or
``--warmup-steps`` recorded in grow.json; see the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from coom_nemo.plan import PlanError

GROW_FILE = "grow.json"


@dataclass(frozen=True)
class Growth:
    """What to grow; None keeps the source's size."""

    layers: int | None = None
    depth: str = "stack"  # stack | midas
    preserve: bool = False  # zero the output projections of copies
    hidden: int | None = None
    ffn: int | None = None
    moe_ffn: int | None = None
    experts: int | None = None
    split: str = "random"  # random | even
    seed: int = 0
    warmup_steps: int | None = None  # recorded for the restored run


# ---------------------------------------------------------------- depth


def layer_map(source: int, target: int, depth: str) -> list[int]:
    """The source layer each grown layer copies."""
    if depth == "stack":
        return [k % source for k in range(target)]
    if depth == "midas":
        extra = target - source
        start = (source - extra + 1) // 2
        return [*range(start + extra), *range(start, source)]
    raise PlanError("depth", f"{depth!r} is not stack or midas", "use --depth stack|midas")


def copies(mapping: list[int]) -> set[int]:
    """Grown indices that repeat an earlier source layer (the first
    occurrence of a source layer is its original)."""
    seen, repeated = set(), set()
    for k, s in enumerate(mapping):
        (repeated if s in seen else seen).add(k)
    return repeated


def _windowed(freq, index: int) -> bool:
    # megatron/core/transformer/utils.py is_layer_window_attention,
    # with a 0-based index
    return (index + 1) % freq != 0


# ----------------------------------------------------------- the config


def _multiple(name: str, field: str, old: int | None, new: int | None) -> int:
    """The factor ``new / old``; refuses what cannot hold the source."""
    if new is None or new == old:
        return 1
    if old is None:
        raise PlanError(name, f"the source has no {field}", f"drop --{name.replace('_', '-')}")
    if new < old or new % old:
        raise PlanError(name, f"{new} is not a multiple of the source's {field}={old}",
                        f"use a multiple of {old}")
    return new // old


@dataclass(frozen=True)
class Plan:
    """A checked growth of one config."""

    config: object  # the grown config
    mapping: list[int]  # grown layer -> source layer
    zeroed: frozenset  # grown layers whose output projections are zero
    hidden: int  # factors
    ffn: int
    moe_ffn: int
    experts: int

    def summary(self, source) -> str:
        c = self.config
        parts = [f"layers {source.num_layers}->{c.num_layers} ({self.mapping}"
                 + (f", zeroed {sorted(self.zeroed)})" if self.zeroed else ")")]
        for field, factor in (("hidden_size", self.hidden), ("ffn_hidden_size", self.ffn),
                              ("moe_ffn_hidden_size", self.moe_ffn),
                              ("num_moe_experts", self.experts)):
            if factor > 1:
                parts.append(f"{field} {getattr(source, field)}->{getattr(c, field)}")
        return "grow: " + ", ".join(parts)


def plan_growth(config, growth: Growth, layout: str | None = None) -> Plan:
    """Check ``growth`` against the source ``config`` (and, if given,
    the layout the grown model will train at); return the grown
    config. Raises :class:`PlanError` (one line) before anything is
    written."""
    source_layers = config.num_layers
    layers = growth.layers or source_layers
    if layers < source_layers:
        raise PlanError("layers", f"{layers} is fewer than the source's {source_layers}",
                        f"give {source_layers} or more")
    if growth.split not in ("random", "even"):
        raise PlanError("split", f"{growth.split!r} is not random or even",
                        "use --split random|even")
    mapping = layer_map(source_layers, layers, growth.depth)
    if growth.depth == "midas" and layers > 2 * source_layers:
        raise PlanError("layers", f"midas repeats at most the source's {source_layers} layers "
                        f"once ({2 * source_layers} layers), not {layers}",
                        "use --depth stack, or grow twice")
    zeroed = frozenset(copies(mapping)) if growth.preserve else frozenset()
    moe = bool(getattr(config, "num_moe_experts", None))
    hidden = _multiple("hidden", "hidden_size", config.hidden_size, growth.hidden)
    ffn = _multiple("ffn", "ffn_hidden_size", config.ffn_hidden_size, growth.ffn)
    moe_ffn = _multiple("moe_ffn", "moe_ffn_hidden_size",
                        getattr(config, "moe_ffn_hidden_size", None) if moe else None,
                        growth.moe_ffn)
    experts = _multiple("experts", "num_moe_experts",
                        config.num_moe_experts if moe else None, growth.experts)
    if hidden > 1 and config.share_embeddings_and_output_weights:
        raise PlanError("hidden", "the source ties its input and output embeddings, which "
                        "cannot be both repeated and split", "grow depth or FFN only")
    changes = dict(num_layers=layers)
    if hidden > 1:
        changes.update(hidden_size=config.hidden_size * hidden,
                       kv_channels=config.kv_channels)  # heads keep their width
    if ffn > 1:
        changes["ffn_hidden_size"] = config.ffn_hidden_size * ffn
    if moe:
        pattern = _pattern(config.moe_layer_freq, source_layers)
        changes["moe_layer_freq"] = [pattern[s] for s in mapping]
    if moe_ffn > 1:
        changes["moe_ffn_hidden_size"] = config.moe_ffn_hidden_size * moe_ffn
        shared = getattr(config, "moe_shared_expert_intermediate_size", None)
        if shared:
            changes["moe_shared_expert_intermediate_size"] = shared * moe_ffn
    if experts > 1:
        changes.update(_grown_router(config, experts))
    changes.update(_grown_windows(config, mapping, zeroed))
    grown = dataclasses.replace(config, **changes)
    if layout:
        _check_layout(grown, layout)
    return Plan(grown, mapping, zeroed, hidden, ffn, moe_ffn, experts)


def _pattern(freq, layers: int) -> list[int]:
    # megatron/core/transformer/moe/moe_utils.py get_moe_layer_pattern
    if isinstance(freq, int):
        return [int(k % freq == 0) for k in range(layers)]
    return list(freq)


def _grown_router(config, m: int) -> dict:
    topk = config.moe_router_topk
    groups = getattr(config, "moe_router_num_groups", None)
    group_topk = getattr(config, "moe_router_group_topk", None)
    if groups and group_topk and (m * topk) // group_topk != m * (topk // group_topk):
        # moe_utils.py group_limited_topk scores a group by its best
        # topk // group_topk experts: must stay m times the source's
        raise PlanError("experts", f"top-{topk} from {group_topk} groups cannot be scaled by "
                        f"{m} exactly", "grow experts by a factor that keeps "
                        "topk // group_topk an integer multiple")
    return dict(num_moe_experts=config.num_moe_experts * m, moe_router_topk=topk * m)


def _grown_windows(config, mapping: list[int], zeroed) -> dict:
    freq = getattr(config, "window_attn_skip_freq", None)
    if not getattr(config, "window_size", None) or freq is None:
        return {}
    if isinstance(freq, list):
        return dict(window_attn_skip_freq=[freq[s] for s in mapping])
    for k, s in enumerate(mapping):
        if k not in zeroed and _windowed(freq, k) != _windowed(freq, s):
            kinds = {True: "sliding-window", False: "full"}
            raise PlanError("layers", f"grown layer {k} would hold source layer {s} "
                            f"({kinds[_windowed(freq, s)]} attention) where layer {k} is "
                            f"{kinds[_windowed(freq, k)]} (every {freq}th layer is full)",
                            f"grow by a multiple of {freq} layers, or use --preserve")
    return {}


def _check_layout(config, text: str) -> None:
    from coom_nemo.recipe import Layout

    layout = Layout().updated(text)
    heads, groups = config.num_attention_heads, config.num_query_groups or 1
    if heads % layout.tp or (groups % layout.tp and not config.multi_latent_attention):
        raise PlanError("layout", f"TP{layout.tp} does not divide the grown model's {heads} "
                        f"heads / {groups} KV groups", "choose a TP that divides both")
    if config.num_layers % layout.pp:
        raise PlanError("layout", f"PP{layout.pp} does not divide the grown model's "
                        f"{config.num_layers} layers", "choose a PP that divides them")
    experts = getattr(config, "num_moe_experts", None)
    if experts and experts % layout.ep:
        raise PlanError("layout", f"EP{layout.ep} does not divide the grown model's "
                        f"{experts} experts", "grow to a multiple of the EP size")


# ------------------------------------------------------------ the state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_OUTPUT_PROJ = re.compile(r"(self_attention\.linear_proj|linear_fc2)\.(weight|bias)\d*$")
_EXPERT = re.compile(r"^(.*\.experts\.)(?:local_experts\.(\d+)\.(.*)|(linear_fc[12]\.\w+?)(\d+))$")
# Weights that read the residual stream (hidden is their last dim) and
# vectors over it (norms; TE fuses the input norms into the first
# projection). MLA's q/kv norms are over its latents, not hidden.
_READS = re.compile(r"(linear_qkv|linear_q_proj|linear_q_down_proj|linear_kv_down_proj"
                    r"|linear_gate|linear_fc1|router|output_layer)\.weight\d*$")
_NORMS = re.compile(r"(input_layernorm|pre_mlp_layernorm|final_layernorm|enorm|hnorm)"
                    r"\.(weight|bias)$|(linear_qkv|linear_fc1|linear_q_proj|linear_q_down_proj"
                    r"|linear_kv_down_proj)\.layer_norm_(weight|bias)$")
_WRITES = re.compile(r"(linear_proj|linear_fc2)\.(weight|bias)\d*$"
                     r"|word_embeddings\.weight$|eh_proj\.weight$")


class _Splitter:
    """Shares that sum to one, random or even."""

    def __init__(self, split: str, seed: int):
        self.random = split == "random"
        self.generator = torch.Generator().manual_seed(seed)

    def shares(self, parts: int, like: torch.Tensor) -> list[torch.Tensor]:
        if not self.random or parts == 1:
            return [torch.full_like(like, 1.0 / parts) for _ in range(parts)]
        raw = torch.rand((parts, *like.shape), generator=self.generator, dtype=torch.float64)
        raw = (raw + 0.5) / (raw + 0.5).sum(0)
        return [r.to(like.dtype) for r in raw]

    def split(self, t: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
        """``parts`` copies along ``dim`` summing to ``t``."""
        if parts == 1:
            return t
        return torch.cat([t * s for s in self.shares(parts, t)], dim)


def _repeat_rows(t: torch.Tensor, factor: int, glu: bool, dim: int = 0) -> torch.Tensor:
    """Repeat each neuron ``factor`` times along ``dim`` (each GLU half
    on its own: megatron-core's fc1 holds [gate; up])."""
    if factor == 1:
        return t
    halves = t.chunk(2, dim) if glu else (t,)
    return torch.cat([h.repeat_interleave(factor, dim) for h in halves], dim)


def _split_neurons(t: torch.Tensor, factor: int, splitter: _Splitter) -> torch.Tensor:
    """A down projection's columns, each split among its copies."""
    if factor == 1:
        return t
    parts = torch.stack(splitter.shares(factor, t), -1)  # [out, in, factor]
    return (t.unsqueeze(-1) * parts).flatten(-2)


def grow_state(state: dict, config, plan: Plan, growth: Growth) -> dict:
    """The grown model's full (unsharded) state dict."""
    splitter = _Splitter(growth.split, growth.seed)
    deeper = {}
    for key, value in state.items():
        if not _LAYER.match(key):
            deeper[key] = value
    for k, s in enumerate(plan.mapping):
        for key, value in state.items():
            match = _LAYER.match(key)
            if match and int(match[1]) == s:
                rest = match[2]
                if k in plan.zeroed and _OUTPUT_PROJ.search(rest):
                    value = torch.zeros_like(value)
                deeper[f"decoder.layers.{k}.{rest}"] = value
    grown = {}
    glu = config.gated_linear_unit
    for key, value in deeper.items():
        if not torch.is_tensor(value):  # e.g. TE's _extra_state
            grown[key] = value
            continue
        for new_key, tensor in _grow_experts(key, value, plan.experts, splitter):
            grown[new_key] = _grow_width(new_key, tensor, plan, glu, splitter)
    return grown


def _grow_experts(key: str, value: torch.Tensor, m: int, splitter: _Splitter):
    """(key, tensor) pairs of the grown expert set."""
    if m == 1:
        yield key, value
        return
    if re.search(r"\.router\.(weight|bias|expert_bias)$", key):
        yield key, value.repeat_interleave(m, 0)
        return
    match = _EXPERT.match(key)
    if not match:
        yield key, value
        return
    prefix = match[1]
    index = int(match[2] if match[2] is not None else match[5])
    down = "linear_fc2" in key
    shares = splitter.shares(m, value) if down else [value] * m
    for c in range(m):
        tensor = value * (m * shares[c]) if down else value.clone()
        e = index * m + c
        if match[2] is not None:
            yield f"{prefix}local_experts.{e}.{match[3]}", tensor
        else:
            yield f"{prefix}{match[4]}{e}", tensor


def _grow_width(key: str, t: torch.Tensor, plan: Plan, glu: bool,
                splitter: _Splitter) -> torch.Tensor:
    d = plan.hidden
    expert = ".experts." in key or ".shared_experts." in key
    neurons = plan.moe_ffn if expert else plan.ffn
    if re.search(r"linear_fc1\.(weight|bias)\d*$", key) and neurons > 1:
        t = _repeat_rows(t, neurons, glu)
    if re.search(r"linear_fc2\.weight\d*$", key) and neurons > 1:
        t = _split_neurons(t, neurons, splitter)
    if d == 1:
        return t
    if key.endswith("eh_proj.weight"):  # [h, 2h]: reads [enorm(e); hnorm(h)]
        t = torch.cat([splitter.split(half, 1, d) for half in t.chunk(2, 1)], 1)
        return torch.cat([t] * d, 0)
    if _NORMS.search(key) and t.dim() == 1:
        return torch.cat([t] * d)
    if _WRITES.search(key):
        if key.endswith("word_embeddings.weight"):
            return torch.cat([t] * d, 1)
        if key.endswith("weight") or re.search(r"weight\d+$", key):
            return torch.cat([t] * d, 0)
        return torch.cat([t] * d)  # bias over hidden
    if _READS.search(key):
        return splitter.split(t, t.dim() - 1, d)
    return t


# -------------------------------------------------------- checkpoints


def source_config(path: Path):
    """The model config saved with a checkpoint (no weights read)."""
    from nemo.lightning import io

    if not (path / "context").is_dir() or not (path / "weights").is_dir():
        raise PlanError("source", f"{path} is not a NeMo checkpoint (no context/ and weights/)",
                        "give a checkpoint directory, e.g. <run>/checkpoints/<step>-last")
    return io.load_context(str(path / "context"), subpath="model.config")


def _fp32(config) -> None:
    # Grow in fp32 whatever the training precision; saved in the
    # source's dtype (grow_checkpoint).
    config.params_dtype = torch.float32
    config.bf16 = config.fp16 = False


def _trainer_for(model):
    """A one-process CPU trainer holding ``model``, built (NeMo's
    ModelConnector.nemo_load / nemo_setup, without their bf16 cast)."""
    from nemo.lightning import MegatronStrategy, Trainer, _strategy_lib

    # a training checkpoint also holds optimizer state: not needed here
    strategy = MegatronStrategy(ddp="pytorch", setup_optimizers=False, ckpt_save_optimizer=False,
                                ckpt_async_save=False, ckpt_parallel_save=False,
                                ckpt_parallel_load=False,
                                ckpt_load_strictness="assume_ok_unexpected")
    trainer = Trainer(devices=1, accelerator="cpu", strategy=strategy)
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    with _strategy_lib.megatron_cpu_init_context(model.config):
        model.configure_model()
    trainer.strategy._init_model_parallel = False
    trainer.strategy.setup(trainer)
    return trainer


def load_model(path):
    """The model of a checkpoint, whole and in fp32 (any saved layout).
    Call inside :func:`on_this_host`."""
    from nemo.lightning import io

    model = io.load_context(str(Path(path) / "context"), subpath="model")
    _fp32(model.config)
    model.config.perform_initialization = False
    trainer = _trainer_for(model)
    trainer.strategy.load_checkpoint(Path(path))
    return model


def save_model(trainer, path: Path) -> None:
    """Write the model of ``trainer`` (:func:`_trainer_for`) as a
    checkpoint at ``path``."""
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo.lightning.ckpt_utils import ckpt_to_context_subdir
    from nemo.lightning.io.pl import TrainerContext

    trainer.state.fn = TrainerFn.FITTING  # as NeMo's nemo_setup: saves the model
    trainer.save_checkpoint(path, weights_only=True)
    TrainerContext.from_trainer(trainer).io_dump(ckpt_to_context_subdir(path),
                                                yaml_attrs=["model"])


def on_this_host():
    from coom_nemo.models.conversion import on_this_host as host

    return host()


def _saved_dtype(path: Path) -> torch.dtype:
    from megatron.core.dist_checkpointing import load_tensors_metadata

    metadata = load_tensors_metadata(str(path / "weights"))
    return next(m.dtype for k, m in metadata.items() if k.endswith("word_embeddings.weight"))


def grow_checkpoint(source, output, growth: Growth, layout: str | None = None) -> Plan:
    """Write ``output``, ``source`` grown as ``growth`` says. Everything
    is checked before anything is written; ``output`` must not exist."""
    source, output = Path(source), Path(output)
    if output.exists():
        raise PlanError("output", f"{output} already exists", "give a new directory "
                        "(nothing is overwritten)")
    config = source_config(source)
    plan = plan_growth(config, growth, layout)
    dtype = _saved_dtype(source)
    with on_this_host():
        model = load_model(source)
        state = {k: v.detach().clone() if torch.is_tensor(v) else v
                 for k, v in model.module.state_dict().items()}
        tokenizer = model.tokenizer
    grown_state = grow_state(state, model.config, plan, growth)
    with on_this_host():
        grown_config = dataclasses.replace(plan.config, params_dtype=dtype,
                                           bf16=dtype == torch.bfloat16,
                                           fp16=dtype == torch.float16)
        target = type(model)(grown_config, tokenizer=tokenizer)
        trainer = _trainer_for(target)
        target.module.load_state_dict(
            {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in grown_state.items()}, strict=True)
        output.mkdir(parents=True)
        save_model(trainer, output)
    record = dict(source=str(source.resolve()), growth=dataclasses.asdict(growth),
                  mapping=plan.mapping, zeroed=sorted(plan.zeroed),
                  config=_shape(plan.config), summary=plan.summary(config))
    (output / GROW_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return plan


SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels",
                "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                "num_moe_experts", "moe_router_topk", "moe_layer_freq", "window_attn_skip_freq")


def _shape(config) -> dict:
    return {f: getattr(config, f) for f in SHAPE_FIELDS if hasattr(config, f)}


def adopt_grown_shape(restore_path, model) -> str | None:
    """Give a recipe's ``model`` config the shape of a grown checkpoint
    at ``restore_path`` (its grow.json); return the growth's summary,
    or None when the checkpoint was not grown (or is not on this
    host)."""
    record_file = Path(restore_path) / GROW_FILE
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    for field, value in record["config"].items():
        setattr(model.config, field, value)
    return record["summary"]


def grown_warmup(restore_path) -> int | None:
    """The warmup the growth asked the restored run to use, if any."""
    record_file = Path(restore_path or "") / GROW_FILE
    if not restore_path or not record_file.is_file():
        return None
    return json.loads(record_file.read_text())["growth"].get("warmup_steps")


# ----------------------------------------------------------- command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coom_nemo.grow", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="NeMo checkpoint (context/ + weights/)")
    parser.add_argument("output", help="new directory for the grown checkpoint")
    parser.add_argument("--layers", type=int, help="grown depth")
    parser.add_argument("--depth", default="stack", choices=("stack", "midas"))
    parser.add_argument("--preserve", action="store_true",
                        help="zero the copies' output projections (same function)")
    parser.add_argument("--hidden", type=int, help="grown hidden size (a multiple)")
    parser.add_argument("--ffn", type=int, help="grown dense FFN size (a multiple)")
    parser.add_argument("--moe-ffn", type=int, help="grown expert FFN size (a multiple)")
    parser.add_argument("--experts", type=int, help="grown routed experts (a multiple)")
    parser.add_argument("--split", default="random", choices=("random", "even"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random splits")
    parser.add_argument("--warmup-steps", type=int,
                        help="LR warmup of the run restored from the output "
                             "(default: the recipe's)")
    parser.add_argument("--layout", help="check the grown model fits this training layout, "
                                         "e.g. TP2.PP2.EP4")
    args = parser.parse_args(argv)
    growth = Growth(layers=args.layers, depth=args.depth, preserve=args.preserve,
                    hidden=args.hidden, ffn=args.ffn, moe_ffn=args.moe_ffn,
                    experts=args.experts, split=args.split, seed=args.seed,
                    warmup_steps=args.warmup_steps)
    try:
        plan = grow_checkpoint(args.source, args.output, growth, args.layout)
    except (PlanError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(plan.summary(source_config(Path(args.source))))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
