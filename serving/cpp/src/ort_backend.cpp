// ONNX Runtime backend: one session per segment on the portable graphs, shared by all threads.
//
// Same settings as the Python OrtBackend: CPU execution provider, ORT_ENABLE_BASIC (the extended levels
// fuse Q/DQ + MatMul into integer kernels that can be inexact on CPUs without VNNI), the default
// thread count unless one is given. OrtSession::Run may be called concurrently (ONNX Runtime documents
// it as thread-safe), so run() takes no lock.
#include <onnxruntime_cxx_api.h>

#include <numeric>
#include <string>
#include <vector>

#include "backends.hpp"
#include "qdit4sr/error.hpp"

namespace qdit4sr {
namespace {

Ort::Env& process_env() {
  static Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "qdit4sr");  // one per process, created on first use
  return env;
}

class OrtBackend : public SegmentBackend {
 public:
  OrtBackend(const Manifest& manifest, const std::string& folder, const RuntimeOptions& options)
      : memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    const std::string flavour = "portable";
    if (manifest.segments.empty() || !manifest.segments[0].graphs.count(flavour)) {
      std::string have;
      for (const auto& f : manifest.flavours()) have += (have.empty() ? "" : ", ") + f;
      throw Error("the folder has no '" + flavour + "' graphs for onnxruntime (it has " + have + ")");
    }
    Ort::SessionOptions session_options;
    session_options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_BASIC);
    if (options.intra_op_threads > 0) session_options.SetIntraOpNumThreads(options.intra_op_threads);
    for (const auto& spec : manifest.inputs) input_specs_.push_back(spec);
    for (const auto& spec : input_specs_) input_names_.push_back(spec.name.c_str());
    output_spec_ = manifest.outputs.at(0);
    output_name_ = output_spec_.name.c_str();
    for (const SegmentEntry& seg : manifest.segments) {
      const std::string path = resolve(folder, seg.graphs.at(flavour));
      try {
        sessions_.emplace_back(process_env(), path.c_str(), session_options);
      } catch (const Ort::Exception& e) {
        throw Error("onnxruntime cannot load segment " + std::to_string(seg.index) + " (" + path + "): " +
                    one_line(e.what()));
      }
    }
  }

  std::vector<float> run(int segment, int batch, const std::vector<const float*>& inputs) const override {
    std::vector<Ort::Value> values;
    std::vector<std::vector<std::int64_t>> shapes;
    for (std::size_t i = 0; i < input_specs_.size(); ++i) {
      shapes.push_back(concrete_shape(input_specs_[i], batch));
      const auto& shape = shapes.back();
      const std::size_t count = std::accumulate(shape.begin(), shape.end(), std::size_t(1),
                                                [](std::size_t a, std::int64_t b) { return a * b; });
      // The C API takes a mutable pointer; ONNX Runtime does not write to input tensors.
      values.push_back(Ort::Value::CreateTensor<float>(memory_, const_cast<float*>(inputs[i]), count, shape.data(),
                                                       shape.size()));
    }
    std::vector<Ort::Value> out;
    try {
      out = sessions_.at(segment).Run(Ort::RunOptions{nullptr}, input_names_.data(), values.data(), values.size(), &output_name_, 1);
    } catch (const Ort::Exception& e) {
      throw Error("onnxruntime failed on segment " + std::to_string(segment) + ": " + one_line(e.what()));
    }
    const auto expected = concrete_shape(output_spec_, batch);
    if (out.size() != 1 || out[0].GetTensorTypeAndShapeInfo().GetShape() != expected) {
      throw Error("segment " + std::to_string(segment) + " returned a velocity of an unexpected shape");
    }
    const float* data = out[0].GetTensorData<float>();
    return std::vector<float>(data, data + out[0].GetTensorTypeAndShapeInfo().GetElementCount());
  }

 private:
  Ort::MemoryInfo memory_;
  mutable std::vector<Ort::Session> sessions_;  // Run() is non-const in the C++ wrapper, thread-safe in ORT
  std::vector<TensorSpec> input_specs_;
  std::vector<const char*> input_names_;
  TensorSpec output_spec_;
  const char* output_name_ = nullptr;
};

}  // namespace

std::unique_ptr<SegmentBackend> make_ort_backend(const Manifest& manifest, const std::string& folder,
                                                 const RuntimeOptions& options) {
  return std::make_unique<OrtBackend>(manifest, folder, options);
}

}  // namespace qdit4sr
