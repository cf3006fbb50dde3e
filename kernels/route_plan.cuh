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
    const int64_t* dropless_offset, // [E + 1]
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

// Pairs per CUDA thread in count/place (the CPU kernel uses one chunk per
// thread instead; the plan is the same).
constexpr int64_t kCudaChunk = 32;

#if defined(__CUDACC__)

__global__ void count_kernel(
    const int64_t* __restrict__ indices,
    int64_t P,
    int64_t E,
    int64_t n_chunks,
    int64_t* __restrict__ table) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       c < n_chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t begin = c * kCudaChunk;
    const int64_t end = begin + kCudaChunk < P ? begin + kCudaChunk : P;
    for (int64_t p = begin; p < end; ++p) {
      MOEYARD_KERNEL_ASSERT(indices[p] >= -1 && indices[p] < E);
    }
    count_chunk(indices, begin, end, E, table + c, n_chunks);
  }
}

// scan has E * n_chunks + 1 entries: scan[i] = sum of table[0:i).
__global__ void offsets_kernel(
    const int64_t* __restrict__ scan,
    int64_t E,
    int64_t n_chunks,
    int64_t* __restrict__ dropless_offset) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       e <= E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dropless_offset[e] = scan[e * n_chunks];
  }
}

__global__ void place_kernel(
    const int64_t* __restrict__ indices,
    int64_t P,
    int64_t K,
    int64_t capacity,
    bool keep_by_position,
    int64_t n_chunks,
    int64_t* __restrict__ cursor,
    const int64_t* __restrict__ dropless_offset,
    int64_t* __restrict__ slot,
    int64_t* __restrict__ row_token,
    int64_t* __restrict__ pair_at) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       c < n_chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t begin = c * kCudaChunk;
    const int64_t end = begin + kCudaChunk < P ? begin + kCudaChunk : P;
    place_chunk(
        indices,
        begin,
        end,
        K,
        capacity,
        keep_by_position,
        cursor + c,
        n_chunks,
        dropless_offset,
        slot,
        row_token,
        pair_at);
  }
}

__global__ void finish_kernel(
    const int64_t* __restrict__ dropless_offset,
    int64_t capacity,
    int64_t E,
    int64_t* __restrict__ expert_offsets,
    int64_t* __restrict__ counts) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    finish_expert(e, dropless_offset, capacity, expert_offsets, counts, E);
  }
}

// "probs": sort keys are the pairs' weights in dropless order.
template <typename W>
__global__ void gather_weight_keys(
    const int64_t* __restrict__ pair_at,
    const W* __restrict__ weights,
    const int64_t* __restrict__ dropless_offset,
    int64_t E,
    int64_t P,
    float* __restrict__ keys) {
  const int64_t assigned = dropless_offset[E];
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       r < P;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keys[r] = r < assigned ? static_cast<float>(weights[pair_at[r]]) : 0.f;
  }
}

// After the descending sort: each expert's first min(count, C) pairs go to
// kept[e*C ...] with segment bounds for the second (by pair index) sort.
__global__ void take_kept_kernel(
    const int64_t* __restrict__ sorted_pairs,
    const int64_t* __restrict__ dropless_offset,
    int64_t E,
    int64_t capacity,
    int64_t* __restrict__ kept,
    int64_t* __restrict__ kept_begin,
    int64_t* __restrict__ kept_end) {
  for (int64_t e = blockIdx.x; e < E; e += gridDim.x) {
    const int64_t begin = dropless_offset[e];
    const int64_t total = dropless_offset[e + 1] - begin;
    const int64_t n = total < capacity ? total : capacity;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      kept[e * capacity + j] = sorted_pairs[begin + j];
    }
    if (threadIdx.x == 0) {
      kept_begin[e] = e * capacity;
      kept_end[e] = e * capacity + n;
    }
  }
}

__global__ void write_kept_kernel(
    const int64_t* __restrict__ kept,
    const int64_t* __restrict__ kept_end,
    int64_t E,
    int64_t K,
    int64_t capacity,
    int64_t* __restrict__ slot,
    int64_t* __restrict__ row_token) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    write_kept(
        e,
        kept + e * capacity,
        kept_end[e] - e * capacity,
        K,
        capacity,
        slot,
        row_token);
  }
}

#endif // __CUDACC__

} // namespace moeyard::kernels::route_plan
