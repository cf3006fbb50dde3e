#include "io/token_shard.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "io/token_shard_format.h"

namespace moeyard::io {

TokenShard::TokenShard(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  TORCH_CHECK(
      fd >= 0,
      "token shard ",
      path,
      ": cannot open (",
      std::strerror(errno),
      ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    TORCH_CHECK(false, "token shard ", path, ": not a regular file");
  }
  bytes_ = static_cast<size_t>(st.st_size);
  // A file smaller than the header is not mapped (mmap refuses 0 bytes):
  // parse_token_shard reports its size without reading it.
  if (bytes_ >= kTokenShardHeaderBytes) {
    map_ = ::mmap(nullptr, bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
  }
  const int err = errno;
  ::close(fd);
  TORCH_CHECK(
      map_ != MAP_FAILED,
      "token shard ",
      path,
      ": mmap failed (",
      std::strerror(err),
      ")");
  const auto* p = static_cast<const uint8_t*>(map_);
  TokenShardHeader h;
  try {
    h = parse_token_shard(p, bytes_, path);
  } catch (const FormatError& e) {
    if (map_) { // the destructor does not run when the constructor throws
      ::munmap(map_, bytes_);
    }
    TORCH_CHECK(false, e.what());
  }
  // count * width < file size and vocab <= 2^32: both fit in int64.
  header_ = h;
  count_ = static_cast<int64_t>(h.count);
  vocab_ = static_cast<int64_t>(h.vocab);
  data_ = p;
}

TokenShard::~TokenShard() {
  if (map_ && map_ != MAP_FAILED) {
    ::munmap(map_, bytes_);
  }
}

at::Tensor TokenShard::read(int64_t start, int64_t n, int64_t vocab) const {
  TORCH_CHECK(
      start >= 0 && n >= 0 && start <= count_ && n <= count_ - start,
      "token shard ",
      path_,
      ": read of ",
      n,
      " tokens from position ",
      start,
      " is outside [0, ",
      count_,
      ")");
  auto out = at::empty({n}, at::kLong);
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = token_at(data_, header_, start + i);
    TORCH_CHECK(
        v < vocab,
        "token shard ",
        path_,
        ": token ",
        v,
        " at position ",
        start + i,
        " is outside the model vocabulary (",
        vocab,
        ")");
    o[i] = v;
  }
  return out;
}

} // namespace moeyard::io
