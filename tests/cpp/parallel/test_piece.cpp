// Pieces of a tensor: copy_overlap joins any stored layout into any wanted
// piece (checked against tp_slice of the full tensor, the layout's own
// cut), reads only the overlapping rows, and says when pieces do not fit.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include "parallel/piece.h"

namespace {

using moeyard::parallel::copy_overlap;
using moeyard::parallel::Piece;
using moeyard::parallel::tp_slice;
using moeyard::parallel::TpSplit;

TEST(Piece, AnyStoredLayoutFillsAnyWantedPiece) {
  const auto full = at::randn({8, 12, 3}, at::kDouble);
  for (const TpSplit split : {TpSplit{0, 1}, TpSplit{1, 1}, TpSplit{1, 2}}) {
    const int64_t n = full.size(split.dim);
    for (int64_t have_count : {1, 2, 3, 4}) {
      for (int64_t want_count : {1, 2, 3, 4}) {
        if (n % (split.parts * have_count) || n % (split.parts * want_count)) {
          continue;
        }
        for (int64_t w = 0; w < want_count; ++w) {
          const Piece want{split, w, want_count};
          const auto expect = tp_slice(full, split, w, want_count);
          auto dst = at::zeros_like(expect, at::kFloat); // converts dtype
          int64_t written = 0;
          for (int64_t h = 0; h < have_count; ++h) {
            const auto src = tp_slice(full, split, h, have_count);
            written += copy_overlap(dst, want, src, {split, h, have_count}, n);
          }
          EXPECT_EQ(written, dst.numel());
          EXPECT_TRUE(at::equal(dst, expect.to(at::kFloat)))
              << "dim " << split.dim << " parts " << split.parts << " have "
              << have_count << " want " << w << "/" << want_count;
        }
      }
    }
  }
}

TEST(Piece, DisjointPiecesWriteNothing) {
  const auto full = at::arange(16, at::kFloat).view({8, 2});
  auto dst = at::full({2, 2}, -1.0f);
  // Want rows [0, 2), have rows [4, 8).
  EXPECT_EQ(
      copy_overlap(
          dst, {{0, 1}, 0, 4}, full.narrow(0, 4, 4), {{0, 1}, 1, 2}, 8),
      0);
  EXPECT_TRUE(at::equal(dst, at::full({2, 2}, -1.0f)));
}

TEST(Piece, MismatchedSplitsAreErrors) {
  auto dst = at::zeros({4, 4});
  const auto src = at::zeros({4, 2});
  EXPECT_THROW(
      copy_overlap(dst, {{0, 1}, 0, 2}, src, {{1, 1}, 0, 2}, 8), c10::Error);
  EXPECT_THROW(
      copy_overlap(dst, {{0, 1}, 0, 3}, at::zeros({3, 4}), {{0, 1}, 0, 3}, 8),
      c10::Error); // 8 rows do not split into 3 pieces
}

} // namespace
