#pragma once
// Shared by the pure file-format parsers (token_shard_format.h,
// safetensors_format.h): the error they throw and overflow-checked arithmetic
// for sizes read from files. Standard library only, so the parsers build
// without LibTorch (the fuzz harnesses in tests/fuzz/ link them alone); the
// readers turn a FormatError into a c10::Error with the same text.

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace moeyard::io {

// A file is not what its header says. what() names the file, the field, the
// value found and what was expected.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void format_error(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  throw FormatError(s.str());
}

// a * b and a + b, false when the result does not fit in 64 bits. Every size
// or offset computed from numbers in a file goes through these.
inline bool mul_fits(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_mul_overflow(a, b, out);
}
inline bool add_fits(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_add_overflow(a, b, out);
}

} // namespace moeyard::io
