// Backend factories (one translation unit each) and helpers they share.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "qdit4sr/runtime.hpp"

namespace qdit4sr {

std::unique_ptr<SegmentBackend> make_ort_backend(const Manifest& manifest, const std::string& folder,
                                                 const RuntimeOptions& options);
#ifdef QDIT4SR_WITH_TENSORRT
std::unique_ptr<SegmentBackend> make_trt_backend(const Manifest& manifest, const std::string& folder,
                                                 const RuntimeOptions& options);
#endif

// The manifest's shape with the "batch" axis (-1) replaced by `batch`.
inline std::vector<std::int64_t> concrete_shape(const TensorSpec& spec, int batch) {
  std::vector<std::int64_t> shape = spec.shape;
  for (auto& d : shape) {
    if (d < 0) d = batch;
  }
  return shape;
}

// First line of a library's message (errors stay one line).
inline std::string one_line(const std::string& message) { return message.substr(0, message.find('\n')); }

}  // namespace qdit4sr
