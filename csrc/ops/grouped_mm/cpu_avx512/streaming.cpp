// The weight-streaming kernel (grouped_mm_kernel.cpp) in AVX-512, built with
// -mavx512* and called only on CPUs that have it (streaming.h). 16-wide
// FMAs and 32 vector registers: 4 x 6 tiles of float32 accumulators; for
// bfloat16 inputs and weights, VDPBF16PS multiplies 32 bf16 pairs into 16
// float32 sums per instruction, so the cores keep up with the memory.
//
// This file includes no ATen or other inline library code: everything it
// defines is its own, so no AVX-512 copy of a shared inline function can
// be picked by the linker for callers on other CPUs.

// GCC 12's AVX-512 headers start some intrinsics from an "undefined"
// register that -Wuninitialized flags where they inline (fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "ops/grouped_mm/cpu/streaming.h"

namespace moeyard::ops::streaming {
namespace {

// A tile's weights arrive 16 floats (or 32 bf16) per step: `next` points
// at the next tile, spread over this tile's steps, `per_step` lines each.
struct Prefetch {
  const char* p = nullptr;
  int64_t lines = 0, per_step = 0;
  void step() {
    for (int64_t i = 0; i < per_step && lines > 0; ++i, --lines, p += 64) {
      _mm_prefetch(p, _MM_HINT_T0);
    }
  }
};

// Masked loads of the last, partial group of k.
inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}
inline __mmask32 tail32(int64_t left) {
  return left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1ull << left) - 1);
}

// 16 weights widened to float32 (masked: zeros past the end).
inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
inline __m512 load16(const uint16_t* p, __mmask16 m, bool bf16) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return bf16 ? _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
              : _mm512_cvtph_ps(h);
}

// out[r, c] = dot(x[r, :], w[c, :]) for an R x C tile, float32 x, w float32
// or (wide16 = 1 bf16, 2 fp16) 16-bit widened; 16 k per step.
template <int R, int C, int wide16, typename WT>
void dot_tile_f32(
    const float* x,
    int64_t K,
    const WT* w,
    float* out,
    int64_t ldo,
    Prefetch& pf) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      acc[r][c] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; k += 16) {
    pf.step();
    const __mmask16 m = tail16(K - k);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) {
      if constexpr (wide16 == 0) {
        wv[c] = load16(w + c * K + k, m);
      } else {
        wv[c] = load16(w + c * K + k, m, wide16 == 1);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * K + k);
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      out[r * ldo + c] = _mm512_reduce_add_ps(acc[r][c]);
    }
  }
}

// The same tile with bfloat16 x and w: 32 k per step, VDPBF16PS.
template <int R, int C>
void dot_tile_bf16(
    const uint16_t* x,
    int64_t K,
    const uint16_t* w,
    float* out,
    int64_t ldo,
    Prefetch& pf) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      acc[r][c] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; k += 32) {
    pf.step();
    const __mmask32 m = tail32(K - k);
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) {
      wv[c] = (__m512bh)_mm512_maskz_loadu_epi16(m, w + c * K + k);
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * K + k);
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      out[r * ldo + c] = _mm512_reduce_add_ps(acc[r][c]);
    }
  }
}

// One C-column tile against all n rows: 4 rows at a time, then 2, then 1.
template <int C, int wide16, typename XT, typename WT>
void column_tile(
    const XT* x,
    int64_t n,
    int64_t K,
    const WT* w,
    float* y,
    int64_t ldy,
    Prefetch& pf) {
  auto tile = [&](auto rows, int64_t r) {
    constexpr int Rn = decltype(rows)::value;
    if constexpr (std::is_same_v<XT, uint16_t>) {
      dot_tile_bf16<Rn, C>(x + r * K, K, w, y + r * ldy, ldy, pf);
    } else {
      dot_tile_f32<Rn, C, wide16>(x + r * K, K, w, y + r * ldy, ldy, pf);
    }
  };
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    tile(std::integral_constant<int, 4>{}, r);
  }
  for (; r + 2 <= n; r += 2) {
    tile(std::integral_constant<int, 2>{}, r);
  }
  if (r < n) {
    tile(std::integral_constant<int, 1>{}, r);
  }
}

// Columns [j0, j1) in tiles of kCols weight rows (the rest one by one),
// each tile prefetching the next over its passes and steps.
constexpr int kCols = 6;

template <int wide16, typename XT, typename WT>
void columns(
    const XT* x,
    int64_t n,
    int64_t K,
    const WT* w,
    float* y,
    int64_t ldy,
    int64_t j0,
    int64_t j1) {
  const int64_t passes = n / 4 + (n % 4) / 2 + n % 2;
  const int64_t per_step = std::is_same_v<XT, uint16_t> ? 32 : 16;
  const int64_t steps = (K + per_step - 1) / per_step;
  const int64_t tile_lines = (kCols * K * int64_t(sizeof(WT)) + 63) / 64;
  int64_t j = j0;
  for (; j + kCols <= j1; j += kCols) {
    const WT* wj = w + j * K;
    Prefetch pf;
    if (j + 2 * kCols <= j1) {
      pf.p = reinterpret_cast<const char*>(wj + kCols * K);
      pf.lines = tile_lines;
      pf.per_step = (tile_lines + passes * steps - 1) / (passes * steps);
    }
    column_tile<kCols, wide16>(x, n, K, wj, y + j, ldy, pf);
  }
  Prefetch none;
  for (; j < j1; ++j) {
    column_tile<1, wide16>(x, n, K, w + j * K, y + j, ldy, none);
  }
}

} // namespace

void columns_avx512(
    const float* x,
    int64_t n,
    int64_t K,
    const float* w,
    float* y,
    int64_t ldy,
    int64_t j0,
    int64_t j1) {
  columns<0>(x, n, K, w, y, ldy, j0, j1);
}

void columns_avx512_widen(
    const float* x,
    int64_t n,
    int64_t K,
    const uint16_t* w,
    bool bf16,
    float* y,
    int64_t ldy,
    int64_t j0,
    int64_t j1) {
  if (bf16) {
    columns<1>(x, n, K, w, y, ldy, j0, j1);
  } else {
    columns<2>(x, n, K, w, y, ldy, j0, j1);
  }
}

void columns_avx512_bf16(
    const uint16_t* x,
    int64_t n,
    int64_t K,
    const uint16_t* w,
    float* y,
    int64_t ldy,
    int64_t j0,
    int64_t j1) {
  columns<0>(x, n, K, w, y, ldy, j0, j1);
}

} // namespace moeyard::ops::streaming
