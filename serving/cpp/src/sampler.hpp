// The flow-matching Euler schedule (diffusers' FlowMatchEulerDiscreteScheduler, 1000 training steps,
// static shift) and the overlapping tiles with Gaussian blending weights (qdit4sr/models/tiling.py),
// computed with the same float32/float64 operations in the same order as the Python sampler.
#pragma once

#include <vector>

namespace qdit4sr {

struct EulerSchedule {
  std::vector<float> timesteps;  // the transformer's `timestep` input per step (sigma * 1000)
  std::vector<float> sigmas;     // steps + 1 values, the last 0
};

EulerSchedule flow_match_euler(int steps, double shift);

std::vector<int> tile_starts(int length, int tile, int overlap);

struct Window {
  int top, left, height, width;
};
// Row-major over the tile starts, as tile_windows() orders them.
std::vector<Window> tile_windows(int height, int width, int tile, int overlap);

// gaussian_weights(height, width): separable bump in float64, rounded to float32, [height * width].
std::vector<float> gaussian_weights(int height, int width, double variance = 0.01);

}  // namespace qdit4sr
