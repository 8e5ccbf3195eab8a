// TensorRT backend: the segment_kk.plan engines (built with AOT plugins, so no plugin library is needed).
//
// Every engine is deserialized once, with one execution context, one CUDA stream and one set of device
// buffers per segment, created up front and reused across steps (grown to the largest batch seen; the
// context is rebound only when the batch changes). A context is not thread-safe, so the calls of one
// segment are serialised by that segment's mutex; different segments run concurrently. With
// RuntimeOptions::cuda_graphs, the enqueue of each (segment, batch) is captured into a CUDA graph after
// its first run and replayed afterwards. Batches beyond the engine's optimisation profile are split.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "backends.hpp"
#include "qdit4sr/error.hpp"

namespace qdit4sr {
namespace {

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "tensorrt: %s\n", msg);
  }
};

void check_cuda(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) throw Error("CUDA error in " + what + ": " + cudaGetErrorString(status));
}

std::size_t element_count(const std::vector<std::int64_t>& shape) {
  std::size_t n = 1;
  for (std::int64_t d : shape) n *= static_cast<std::size_t>(d);
  return n;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  // Grows the buffer; true when it moved (bound addresses and captured graphs are then stale).
  bool reserve(std::size_t need) {
    if (need <= bytes) return false;
    if (ptr) cudaFree(ptr);
    ptr = nullptr;
    check_cuda(cudaMalloc(&ptr, need), "cudaMalloc");
    bytes = need;
    return true;
  }
};

struct Segment {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;  // destroyed before its engine
  int batch_min = 1;
  int batch_max = 1;
  cudaStream_t stream = nullptr;
  std::vector<DeviceBuffer> buffers;  // one per manifest input, then the output
  int bound_batch = 0;
  std::map<int, cudaGraphExec_t> graphs;  // batch -> captured enqueueV3
  std::mutex mutex;

  ~Segment() {
    for (auto& [batch, exec] : graphs) cudaGraphExecDestroy(exec);
    if (stream) cudaStreamDestroy(stream);
  }
};

class TrtBackend : public SegmentBackend {
 public:
  TrtBackend(const Manifest& manifest, const std::string& folder, const RuntimeOptions& options)
      : device_(options.device), cuda_graphs_(options.cuda_graphs), inputs_(manifest.inputs),
        output_(manifest.outputs.at(0)) {
    std::string missing;
    for (const SegmentEntry& seg : manifest.segments) {
      if (!seg.engine) missing += (missing.empty() ? "" : ", ") + std::to_string(seg.index);
    }
    if (!missing.empty()) {
      throw Error("segments [" + missing + "] have no TensorRT engine; build them on the serving GPU with "
                  "qdit4sr-build-engines FOLDER");
    }
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw Error("TensorRT could not create a runtime (libnvinfer missing or incompatible?)");
    for (const SegmentEntry& seg : manifest.segments) segments_.push_back(load(seg, resolve(folder, *seg.engine)));
  }

  std::vector<float> run(int segment, int batch, const std::vector<const float*>& inputs) const override {
    Segment& seg = *segments_.at(segment);
    std::vector<float> out(element_count(concrete_shape(output_, batch)));
    const std::size_t out_item = out.size() / batch;
    for (int start = 0; start < batch; start += seg.batch_max) {
      const int n = std::min(seg.batch_max, batch - start);
      if (n < seg.batch_min) {
        throw Error("batch " + std::to_string(n) + " is below the engine's optimisation profile [" +
                    std::to_string(seg.batch_min) + ", " + std::to_string(seg.batch_max) + "]");
      }
      std::vector<const float*> chunk;
      for (std::size_t i = 0; i < inputs_.size(); ++i) {
        chunk.push_back(inputs[i] + start * (element_count(concrete_shape(inputs_[i], batch)) / batch));
      }
      run_chunk(segment, seg, n, chunk, out.data() + start * out_item);
    }
    return out;
  }

 private:
  std::unique_ptr<Segment> load(const SegmentEntry& entry, const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!in.good() && !in.eof()) throw Error("cannot read engine " + path);
    auto seg = std::make_unique<Segment>();
    const std::string name = "segment " + std::to_string(entry.index);
    seg->engine.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!seg->engine) {
      throw Error("TensorRT could not deserialize " + path + " (" + name +
                  "): built with another TensorRT version or for another GPU? Rebuild it on this machine");
    }
    std::vector<TensorSpec> io = inputs_;
    io.push_back(output_);
    for (std::size_t i = 0; i < io.size(); ++i) {
      const char* tensor = io[i].name.c_str();
      const bool is_input = i < inputs_.size();
      const auto mode = seg->engine->getTensorIOMode(tensor);
      if (mode != (is_input ? nvinfer1::TensorIOMode::kINPUT : nvinfer1::TensorIOMode::kOUTPUT)) {
        throw Error(name + ": the engine has no " + (is_input ? "input " : "output ") + io[i].name);
      }
      if (seg->engine->getTensorDataType(tensor) != nvinfer1::DataType::kFLOAT) {
        throw Error(name + ": " + io[i].name + " is not float32 in the engine");
      }
      const nvinfer1::Dims dims = seg->engine->getTensorShape(tensor);
      std::vector<std::int64_t> shape(dims.d, dims.d + dims.nbDims);
      if (shape != io[i].shape) throw Error(name + ": " + io[i].name + " has another shape in the engine than in the manifest");
    }
    const char* first = inputs_.at(0).name.c_str();
    seg->batch_min = static_cast<int>(seg->engine->getProfileShape(first, 0, nvinfer1::OptProfileSelector::kMIN).d[0]);
    seg->batch_max = static_cast<int>(seg->engine->getProfileShape(first, 0, nvinfer1::OptProfileSelector::kMAX).d[0]);
    seg->context.reset(seg->engine->createExecutionContext());
    if (!seg->context) throw Error(name + ": TensorRT could not create an execution context");
    check_cuda(cudaStreamCreateWithFlags(&seg->stream, cudaStreamNonBlocking), "cudaStreamCreate");
    seg->buffers = std::vector<DeviceBuffer>(io.size());
    return seg;
  }

  void run_chunk(int index, Segment& seg, int batch, const std::vector<const float*>& inputs, float* out) const {
    std::lock_guard<std::mutex> lock(seg.mutex);
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");  // the device is per-thread state
    bool moved = false;
    for (std::size_t i = 0; i < inputs_.size(); ++i) {
      moved |= seg.buffers[i].reserve(element_count(concrete_shape(inputs_[i], batch)) * sizeof(float));
    }
    const std::size_t out_bytes = element_count(concrete_shape(output_, batch)) * sizeof(float);
    moved |= seg.buffers.back().reserve(out_bytes);
    if (moved) {
      for (auto& [b, exec] : seg.graphs) cudaGraphExecDestroy(exec);
      seg.graphs.clear();
    }
    const bool rebind = moved || seg.bound_batch != batch;
    if (rebind) {
      for (std::size_t i = 0; i < inputs_.size(); ++i) {
        const auto shape = concrete_shape(inputs_[i], batch);
        nvinfer1::Dims dims{};
        dims.nbDims = static_cast<std::int32_t>(shape.size());
        std::copy(shape.begin(), shape.end(), dims.d);
        if (!seg.context->setInputShape(inputs_[i].name.c_str(), dims)) {
          throw Error("segment " + std::to_string(index) + " rejected " + inputs_[i].name + " for batch " +
                      std::to_string(batch));
        }
        seg.context->setTensorAddress(inputs_[i].name.c_str(), seg.buffers[i].ptr);
      }
      seg.context->setTensorAddress(output_.name.c_str(), seg.buffers.back().ptr);
      seg.bound_batch = batch;
    }
    for (std::size_t i = 0; i < inputs_.size(); ++i) {
      const std::size_t bytes = element_count(concrete_shape(inputs_[i], batch)) * sizeof(float);
      check_cuda(cudaMemcpyAsync(seg.buffers[i].ptr, inputs[i], bytes, cudaMemcpyHostToDevice, seg.stream),
                 "copy to device");
    }
    auto graph = seg.graphs.find(batch);
    if (cuda_graphs_ && graph != seg.graphs.end() && !rebind) {
      check_cuda(cudaGraphLaunch(graph->second, seg.stream), "cudaGraphLaunch");
    } else {
      // The first enqueue after (re)binding also applies the shape and address updates; graphs are
      // captured only after it, as TensorRT requires.
      if (!seg.context->enqueueV3(seg.stream)) throw Error("TensorRT failed to enqueue segment " + std::to_string(index));
      if (cuda_graphs_) capture(seg, batch);
    }
    check_cuda(cudaMemcpyAsync(out, seg.buffers.back().ptr, out_bytes, cudaMemcpyDeviceToHost, seg.stream),
               "copy to host");
    check_cuda(cudaStreamSynchronize(seg.stream), "cudaStreamSynchronize");
  }

  static void capture(Segment& seg, int batch) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    check_cuda(cudaStreamBeginCapture(seg.stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    const bool enqueued = seg.context->enqueueV3(seg.stream);
    const cudaError_t ended = cudaStreamEndCapture(seg.stream, &graph);
    if (!enqueued || ended != cudaSuccess) {
      if (graph) cudaGraphDestroy(graph);
      return;  // not capturable (e.g. data-dependent shapes): keep enqueuing normally
    }
    const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (made != cudaSuccess) return;
    auto old = seg.graphs.find(batch);
    if (old != seg.graphs.end()) cudaGraphExecDestroy(old->second);
    seg.graphs[batch] = exec;
  }

  int device_;
  bool cuda_graphs_;
  std::vector<TensorSpec> inputs_;
  TensorSpec output_;
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::vector<std::unique_ptr<Segment>> segments_;  // destroyed before the runtime
};

}  // namespace

std::unique_ptr<SegmentBackend> make_trt_backend(const Manifest& manifest, const std::string& folder,
                                                 const RuntimeOptions& options) {
  return std::make_unique<TrtBackend>(manifest, folder, options);
}

}  // namespace qdit4sr
