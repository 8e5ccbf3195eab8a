// qdit4sr-serve: super-resolve PNGs x4 with an exported folder, from C++.
//
//   qdit4sr-serve --engines DIR -i LR.png -o SR.png [-i LR2.png -o SR2.png ...]
//                 [--seed N] [--backend onnxruntime|tensorrt] [--threads N] [--parallel N]
//                 [--no-verify] [--cuda-graphs] [--device N]
//
// Exit codes: 0 every image written; 2 any error (one line on stderr, "error: ..."); an output whose
// image failed is not written (each PNG is written to a temporary file and renamed when complete).
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "qdit4sr/runtime.hpp"

namespace {

constexpr const char* kUsage =
    "usage: qdit4sr-serve --engines DIR -i LR.png -o SR.png [-i LR.png -o SR.png ...]\n"
    "                     [--seed N] [--backend onnxruntime|tensorrt] [--threads N] [--parallel N]\n"
    "                     [--no-verify] [--cuda-graphs] [--device N]\n"
    "Super-resolves each LR.png x4 with the exported folder DIR (its manifest.json), as\n"
    "qdit4sr-upscale does in Python (same noise for the same --seed).\n"
    "  --threads N    onnxruntime threads per call (0: its default)\n"
    "  --parallel N   request threads sharing one runtime (default 1)\n"
    "  --no-verify    skip the sha256 check of the folder's files (sizes are still checked)\n";

struct Args {
  std::string engines;
  std::vector<std::string> inputs, outputs;
  std::uint64_t seed = 0;
  qdit4sr::RuntimeOptions options;
  int parallel = 1;
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  std::exit(2);
}

long long parse_int(const std::string& flag, const std::string& value, long long lo) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(value.c_str(), &end, 10);
  if (errno || end == value.c_str() || *end != '\0' || v < lo) {
    fail(flag + " takes an integer >= " + std::to_string(lo) + ", got '" + value + "'");
  }
  return v;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "-h" || flag == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (flag == "--engines") {
      a.engines = value();
    } else if (flag == "-i" || flag == "--input") {
      a.inputs.push_back(value());
    } else if (flag == "-o" || flag == "--output") {
      a.outputs.push_back(value());
    } else if (flag == "--seed") {
      const std::string v = value();
      // Any integer from -2^63 to 2^64 - 1; negative seeds wrap modulo 2^64, as qdit4sr.noise does.
      char* end = nullptr;
      errno = 0;
      const unsigned long long u = std::strtoull(v.c_str(), &end, 10);
      if (!v.empty() && v[0] != '-' && !errno && end != v.c_str() && *end == '\0') {
        a.seed = u;
      } else {
        a.seed = static_cast<std::uint64_t>(parse_int("--seed", v, std::numeric_limits<long long>::min()));
      }
    } else if (flag == "--backend") {
      a.options.backend = value();
    } else if (flag == "--threads") {
      a.options.intra_op_threads = static_cast<int>(parse_int(flag, value(), 0));
    } else if (flag == "--parallel") {
      a.parallel = static_cast<int>(parse_int(flag, value(), 1));
    } else if (flag == "--device") {
      a.options.device = static_cast<int>(parse_int(flag, value(), 0));
    } else if (flag == "--no-verify") {
      a.options.check_hashes = false;
    } else if (flag == "--cuda-graphs") {
      a.options.cuda_graphs = true;
    } else {
      fail("unknown option '" + flag + "' (see --help)");
    }
  }
  if (a.engines.empty()) fail("--engines DIR is required (see --help)");
  if (a.inputs.empty()) fail("give at least one -i LR.png -o SR.png pair");
  if (a.inputs.size() != a.outputs.size()) fail("every -i needs its own -o");
  return a;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);
  // Read every input first: a missing or unreadable image fails before the (slower) model load.
  std::vector<qdit4sr::Image> images;
  try {
    for (const std::string& path : args.inputs) images.push_back(qdit4sr::read_png(path));
  } catch (const qdit4sr::Error& e) {
    fail(e.what());
  }
  const auto load_start = std::chrono::steady_clock::now();
  std::unique_ptr<qdit4sr::Runtime> runtime;
  try {
    runtime = std::make_unique<qdit4sr::Runtime>(args.engines, args.options);
  } catch (const qdit4sr::Error& e) {
    fail(e.what());
  } catch (const std::exception& e) {
    fail(std::string("unexpected failure while loading ") + args.engines + ": " + e.what());
  }
  std::printf("loaded %s (%s, %zu segments) in %.3f s\n", args.engines.c_str(), args.options.backend.c_str(),
              runtime->manifest().segments.size(), seconds_since(load_start));

  // Request threads take the next image from a shared counter; the runtime is shared by all of them.
  std::mutex mutex;
  std::size_t next = 0;
  std::vector<std::string> errors;
  auto worker = [&]() {
    for (;;) {
      std::size_t k;
      {
        std::lock_guard<std::mutex> lock(mutex);
        if (next >= images.size() || !errors.empty()) return;
        k = next++;
      }
      const auto start = std::chrono::steady_clock::now();
      try {
        const qdit4sr::Image sr = runtime->upscale(images[k], args.seed);
        const std::filesystem::path parent = std::filesystem::path(args.outputs[k]).parent_path();
        if (!parent.empty()) std::filesystem::create_directories(parent);
        qdit4sr::write_png(args.outputs[k], sr);
        std::lock_guard<std::mutex> lock(mutex);
        std::printf("wrote %s (%dx%d) in %.3f s\n", args.outputs[k].c_str(), sr.width, sr.height,
                    seconds_since(start));
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mutex);
        errors.push_back(args.inputs[k] + ": " + e.what());
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < args.parallel; ++t) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  if (!errors.empty()) fail(errors.front());
  return 0;
}
