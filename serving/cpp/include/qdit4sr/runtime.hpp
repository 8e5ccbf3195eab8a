// The Q-DiT4SR serving runtime: an exported folder in, x4 super-resolved images out.
//
//   qdit4sr::Runtime runtime("engines/");                 // validates manifest.json, loads every segment
//   qdit4sr::Image sr = runtime.upscale(qdit4sr::read_png("lr.png"), /*seed=*/0);
//   qdit4sr::write_png("sr.png", sr);                     // temp file + rename
//
// It does what qdit4sr.engines.runtime.load_exported_pipeline(folder).upscale(image, seed=seed) does
// in Python, with the same noise (qdit4sr/noise.py), and gives the same pixels on the ONNX Runtime
// backend (README, "Serving from C++").
//
// Threading: a Runtime is immutable once constructed, and upscale() may be called from any number of
// threads at once. The ONNX Runtime backend shares one session per segment between the threads
// (OrtSession::Run is thread-safe); the TensorRT backend serialises the calls of each segment on its
// one execution context and device buffers (a mutex per segment), so different segments still run
// concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qdit4sr/error.hpp"
#include "qdit4sr/manifest.hpp"

namespace qdit4sr {

// 8-bit RGB, rows top to bottom, pixels interleaved R, G, B.
struct Image {
  int width = 0;
  int height = 0;
  std::vector<std::uint8_t> rgb;  // height * width * 3
};

struct RuntimeOptions {
  std::string backend = "onnxruntime";  // or "tensorrt": the segment_kk.plan engines
  bool check_hashes = true;             // verify the sha256 of every file the manifest lists
  int intra_op_threads = 0;             // onnxruntime: threads per call, 0 = its default
  int device = 0;                       // tensorrt: CUDA device ordinal
  bool cuda_graphs = false;             // tensorrt: replay one captured CUDA graph per segment and batch
};

// The segment graphs/engines behind one interface: one forward of segment `segment`, on inputs laid
// out as the manifest's `inputs` (batch first, float32, contiguous); returns the velocity.
class SegmentBackend {
 public:
  virtual ~SegmentBackend() = default;
  // Must be safe to call from several threads at once.
  virtual std::vector<float> run(int segment, int batch, const std::vector<const float*>& inputs) const = 0;
};

// Backends compiled into this build ("onnxruntime", and "tensorrt" with QDIT4SR_WITH_TENSORRT).
std::vector<std::string> available_backends();
std::unique_ptr<SegmentBackend> make_backend(const Manifest& manifest, const std::string& folder,
                                             const RuntimeOptions& options);

class Runtime {
 public:
  explicit Runtime(const std::string& folder, const RuntimeOptions& options = RuntimeOptions());
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // The x`scale` super-resolved image; both sides of `lr` must be at least 8 pixels. Thread-safe.
  Image upscale(const Image& lr, std::uint64_t seed = 0, int scale = 4) const;

  const Manifest& manifest() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// PNG of any colour type and bit depth -> 8-bit RGB (palette expanded, grey replicated, alpha dropped,
// 16-bit samples reduced to their high byte, as Pillow's convert("RGB") does).
Image read_png(const std::string& path);
// Writes `path` atomically: a temporary file beside it, renamed over it once complete.
void write_png(const std::string& path, const Image& image);

}  // namespace qdit4sr
