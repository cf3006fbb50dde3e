#include "io/token_shard.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "io/token_shard_format.h"

namespace moeyard::io {

// A file smaller than the header is not mapped: parse_token_shard reports
// its size without reading it.
TokenShard::TokenShard(const std::string& path, uint32_t raw_width)
    : path_(path),
      file_(path, "token shard", raw_width > 0 ? 0 : kTokenShardHeaderBytes) {
  const uint8_t* p = file_.data();
  TokenShardHeader h;
  try {
    raw_ = raw_width > 0 && !has_token_shard_magic(p, file_.size());
    h = raw_ ? raw_token_file(file_.size(), raw_width, path)
             : parse_token_shard(p, file_.size(), path);
  } catch (const FormatError& e) {
    TORCH_CHECK(
        false,
        e.what(),
        raw_width == 0 && !has_token_shard_magic(p, file_.size())
            ? "; a raw token file (no header) needs data.raw_dtype: uint16 "
              "or uint32"
            : "");
  }
  // count * width < file size and vocab <= 2^32: both fit in int64.
  header_ = h;
  count_ = static_cast<int64_t>(h.count);
  vocab_ = static_cast<int64_t>(h.vocab);
  data_ = p;
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
