// SHA-256 (FIPS 180-4), small and dependency-free: the manifest lists a digest for every file.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace qdit4sr {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t size);
  std::array<std::uint8_t, 32> digest();  // finishes the hash; call once
  std::string hexdigest();

 private:
  void block(const std::uint8_t* p);
  std::array<std::uint32_t, 8> h_;
  std::array<std::uint8_t, 64> buf_;
  std::size_t buf_len_ = 0;
  std::uint64_t total_ = 0;
};

// Lower-case hex sha256 of a file's bytes; throws qdit4sr::Error when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace qdit4sr
