// The sampler's initial noise, bit for bit as qdit4sr/noise.py draws it (the spec is in that module's
// docstring and in the README): splitmix64 stream of mix64(seed), Box-Muller in float64, rounded to float32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qdit4sr {

std::uint64_t mix64(std::uint64_t z);
// bits(k) of the spec, k = 0 .. count-1.
std::vector<std::uint64_t> stream_bits(std::uint64_t seed, std::size_t count);
// `count` standard normal values in C order of the tensor they fill.
std::vector<float> gaussian_noise(std::size_t count, std::uint64_t seed);

}  // namespace qdit4sr
