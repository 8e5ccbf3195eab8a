"""The sampler's own flow-matching Euler schedule is bit-identical to diffusers' scheduler."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from qdit4sr.models.flow_match import FlowMatchEulerSchedule


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_schedule_and_steps_match_diffusers(steps, shift):
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    reference.set_timesteps(steps)
    ours = FlowMatchEulerSchedule(steps, shift=shift)
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert torch.equal(ours.sigmas, reference.sigmas)
    gen = torch.Generator().manual_seed(steps)
    x_ref = x = torch.randn(2, 3, 5, 4, generator=gen)
    for i, t in enumerate(reference.timesteps):
        v = torch.randn(x.shape, generator=gen) * 3
        x_ref = reference.step(v, t, x_ref).prev_sample
        x = ours.step(v, i, x)
        assert torch.equal(x, x_ref), f"step {i}"


def test_bad_step_count():
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowMatchEulerSchedule(0)
