"""Layer-spec fixes that need TE to run: their logic, on CPU. The GPU
test (tests/test_gpu.py::test_fp8_trains_on_one_gpu[deepseek-*]) saves
a DeepSeek checkpoint under FP8 current scaling and blockwise with
megatron-core's real grouped linears."""

from types import SimpleNamespace

import pytest
import torch

from coom_nemo.models.specs import (
    StatelessExtraState,
    _grouped_experts_with_stateless_state,
    with_stateless_extra_state,
)


class McoreLikeGroupedLinear:
    """megatron-core 0.15.3's ``_split_extra_state`` in short: under FP8
    it decodes the state, and an empty tensor decodes to None."""

    num_gemms = 3

    def _split_extra_state(self, state):
        decoded = None if state.numel() == 0 else {"extra_fp8_variables": state.tolist()}
        return [{"split": decoded["extra_fp8_variables"], "gemm": i}
                for i in range(self.num_gemms)]


def test_the_unfixed_split_fails_on_an_empty_state():
    with pytest.raises(TypeError, match="not subscriptable"):
        McoreLikeGroupedLinear()._split_extra_state(torch.empty(0, dtype=torch.uint8))


def test_an_empty_state_goes_to_every_expert_and_fp8_state_is_still_split():
    linear = with_stateless_extra_state(McoreLikeGroupedLinear)()
    empty = torch.empty(0, dtype=torch.uint8)
    assert all(s is empty for s in linear._split_extra_state(empty))
    assert len(linear._split_extra_state(empty)) == 3
    state = torch.tensor([7, 8], dtype=torch.uint8)
    assert linear._split_extra_state(state) == [{"split": [7, 8], "gemm": i} for i in range(3)]


def test_the_spec_swaps_grouped_linears_once_and_nothing_else():
    class PlainLinear:
        pass

    experts = SimpleNamespace(submodules=SimpleNamespace(linear_fc1=McoreLikeGroupedLinear,
                                                         linear_fc2=PlainLinear))
    _grouped_experts_with_stateless_state(experts)
    fc1 = experts.submodules.linear_fc1
    assert issubclass(fc1, StatelessExtraState) and issubclass(fc1, McoreLikeGroupedLinear)
    assert experts.submodules.linear_fc2 is PlainLinear
    _grouped_experts_with_stateless_state(experts)  # a second pass adds no second layer
    assert experts.submodules.linear_fc1 is fc1
