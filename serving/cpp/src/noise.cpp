#include "noise.hpp"

#include <cmath>

namespace qdit4sr {

namespace {
constexpr std::uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ULL;
constexpr double kTwoPi = 6.283185307179586;
constexpr double kTwoPow53 = 1.0 / 9007199254740992.0;  // 2^-53
}  // namespace

std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::vector<std::uint64_t> stream_bits(std::uint64_t seed, std::size_t count) {
  const std::uint64_t key = mix64(seed);
  std::vector<std::uint64_t> out(count);
  for (std::size_t k = 0; k < count; ++k) out[k] = mix64(key + (static_cast<std::uint64_t>(k) + 1) * kGoldenGamma);
  return out;
}

std::vector<float> gaussian_noise(std::size_t count, std::uint64_t seed) {
  // Built with -ffp-contract=off: every product and sum below is rounded on its own, as numpy does.
  const std::uint64_t key = mix64(seed);
  std::vector<float> out(count);
  for (std::size_t i = 0; i < count; i += 2) {
    const std::uint64_t p = i / 2;
    const std::uint64_t b1 = mix64(key + (2 * p + 1) * kGoldenGamma);
    const std::uint64_t b2 = mix64(key + (2 * p + 2) * kGoldenGamma);
    const double u1 = (static_cast<double>(b1 >> 11) + 1.0) * kTwoPow53;
    const double u2 = static_cast<double>(b2 >> 11) * kTwoPow53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = kTwoPi * u2;
    out[i] = static_cast<float>(r * std::cos(theta));
    if (i + 1 < count) out[i + 1] = static_cast<float>(r * std::sin(theta));
  }
  return out;
}

}  // namespace qdit4sr
