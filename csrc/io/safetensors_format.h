#pragma once
// The safetensors header (https://github.com/huggingface/safetensors: u64
// little-endian header length, JSON header, data section), parsed and checked
// from bytes alone: load_safetensors (safetensors.h) reads files with it and
// the fuzz harness tests/fuzz/fuzz_safetensors.cpp calls it directly.

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "io/file_format.h"

namespace moeyard::io {

// A header of more than 100 MiB of JSON is corrupt.
constexpr uint64_t kSafetensorsMaxHeader = 100ull << 20;
// More dimensions than any tensor has; bounds what a header can make the
// reader allocate for shapes.
constexpr size_t kSafetensorsMaxRank = 1024;

struct SafetensorsTensor {
  std::string name;
  std::string dtype; // "F32", "BF16", ... (safetensors_dtype_size)
  size_t element_size = 0;
  // Every size >= 0; the product of the nonzero sizes times element_size
  // fits in int64.
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0; // [begin, end) in the data section
};

struct SafetensorsHeader {
  uint64_t data_start = 0; // file offset of the data section: 8 + JSON bytes
  uint64_t data_size = 0;
  std::vector<SafetensorsTensor> tensors; // in name order
  std::map<std::string, std::string> metadata; // "__metadata__"
};

// Bytes per element of a dtype the reader supports, 0 for others.
size_t safetensors_dtype_size(const std::string& dtype);

// Parses the whole file `data[0, size)` (`path` names it in errors) and
// checks every field before anything is allocated from it: header length,
// JSON, each tensor's dtype, shape and data_offsets (types, ranges,
// shape x dtype size == span without overflow, span inside the data
// section), no overlapping spans, metadata values. Throws FormatError.
SafetensorsHeader parse_safetensors(
    const uint8_t* data, size_t size, const std::string& path);

} // namespace moeyard::io
