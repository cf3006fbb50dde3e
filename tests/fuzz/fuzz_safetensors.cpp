// libFuzzer target: parse_safetensors (csrc/io/safetensors_format.h) on any
// bytes, as load_safetensors does on a memory-mapped file. A rejected input
// must throw FormatError naming the file (never a JSON library exception);
// an accepted one must have spans inside the data section that match
// shape x dtype size, and every byte of every tensor is read (ASan checks
// that the reads stay inside the input).
//
// The custom mutator mostly edits the JSON and then rewrites the length
// field to match, so that mutations reach the tensor checks instead of
// stopping at "header length is impossible"; it also mutates whole inputs.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "io/safetensors_format.h"

namespace io = moeyard::io;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  io::SafetensorsHeader h;
  try {
    h = io::parse_safetensors(data, size, "fuzz.safetensors");
  } catch (const io::FormatError& e) {
    if (std::strstr(e.what(), "safetensors fuzz.safetensors: ") == nullptr) {
      std::abort(); // an error must name the file
    }
    return 0;
  }
  if (h.data_start < 8 || h.data_start + h.data_size != size) {
    std::abort();
  }
  uint64_t sum = 0;
  for (const auto& t : h.tensors) {
    if (t.shape.size() > io::kSafetensorsMaxRank ||
        t.element_size != io::safetensors_dtype_size(t.dtype) ||
        t.element_size == 0 || t.begin > t.end || t.end > h.data_size) {
      std::abort();
    }
    // What at::empty(shape) would need: sizes >= 0 and the strides' product
    // in int64; the element count must match the span.
    unsigned __int128 numel = 1, extent = t.element_size;
    for (const int64_t d : t.shape) {
      if (d < 0) {
        std::abort();
      }
      numel *= (uint64_t)d;
      extent *= std::max<uint64_t>(d, 1);
      if (extent > (unsigned __int128)std::numeric_limits<int64_t>::max()) {
        std::abort();
      }
    }
    if (numel * t.element_size != t.end - t.begin) {
      std::abort();
    }
    for (uint64_t i = t.begin; i < t.end; ++i) {
      sum += data[h.data_start + i];
    }
  }
  volatile uint64_t sink = sum;
  (void)sink;
  return 0;
}

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" size_t LLVMFuzzerCustomMutator(
    uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
  if (size >= 9 && seed % 4 != 0) {
    uint64_t hn = 0;
    for (int i = 7; i >= 0; --i) {
      hn = (hn << 8) | data[i];
    }
    if (hn >= 1 && hn <= size - 8) {
      const std::vector<uint8_t> tail(data + 8 + hn, data + size);
      if (max_size >= 8 + hn + tail.size()) {
        const size_t room = max_size - 8 - tail.size();
        hn = LLVMFuzzerMutate(data + 8, hn, room);
        std::copy(tail.begin(), tail.end(), data + 8 + hn);
        for (int i = 0; i < 8; ++i) {
          data[i] = static_cast<uint8_t>(hn >> (8 * i));
        }
        return 8 + hn + tail.size();
      }
    }
  }
  return LLVMFuzzerMutate(data, size, max_size);
}
