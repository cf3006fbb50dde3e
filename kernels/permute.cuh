#pragma once
// permute / unpermute device code. The CPU twins are the CPU kernels in
// csrc/ops/{permute,unpermute}/cpu: same gathers, same summation order
// (a token's rows in row order; a token's k slots in slot order).

#include "common.cuh"

namespace moeyard::kernels::permute {

// Rows of token t in a row_token list sorted by token (stable): positions
// [lower_bound(t), lower_bound(t + 1)). Used by permute's backward to gather
// per token without atomics.
MOEYARD_HD void token_rows(
    const int64_t* sorted_tokens,
    int64_t n,
    int64_t t,
    int64_t& begin,
    int64_t& end) {
  begin = lower_bound(sorted_tokens, n, t);
  end = lower_bound(sorted_tokens, n, t + 1);
}

#if defined(__CUDACC__)

// rows[i] = x[row_token[i]] (zeros for -1). V is the copy unit: uint4 for
// 16-byte loads when the row size and pointers allow, else the element type.
template <typename V>
__global__ void permute_kernel(
    const V* __restrict__ x,
    const int64_t* __restrict__ row_token,
    int64_t N,
    int64_t T,
    int64_t row_vecs,
    V* __restrict__ rows) {
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const int64_t t = row_token[i];
    MOEYARD_KERNEL_ASSERT(t >= -1 && t < T);
    V* dst = rows + i * row_vecs;
    if (t < 0) {
      for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) {
        dst[j] = V{};
      }
    } else {
      const V* src = x + t * row_vecs;
      for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) {
        dst[j] = src[j];
      }
    }
  }
}

// grad_x[t] = sum of grad_rows over the rows of t, in row order.
// sorted_tokens / sorted_rows: row_token stably sorted by token.
template <typename scalar_t, typename Acc>
__global__ void permute_backward_kernel(
    const scalar_t* __restrict__ grad_rows,
    const int64_t* __restrict__ sorted_tokens,
    const int64_t* __restrict__ sorted_rows,
    int64_t N,
    int64_t T,
    int64_t H,
    scalar_t* __restrict__ grad_x) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    int64_t begin, end;
    token_rows(sorted_tokens, N, t, begin, end);
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      Acc acc = 0;
      for (int64_t j = begin; j < end; ++j) {
        acc += static_cast<Acc>(grad_rows[sorted_rows[j] * H + h]);
      }
      grad_x[t * H + h] = static_cast<scalar_t>(acc);
    }
  }
}

// y[t] = sum_k w[t,k] * rows[slot[t,k]]: one block per token.
template <typename scalar_t, typename W, typename Acc>
__global__ void unpermute_kernel(
    const scalar_t* __restrict__ rows,
    const int64_t* __restrict__ slot,
    const W* __restrict__ weights,
    int64_t T,
    int64_t K,
    int64_t H,
    int64_t N,
    scalar_t* __restrict__ y) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      Acc acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = slot[t * K + k];
        MOEYARD_KERNEL_ASSERT(row >= -1 && row < N);
        if (row >= 0) {
          acc += static_cast<Acc>(weights[t * K + k]) *
                 static_cast<Acc>(rows[row * H + h]);
        }
      }
      y[t * H + h] = static_cast<scalar_t>(acc);
    }
  }
}

// One block per (token, slot) pair: writes the pair's row of grad_rows
// (grad_rows is zeroed first) and the weight's gradient (a block dot).
template <typename scalar_t, typename W, typename Acc, int kThreads>
__global__ void unpermute_backward_kernel(
    const scalar_t* __restrict__ grad_y,
    const scalar_t* __restrict__ rows,
    const int64_t* __restrict__ slot,
    const W* __restrict__ weights,
    int64_t P,
    int64_t K,
    int64_t H,
    int64_t N,
    scalar_t* __restrict__ grad_rows,
    W* __restrict__ grad_weights) {
  __shared__ Acc partial[kThreads];
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    const int64_t row = slot[p];
    MOEYARD_KERNEL_ASSERT(row >= -1 && row < N);
    if (row < 0) {
      if (threadIdx.x == 0) {
        grad_weights[p] = W(0);
      }
      continue;
    }
    const int64_t t = p / K;
    const Acc w = static_cast<Acc>(weights[p]);
    Acc dot = 0;
    for (int64_t h = threadIdx.x; h < H; h += kThreads) {
      const Acc g = static_cast<Acc>(grad_y[t * H + h]);
      dot += g * static_cast<Acc>(rows[row * H + h]);
      grad_rows[row * H + h] = static_cast<scalar_t>(w * g);
    }
    partial[threadIdx.x] = dot;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) {
        partial[threadIdx.x] += partial[threadIdx.x + s];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      grad_weights[p] = static_cast<W>(partial[0]);
    }
    __syncthreads();
  }
}

#endif // __CUDACC__

} // namespace moeyard::kernels::permute
