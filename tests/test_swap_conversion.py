"""Conversions and loads through torch.utils.swap_tensors, which PyTorch uses for ``model.to`` /
``.double()`` / ``load_state_dict`` under ``torch.__future__.set_swap_module_params_on_conversion(True)``
(its documented replacement of ``.data`` swaps). swap_tensors refuses a tensor that has a weak
reference or that anything else references: a model that had written adapters (mira.optim_state
kept weak references to resized memory tensors) or run one eval call (the eval plan holds its
tensors) failed to convert or load.
"""

from __future__ import annotations

import pytest
import torch

import mira
from tests.tiny_models import filled_vit, images, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning",
                                        "ignore:a fixed-capacity memory holding one adapter:UserWarning")


@pytest.fixture
def swap_on():
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def run(model, x):
    with torch.no_grad():
        model(x)  # the first eval call makes the plans
        return model(x)  # which this one runs


def fresh_with(state, capacity):
    model = mira.set_stage(mira.attach(tiny_vit(), capacity=capacity), "inference").eval()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("capacity", [None, 4])
def test_a_model_that_has_run_converts_and_loads_through_swap_tensors(swap_on, capacity):
    model = mira.set_stage(filled_vit(capacity=capacity), "inference").eval()  # write_adapters: resizes if growing
    x = images()
    run(model, x)
    model.double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(run(model, x.double()), run(fresh_with(state, capacity).double(), x.double()))
    model.float()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert state["blocks.0.mira_memory.keys"].dtype == torch.float32
    assert torch.equal(run(model, x), run(fresh_with(state, capacity), x))


def test_a_memory_that_has_run_loads_alone_through_swap_tensors(swap_on):
    # Its projection's eval plan holds its banks; a load of the memory alone must drop it too.
    model, other = (mira.set_stage(filled_vit(seed, capacity=4), "inference").eval() for seed in (3, 4))
    x = images()
    run(model, x)
    for mine, theirs in zip(mira.memories(model), mira.memories(other)):
        mine.load_state_dict(theirs.state_dict())
    assert torch.equal(run(model, x), run(other, x))
