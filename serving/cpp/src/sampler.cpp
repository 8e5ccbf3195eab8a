#include "sampler.hpp"

#include <cmath>
#include <stdexcept>

#include "qdit4sr/error.hpp"

namespace qdit4sr {

EulerSchedule flow_match_euler(int steps, double shift) {
  // __init__: float32 sigmas of the 1000 training timesteps, shifted in float32; only the first
  // (timestep 1000) and last (timestep 1) are used, as sigma_max and sigma_min.
  const float shift_f = static_cast<float>(shift);
  const float shift_m1 = static_cast<float>(shift - 1);
  auto shifted_f32 = [&](float t) {
    const float s = t / 1000.0f;
    return shift_f * s / (1.0f + shift_m1 * s);
  };
  const double sigma_max = shifted_f32(1000.0f);
  const double sigma_min = shifted_f32(1.0f);
  // set_timesteps: numpy float64 linspace(sigma_max * 1000, sigma_min * 1000, steps), / 1000, shifted.
  const double start = sigma_max * 1000, stop = sigma_min * 1000;
  EulerSchedule s;
  for (int i = 0; i < steps; ++i) {
    double t;
    if (steps == 1) {
      t = start;
    } else if (i == steps - 1) {
      t = stop;
    } else {
      const double step = (stop - start) / (steps - 1);
      t = static_cast<double>(i) * step + start;
    }
    const double sigma = t / 1000;
    const double shifted = shift * sigma / (1 + (shift - 1) * sigma);
    const float sigma_f = static_cast<float>(shifted);
    s.sigmas.push_back(sigma_f);
    s.timesteps.push_back(sigma_f * 1000.0f);
  }
  s.sigmas.push_back(0.0f);
  return s;
}

std::vector<int> tile_starts(int length, int tile, int overlap) {
  if (tile <= 0 || !(0 <= overlap && overlap < tile)) {
    throw Error("need tile > overlap >= 0, got tile=" + std::to_string(tile) + ", overlap=" + std::to_string(overlap));
  }
  if (length <= tile) return {0};
  const int stride = tile - overlap;
  const int count = static_cast<int>(std::ceil(static_cast<double>(length - tile) / stride)) + 1;
  std::vector<int> starts;
  for (int i = 0; i < count; ++i) {
    // Python's round(): half to even, which nearbyint gives in the default rounding mode.
    starts.push_back(static_cast<int>(std::nearbyint(static_cast<double>(i * (length - tile)) / (count - 1))));
  }
  return starts;
}

std::vector<Window> tile_windows(int height, int width, int tile, int overlap) {
  std::vector<Window> out;
  for (int top : tile_starts(height, tile, overlap)) {
    for (int left : tile_starts(width, tile, overlap)) {
      out.push_back(Window{top, left, std::min(tile, height), std::min(tile, width)});
    }
  }
  return out;
}

std::vector<float> gaussian_weights(int height, int width, double variance) {
  auto bump = [variance](int n) {
    std::vector<double> b(n);
    const double mid = (n - 1) / 2.0;
    for (int i = 0; i < n; ++i) {
      const double d = (static_cast<double>(i) - mid) / n;
      b[i] = std::exp(-(d * d) / (2 * variance));
    }
    return b;
  };
  const std::vector<double> by = bump(height), bx = bump(width);
  std::vector<float> w(static_cast<std::size_t>(height) * width);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) w[static_cast<std::size_t>(y) * width + x] = static_cast<float>(by[y] * bx[x]);
  }
  return w;
}

}  // namespace qdit4sr
