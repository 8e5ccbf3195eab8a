#pragma once

#include <stdexcept>
#include <string>

namespace qdit4sr {

// Every failure the runtime reports: one line that says what is wrong and with which file or value.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace qdit4sr
