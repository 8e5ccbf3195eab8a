// qdit4sr-ops: the runtime's numerical building blocks on raw float32 files, so that the tests can
// compare each one with its Python counterpart (tests/serving/test_cpp_ops.py).
//
//   qdit4sr-ops noise SEED COUNT OUT.f32
//   qdit4sr-ops resize C H W OUT_H OUT_W IN.f32 OUT.f32
//   qdit4sr-ops schedule STEPS SHIFT OUT.f32           (timesteps, then the steps + 1 sigmas)
//   qdit4sr-ops tiles LENGTH TILE OVERLAP              (prints the tile starts)
//   qdit4sr-ops weights H W OUT.f32
//   qdit4sr-ops sha256 FILE
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "noise.hpp"
#include "qdit4sr/error.hpp"
#include "resize.hpp"
#include "sampler.hpp"
#include "sha256.hpp"

namespace {

std::vector<float> read_f32(const std::string& path, std::size_t count) {
  std::vector<float> v(count);
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (!in) throw qdit4sr::Error("cannot read " + std::to_string(count) + " floats from " + path);
  return v;
}

void write_f32(const std::string& path, const std::vector<float>& v) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
  if (!out) throw qdit4sr::Error("cannot write " + path);
}

int run(const std::vector<std::string>& a) {
  const std::string cmd = a.empty() ? "" : a[0];
  auto i = [&](std::size_t k) { return std::stoll(a.at(k)); };
  if (cmd == "noise" && a.size() == 4) {
    write_f32(a[3], qdit4sr::gaussian_noise(static_cast<std::size_t>(i(2)), std::stoull(a[1])));
  } else if (cmd == "resize" && a.size() == 8) {
    const int c = static_cast<int>(i(1)), h = static_cast<int>(i(2)), w = static_cast<int>(i(3));
    const auto src = read_f32(a[6], static_cast<std::size_t>(c) * h * w);
    write_f32(a[7], qdit4sr::resize_bicubic(src, c, h, w, static_cast<int>(i(4)), static_cast<int>(i(5))));
  } else if (cmd == "schedule" && a.size() == 4) {
    const auto s = qdit4sr::flow_match_euler(static_cast<int>(i(1)), std::stod(a[2]));
    std::vector<float> out(s.timesteps);
    out.insert(out.end(), s.sigmas.begin(), s.sigmas.end());
    write_f32(a[3], out);
  } else if (cmd == "tiles" && a.size() == 4) {
    for (int start : qdit4sr::tile_starts(static_cast<int>(i(1)), static_cast<int>(i(2)), static_cast<int>(i(3)))) {
      std::printf("%d\n", start);
    }
  } else if (cmd == "weights" && a.size() == 4) {
    write_f32(a[3], qdit4sr::gaussian_weights(static_cast<int>(i(1)), static_cast<int>(i(2))));
  } else if (cmd == "sha256" && a.size() == 2) {
    std::printf("%s\n", qdit4sr::sha256_file(a[1]).c_str());
  } else {
    std::fprintf(stderr, "usage: qdit4sr-ops noise|resize|schedule|tiles|weights|sha256 ... (see the source)\n");
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
