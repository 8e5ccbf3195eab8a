"""The sampler's flow-matching Euler schedule, without importing diffusers.

    schedule = FlowMatchEulerSchedule(num_inference_steps=4, shift=3.0)
    for i, t in enumerate(schedule.timesteps):
        x = schedule.step(velocity(x, t), i, x)

It computes what diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)` computes
after `set_timesteps(num_inference_steps)` with its default options (static shift, no Karras /
exponential / beta sigmas, deterministic steps), in the same dtypes and order of operations, so the
timesteps, sigmas and every step are bit-identical (tests/models/test_flow_match.py checks it against
diffusers). It exists because importing diffusers costs more start-up time than importing torch,
and running an exported folder needs nothing else from it.
"""
from __future__ import annotations

import numpy as np
import torch


class FlowMatchEulerSchedule:
    def __init__(self, num_inference_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000):
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        n = num_train_timesteps
        self.shift = shift
        self.num_train_timesteps = n
        # The training schedule's ends (diffusers' __init__): float32 throughout.
        train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
        train = shift * train / (1 + (shift - 1) * train)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        # set_timesteps: float64 in numpy, float32 from the shift on.
        sigmas = np.linspace(sigma_max * n, sigma_min * n, num_inference_steps) / n
        sigmas = torch.from_numpy(shift * sigmas / (1 + (shift - 1) * sigmas)).to(torch.float32)
        self.timesteps = sigmas * n
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """The sample after Euler step `step_index` (x + (sigma_next - sigma) * v, in float32)."""
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return (sample.to(torch.float32) + dt * velocity).to(velocity.dtype)
