"""MegatronStrategy with a recorded seed and an explicit CPU mode."""

from __future__ import annotations

import logging
import sys

from nemo import lightning as nl

from coom_nemo import cpu_mode
from coom_nemo.models.base import has_apex, has_transformer_engine
from coom_nemo.signatures import signature_with

log = logging.getLogger(__name__)


class CoomMegatronStrategy(nl.MegatronStrategy):
    """``nl.MegatronStrategy`` plus two switches.

    Args:
        seed: Seed for Python, NumPy and torch (NeMo hard-codes 1234);
            pipeline stages add ``100 * pp_rank`` as megatron-core does.
        cpu: Run on a CPU-only torch over gloo through
            :mod:`coom_nemo.cpu_mode`; refused on a CUDA host.
    """

    def __init__(self, *args, seed: int = 1234, cpu: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.cpu = cpu

    def connect(self, model) -> None:
        if self.sequence_parallel and not (has_transformer_engine() or has_apex()):
            # megatron-core's torch norm (WrappedTorchNorm) refuses SP.
            log.warning("sequence parallelism off: it needs TE's or Apex's norm kernels")
            self.sequence_parallel = False
        optim_config = getattr(getattr(model, "optim", None), "config", None)
        if getattr(optim_config, "use_distributed_optimizer", False) and not has_fused_adam():
            # megatron-core falls back to torch.optim.AdamW, whose
            # scalar
            # per-param 'step' breaks the distributed optimizer's
            # checkpoint (distrib_optimizer.py:1646 shape assert).
            log.warning("no TE/Apex FusedAdam on this host: using the non-distributed "
                        "optimizer (torch AdamW) so checkpoints can be saved")
            optim_config.use_distributed_optimizer = False
        super().connect(model)

    def setup_environment(self) -> None:
        if self.cpu:
            cpu_mode.activate()
        super().setup_environment()

    def setup_distributed(self) -> None:
        super().setup_distributed()
        from nemo.lightning.megatron_init import _set_random_seed

        # After the process groups exist and before any weight is made.
        _set_random_seed(self.seed)
        log.info("seed %d (pipeline stage offset applied)", self.seed)

    def teardown(self) -> None:
        # Lightning tears down inside its except block when training
        # raised (lightning/pytorch/trainer/call.py:66-70), then
        # re-raises. A teardown that fails then (TE's weights refuse
        # the move to the CPU while the failed step's graph holds
        # them) would be the error the console reports, not the cause.
        failure = sys.exc_info()[1]
        try:
            super().teardown()
        except Exception as error:
            if failure is None:
                raise
            log.warning("teardown after %s also failed: %s", type(failure).__name__, error,
                        exc_info=True)
        finally:
            if self.cpu:
                release_global_state()
                cpu_mode.deactivate()
            elif failure is None:
                # megatron-core's NCCL groups left to the interpreter's
                # exit can hang it (ms-swift#8385); after a failure the
                # other ranks may never join (torchtitan#1342)
                release_global_state()


CoomMegatronStrategy.__init__.__signature__ = signature_with(
    nl.MegatronStrategy.__init__, seed=1234, cpu=False)


def has_fused_adam() -> bool:
    """Whether megatron-core will get TE's or Apex's FusedAdam."""
    for module in ("transformer_engine.pytorch.optimizers", "apex.optimizers"):
        try:
            __import__(module)
        except Exception:
            continue
        return True
    return False


def release_global_state() -> None:
    """Let the next in-process run (tests run several, with other
    layouts) start from a clean slate."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.transformer.moe import moe_utils

    destroy_num_microbatches_calculator()
    # megatron-core sizes its per-layer aux-loss record by the first
    # model's layer count and keeps it (moe_utils.py:736-740): a deeper
    # model next would index past its end
    moe_utils.get_moe_layer_wise_logging_tracker().clear()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
