"""CPU mode: NeMo 2.7.3 + megatron-core 0.15.3 training on a CPU-only
torch build, over gloo.

NeMo's MegatronStrategy and megatron-core assume CUDA in a handful of
places even when Lightning runs on ``accelerator="cpu"``. Each
:class:`Patch` below removes one such assumption and names where it
lives (file:line in nemo_toolkit 2.7.3 / megatron_core 0.15.3).

The patches are switched on only by ``CoomMegatronStrategy(cpu=True)``
(recipes' ``cpu=True``, scripts' ``--cpu``): :func:`activate` applies
them when the strategy sets up and :func:`deactivate` undoes every one
at teardown. :func:`activate` refuses to run where CUDA is available,
so CPU mode is never active on a GPU.

Two things that look like CUDA assumptions are fixed elsewhere, because
they also bite GPU nodes without TransformerEngine: the mock dataset's
attention mask (``coom_nemo.data``) and MLA's core attention
(``coom_nemo.models.specs``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
_CPU = torch.device("cpu")
Undo = Callable[[], None]


@dataclass(frozen=True)
class Patch:
    """One CUDA assumption and the change that removes it."""

    name: str
    removes: str
    apply: Callable[[], Undo]


def _swap(owner, attr: str, value) -> Undo:
    old = getattr(owner, attr)
    setattr(owner, attr, value)
    return lambda: setattr(owner, attr, old)


def _swap_all(pairs) -> Undo:
    undos = [_swap(owner, attr, value) for owner, attr, value in pairs]
    return lambda: [undo() for undo in reversed(undos)]


class _HostEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is already
    ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True


class _HostStream:
    """Stand-in for ``torch.cuda.Stream``: one implicit CPU stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _HostEvent()

    def __eq__(self, other):
        return isinstance(other, _HostStream)

    def __hash__(self):
        return 0


def _streams() -> Undo:
    return _swap_all([
        (torch.cuda, "Stream", _HostStream),
        (torch.cuda, "Event", _HostEvent),
        (torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        (torch.cuda, "current_stream", lambda *a, **k: _HostStream()),
        (torch.cuda, "default_stream", lambda *a, **k: _HostStream()),
    ])


def _current_device() -> Undo:
    return _swap(torch.cuda, "current_device", lambda: _CPU)


def _tensor_cuda() -> Undo:
    return _swap(torch.Tensor, "cuda", lambda self, *a, **k: self)


def _cuda_long_tensor() -> Undo:
    return _swap(torch.cuda, "LongTensor", torch.LongTensor)


def _synchronize() -> Undo:
    return _swap(torch.cuda, "synchronize", lambda *a, **k: None)


def _all_to_all_split_sizes() -> Undo:
    import torch.distributed as dist

    original = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          *args, **kwargs):
        def as_ints(sizes):
            return None if sizes is None else [int(s) for s in sizes]

        return original(output, input, as_ints(output_split_sizes),
                        as_ints(input_split_sizes), *args, **kwargs)

    return _swap(dist, "all_to_all_single", all_to_all_single)


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaTensorsOnHost(torch.overrides.TorchFunctionMode):
    """Creates 'cuda' tensors on the CPU and skips pinned memory."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron/core/optimizer/clip_grads.py:167 asserts
            # grad.type() == 'torch.cuda.FloatTensor'
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _cuda_tensors_on_host() -> Undo:
    mode = _CudaTensorsOnHost()
    mode.__enter__()
    return lambda: mode.__exit__(None, None, None)


def _checkpoint_device() -> Undo:
    from nemo.lightning.io import pl as io_pl

    return _swap(io_pl, "_fix_tensors_device", lambda checkpoint: checkpoint)


def _rng_tracker() -> Undo:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return lambda: mp_random.initialize_rng_tracker(force_reset=True)


PATCHES: tuple[Patch, ...] = (
    Patch("cuda_streams",
          "torch.cuda.Stream/Event/stream: nemo/lightning/megatron_parallel.py:617 "
          "(init_ddp on a side stream), megatron/core/transformer/moe/"
          "token_dispatcher.py:425,831-858 (alltoall D2H stream and event)",
          _streams),
    Patch("current_device",
          "torch.cuda.current_device() as a device: megatron/core/distributed/"
          "param_and_grad_buffer.py:702,719,725 (DDP buffers), megatron/core/models/"
          "common/embeddings/rotary_pos_embedding.py:164 (RoPE inv_freq)",
          _current_device),
    Patch("tensor_cuda",
          "Tensor.cuda(): nemo/collections/llm/gpt/model/base.py:103 (gpt_data_step)",
          _tensor_cuda),
    Patch("cuda_tensors_on_host",
          "device='cuda' and pin_memory=True tensors: nemo/lightning/pytorch/strategies/"
          "megatron_strategy.py:801-888 and plugins/data_sampler.py:192,212 (logging), "
          "megatron/core/optimizer/optimizer.py:469-481,903 and clip_grads.py:90-206; "
          "clip_grads.py:167 asserts a torch.cuda.FloatTensor grad type",
          _cuda_tensors_on_host),
    Patch("cuda_long_tensor",
          "torch.cuda.LongTensor(...): nemo/collections/llm/gpt/data/utils.py:777 "
          "(the fine-tuning dataset's check that every rank built its index)",
          _cuda_long_tensor),
    Patch("synchronize",
          "torch.cuda.synchronize(): megatron/core/pipeline_parallel/"
          "p2p_communication.py:398 (PP>1)",
          _synchronize),
    Patch("all_to_all_split_sizes",
          "numpy split sizes to all_to_all_single: megatron/core/tensor_parallel/"
          "mappings.py:444 (EP>1); torch 2.13's gloo binding takes only ints",
          _all_to_all_split_sizes),
    Patch("checkpoint_device",
          "loaded checkpoint tensors moved to the current CUDA device: "
          "nemo/lightning/io/pl.py:494 asserts torch.cuda.is_initialized()",
          _checkpoint_device),
    Patch("rng_tracker",
          "CUDA RNG tracker: megatron/core/tensor_parallel/random.py:209 raises in fork() "
          "because nemo/lightning/megatron_init.py:238 seeds it only with CUDA; "
          "use megatron-core's CUDA-free tracker",
          _rng_tracker),
)

_lock = threading.Lock()
_undos: list[Undo] = []


def is_active() -> bool:
    return bool(_undos)


def activate() -> None:
    """Apply every patch (idempotent). Refuses on a CUDA host."""
    if torch.cuda.is_available():
        raise RuntimeError(
            "cpu mode: this host has a CUDA GPU; CPU mode is only for hosts without one "
            "(drop --cpu / cpu=True)"
        )
    with _lock:
        if _undos:
            return
        for patch in PATCHES:
            _undos.append(patch.apply())
            log.debug("cpu mode: %s (%s)", patch.name, patch.removes)


def deactivate() -> None:
    """Undo every patch, newest first."""
    with _lock:
        while _undos:
            _undos.pop()()


@contextlib.contextmanager
def cpu_mode():
    activate()
    try:
        yield
    finally:
        deactivate()
