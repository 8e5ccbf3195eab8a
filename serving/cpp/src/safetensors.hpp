// Minimal safetensors reader (float32 tensors), for the exported folder's prompt embeddings.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qdit4sr {

struct FloatTensor {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

// Every tensor of the file; throws Error for a malformed file or a dtype other than F32.
std::map<std::string, FloatTensor> read_safetensors(const std::string& path);

}  // namespace qdit4sr
