#include "io/token_shard.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

namespace moeyard::io {
namespace {

constexpr char kMagic[8] = {'M', 'O', 'E', 'Y', 'T', 'O', 'K', '1'};
constexpr size_t kHeader = 32;

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

} // namespace

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
  ::fstat(fd, &st);
  bytes_ = static_cast<size_t>(st.st_size);
  if (bytes_ < kHeader) {
    ::close(fd);
    TORCH_CHECK(
        false,
        "token shard ",
        path,
        ": ",
        bytes_,
        " bytes is smaller than the 32-byte header");
  }
  map_ = ::mmap(nullptr, bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  TORCH_CHECK(map_ != MAP_FAILED, "token shard ", path, ": mmap failed");
  const auto* p = static_cast<const uint8_t*>(map_);
  TORCH_CHECK(
      std::memcmp(p, kMagic, 8) == 0,
      "token shard ",
      path,
      ": bad magic (expected MOEYTOK1); not a moeyard shard");
  const uint32_t version = load<uint32_t>(p + 8);
  TORCH_CHECK(
      version == 1,
      "token shard ",
      path,
      ": version ",
      version,
      ", expected 1");
  width_ = load<uint32_t>(p + 12);
  TORCH_CHECK(
      width_ == 2 || width_ == 4,
      "token shard ",
      path,
      ": bytes per token ",
      width_,
      ", expected 2 or 4");
  count_ = static_cast<int64_t>(load<uint64_t>(p + 16));
  vocab_ = static_cast<int64_t>(load<uint64_t>(p + 24));
  TORCH_CHECK(
      count_ >= 0 && bytes_ == kHeader + static_cast<size_t>(count_) * width_,
      "token shard ",
      path,
      ": header says ",
      count_,
      " tokens of ",
      width_,
      " bytes but the file has ",
      bytes_ - kHeader,
      " data bytes (truncated or corrupt)");
  data_ = p + kHeader;
}

TokenShard::~TokenShard() {
  if (map_ && map_ != MAP_FAILED) {
    ::munmap(map_, bytes_);
  }
}

at::Tensor TokenShard::read(int64_t start, int64_t n, int64_t vocab) const {
  TORCH_CHECK(
      start >= 0 && n >= 0 && start + n <= count_,
      "token shard ",
      path_,
      ": read [",
      start,
      ", ",
      start + n,
      ") outside [0, ",
      count_,
      ")");
  auto out = at::empty({n}, at::kLong);
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* q = data_ + (start + i) * width_;
    const int64_t v = width_ == 2 ? load<uint16_t>(q) : load<uint32_t>(q);
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
