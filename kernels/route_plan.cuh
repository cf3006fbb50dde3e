#pragma once
// route_plan's algorithm as per-chunk functions shared by the CPU kernel and
// the CUDA kernels (one CUDA thread per chunk):
//   1. count_chunk: histogram of the chunk's pairs, written to the chunk's
//      column of an expert-major table hist[e * num_chunks + c];
//   2. an exclusive scan of that table (CUB on the GPU) gives, for every
//      (expert, chunk), the dropless row of the chunk's first pair of that
//      expert; the scan at chunk 0 is the expert's dropless offset;
//   3. place_chunk: walks the chunk in pair order, advancing its own column
//      of the scanned table as a cursor (each chunk owns its column: no
//      atomics), and writes slot / row_token.
// Pairs are taken in flat order t * K + k, so the plan does not depend on the
// chunking: any number of chunks gives the same plan.

#include "common.cuh"

namespace moeyard::kernels::route_plan {

// hist_col[e * stride] = number of pairs of expert e in [begin, end).
MOEYARD_HD void count_chunk(
    const int64_t* indices,
    int64_t begin,
    int64_t end,
    int64_t num_experts,
    int64_t* hist_col,
    int64_t stride) {
  for (int64_t e = 0; e < num_experts; ++e) {
    hist_col[e * stride] = 0;
  }
  for (int64_t p = begin; p < end; ++p) {
    const int64_t e = indices[p];
    if (e >= 0) {
      ++hist_col[e * stride];
    }
  }
}

// Places the pairs [begin, end). cursor_col[e * stride] starts as the
// exclusive-scan value of (e, this chunk) and is advanced per pair.
// expert_offset[e] is the dropless offset of expert e.
//  capacity < 0 : dropless, slot = dropless row.
//  capacity >= 1, keep_by_position: rank < capacity is kept at e*C + rank.
//  capacity >= 1, !keep_by_position: pair_at[dropless row] = p; the caller
//    then keeps each expert's highest weights (select_by_weight).
MOEYARD_HD void place_chunk(
    const int64_t* indices,
    int64_t begin,
    int64_t end,
    int64_t K,
    int64_t capacity,
    bool keep_by_position,
    int64_t* cursor_col,
    int64_t stride,
    const int64_t* expert_offset,
    int64_t* slot,
    int64_t* row_token,
    int64_t* pair_at) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t e = indices[p];
    if (e < 0) {
      slot[p] = -1;
      continue;
    }
    const int64_t row = cursor_col[e * stride]++;
    if (capacity < 0) {
      slot[p] = row;
      row_token[row] = p / K;
      continue;
    }
    const int64_t rank = row - expert_offset[e];
    if (keep_by_position) {
      const bool keep = rank < capacity;
      slot[p] = keep ? e * capacity + rank : -1;
      if (keep) {
        row_token[e * capacity + rank] = p / K;
      }
    } else {
      pair_at[row] = p;
      slot[p] = -1;
    }
  }
}

// Final per-expert outputs once the dropless offsets are known.
MOEYARD_HD void finish_expert(
    int64_t e,
    const int64_t* dropless_offset,  // [E + 1]
    int64_t capacity,
    int64_t* expert_offsets,
    int64_t* counts,
    int64_t num_experts) {
  const int64_t total = dropless_offset[e + 1] - dropless_offset[e];
  if (capacity < 0) {
    counts[e] = total;
    expert_offsets[e] = dropless_offset[e];
    if (e == num_experts - 1) {
      expert_offsets[num_experts] = dropless_offset[num_experts];
    }
  } else {
    counts[e] = total < capacity ? total : capacity;
    expert_offsets[e] = e * capacity;
    if (e == num_experts - 1) {
      expert_offsets[num_experts] = num_experts * capacity;
    }
  }
}

// Writes the kept pairs of one expert (sorted by pair index, at most
// `capacity` of them) into its window.
MOEYARD_HD void write_kept(
    int64_t e,
    const int64_t* kept,
    int64_t n_kept,
    int64_t K,
    int64_t capacity,
    int64_t* slot,
    int64_t* row_token) {
  for (int64_t j = 0; j < n_kept; ++j) {
    const int64_t row = e * capacity + j;
    slot[kept[j]] = row;
    row_token[row] = kept[j] / K;
  }
}

}  // namespace moeyard::kernels::route_plan
