#include "safetensors.hpp"

#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "qdit4sr/error.hpp"

namespace qdit4sr {

std::map<std::string, FloatTensor> read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto bad = [&](const std::string& why) { return Error(path + " is not a valid safetensors file: " + why); };
  if (bytes.size() < 8) throw bad("shorter than its header");
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[i]);
  if (header_len > bytes.size() - 8) throw bad("header runs past the end");
  const std::size_t data_start = 8 + static_cast<std::size_t>(header_len);
  std::map<std::string, FloatTensor> out;
  try {
    const auto header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + static_cast<long>(data_start));
    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") continue;
      const auto& info = it.value();
      const std::string dtype = info.at("dtype").get<std::string>();
      if (dtype != "F32") throw bad("tensor " + it.key() + " is " + dtype + ", expected F32");
      FloatTensor t;
      std::size_t count = 1;
      for (const auto& d : info.at("shape")) {
        t.shape.push_back(d.get<std::int64_t>());
        count *= static_cast<std::size_t>(t.shape.back());
      }
      const auto begin = info.at("data_offsets").at(0).get<std::size_t>();
      const auto end = info.at("data_offsets").at(1).get<std::size_t>();
      if (end < begin || end - begin != count * sizeof(float) || data_start + end > bytes.size()) {
        throw bad("tensor " + it.key() + " has inconsistent data offsets");
      }
      t.data.resize(count);
      std::memcpy(t.data.data(), bytes.data() + data_start + begin, count * sizeof(float));  // little-endian hosts
      out[it.key()] = std::move(t);
    }
  } catch (const nlohmann::json::exception& e) {
    throw bad(e.what());
  }
  return out;
}

}  // namespace qdit4sr
