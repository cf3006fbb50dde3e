// libFuzzer target: parse_token_shard (csrc/io/token_shard_format.h) on any
// bytes, as TokenShard does on a memory-mapped file. A rejected input must
// throw FormatError naming the file; an accepted one must describe the
// buffer exactly, and every token it declares is read (ASan checks that the
// reads stay inside the input).

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "io/token_shard_format.h"

namespace io = moeyard::io;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  io::TokenShardHeader h;
  try {
    h = io::parse_token_shard(data, size, "fuzz.bin");
  } catch (const io::FormatError& e) {
    if (std::strstr(e.what(), "token shard fuzz.bin: ") == nullptr) {
      std::abort(); // an error must name the file
    }
    return 0;
  }
  const unsigned __int128 declared =
      io::kTokenShardHeaderBytes + (unsigned __int128)h.count * h.width;
  if (declared != size || h.vocab < 1 ||
      h.vocab > (uint64_t(1) << (8 * h.width))) {
    std::abort(); // accepted a header that does not match the file
  }
  uint64_t sum = 0;
  for (uint64_t i = 0; i < h.count; ++i) {
    sum += io::token_at(data, h, i);
  }
  volatile uint64_t sink = sum;
  (void)sink;
  return 0;
}
