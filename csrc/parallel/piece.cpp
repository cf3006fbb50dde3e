#include "parallel/piece.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace moeyard::parallel {

std::vector<std::pair<int64_t, int64_t>> Piece::ranges(int64_t n) const {
  if (whole()) {
    return {{0, n}};
  }
  TORCH_CHECK(
      split.parts >= 1 && count >= 1 && index >= 0 && index < count &&
          n % (split.parts * count) == 0,
      "piece ",
      index,
      " of ",
      count,
      ": size ",
      n,
      " of dim ",
      split.dim,
      " does not split into ",
      split.parts,
      " x ",
      count,
      " pieces");
  const int64_t block = n / split.parts, len = block / count;
  std::vector<std::pair<int64_t, int64_t>> r;
  for (int64_t p = 0; p < split.parts; ++p) {
    r.emplace_back(p * block + index * len, p * block + (index + 1) * len);
  }
  return r;
}

int64_t copy_overlap(
    at::Tensor& dst,
    const Piece& want,
    const at::Tensor& src,
    const Piece& have,
    int64_t n) {
  if (want.whole() && have.whole()) {
    dst.copy_(src);
    return dst.numel();
  }
  const int64_t d = want.whole() ? have.split.dim : want.split.dim;
  TORCH_CHECK(
      want.whole() || have.whole() ||
          (want.split.dim == have.split.dim &&
           want.split.parts == have.split.parts),
      "piece of dim ",
      have.split.dim,
      " (",
      have.split.parts,
      " parts) cannot fill a piece of dim ",
      want.split.dim,
      " (",
      want.split.parts,
      " parts)");
  TORCH_CHECK(
      d < dst.dim() && d < src.dim(),
      "piece split along dim ",
      d,
      " of a ",
      dst.dim(),
      "-dimensional tensor");
  const int64_t row = dst.size(d) == 0 ? 0 : dst.numel() / dst.size(d);
  int64_t written = 0, wo = 0;
  for (const auto& [wa, wb] : want.ranges(n)) {
    int64_t ho = 0;
    for (const auto& [ha, hb] : have.ranges(n)) {
      const int64_t a = std::max(wa, ha), b = std::min(wb, hb);
      if (a < b) {
        dst.narrow(d, wo + a - wa, b - a)
            .copy_(src.narrow(d, ho + a - ha, b - a));
        written += (b - a) * row;
      }
      ho += hb - ha;
    }
    wo += wb - wa;
  }
  return written;
}

} // namespace moeyard::parallel
