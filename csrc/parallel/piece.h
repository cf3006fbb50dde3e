#pragma once
// A rank's piece of a tensor and its place in the full tensor: piece
// `index` of `count` along a split (TpSplit: one dimension, `parts` equal
// blocks each cut alike). Initialization fills a piece with the values of
// the whole tensor's positions it holds; checkpoint loading copies the
// overlap of a stored piece and a wanted one, whatever layouts wrote and
// read them.

#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "parallel/tensor_parallel.h"

namespace moeyard::parallel {

struct Piece {
  TpSplit split; // dim -1: not split
  int64_t index = 0;
  int64_t count = 1;

  bool whole() const {
    return !split.sharded() || count == 1;
  }
  // The full tensor's rows [begin, end) along split.dim this piece holds,
  // one range per part, in the piece's order; `n`: the full size of that
  // dimension. Errors when n does not split into parts x count.
  std::vector<std::pair<int64_t, int64_t>> ranges(int64_t n) const;
};

// Copies into `dst` (piece `want` of a tensor) the elements it shares with
// `src` (piece `have` of the same tensor, whose full size along the split
// dimension is `n`), converting the dtype; returns the elements written.
// Both pieces split along the same dimension into the same parts, or one
// of them is whole. Reads only the shared rows of `src` (a view of a
// memory-mapped file stays unread elsewhere).
int64_t copy_overlap(
    at::Tensor& dst,
    const Piece& want,
    const at::Tensor& src,
    const Piece& have,
    int64_t n);

} // namespace moeyard::parallel
