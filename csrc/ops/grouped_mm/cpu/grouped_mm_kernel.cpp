// grouped_mm on the CPU: one BLAS GEMM per expert on views of the rows
// (the BLAS call is itself multi-threaded), written straight into the output.
// Experts with few rows (decoding) take a weight-streaming kernel instead:
// BLAS packs the weight matrix before a GEMM, which for a handful of rows
// costs more than the product; this kernel reads each weight row once from
// memory and dots it with the (cache-resident) input rows, in register tiles.

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "ops/grouped_mm/cpu/streaming.h"
#include "ops/grouped_mm/grouped_mm.h"
#include "ops/grouped_mm/grouped_mm_checks.h"
#include "ops/linear.h"

namespace moeyard::ops {

namespace streaming {
namespace {
Isa best_isa() {
  Isa isa = Isa::kDefault;
#if defined(CPU_CAPABILITY_AVX2)
  isa = Isa::kAvx2;
#endif
#if defined(MOEYARD_CPU_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    isa = Isa::kAvx512;
    if (__builtin_cpu_supports("avx512bf16")) {
      isa = Isa::kAvx512Bf16;
    }
  }
#endif
  return isa;
}
} // namespace

Isa cpu_isa() {
  static const Isa isa = [] {
    const Isa best = best_isa();
    const char* env = std::getenv("MOEYARD_CPU_CAPABILITY");
    if (env == nullptr || *env == '\0') {
      return best;
    }
    const std::string v = env;
    const Isa asked = v == "default"       ? Isa::kDefault
                      : v == "avx2"        ? Isa::kAvx2
                      : v == "avx512"      ? Isa::kAvx512
                      : v == "avx512_bf16" ? Isa::kAvx512Bf16
                                           : Isa(-1);
    TORCH_CHECK(
        asked != Isa(-1),
        "MOEYARD_CPU_CAPABILITY = '",
        v,
        "': expected default, avx2, avx512 or avx512_bf16");
    return std::min(asked, best);
  }();
  return isa;
}
} // namespace streaming

namespace {

std::vector<int64_t> read_offsets(
    const at::Tensor& offsets, int64_t N, const char* op) {
  const auto o = offsets.contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + o.numel());
  detail::check_grouped_mm_offsets(v.data(), v.size(), N, op);
  return v;
}

#if defined(CPU_CAPABILITY_AVX2)
// 8 weights as float32: loaded as is, or widened from bfloat16 (the high
// half of a float32) or float16 (F16C).
inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// Prefetches `lines` cache lines from `p` into L1, `per_step` of them each
// time step() is called: spreads the reads of the next weight tile over the
// work on this one, so that memory streams while the cores compute.
struct Prefetcher {
  const char* p = nullptr;
  int64_t lines = 0, per_step = 0;
  void step() {
#if defined(CPU_CAPABILITY_AVX2)
    for (int64_t i = 0; i < per_step && lines > 0; ++i, --lines, p += 64) {
      _mm_prefetch(p, _MM_HINT_T0);
    }
#endif
  }
};

// out[r, c] = dot(x[r, :], w[c, :]) for an R x C tile: R input rows (from
// cache) against C weight rows (streamed once from memory, float32 or
// widened from bf16/fp16), R * C float32 vector accumulators; `pf` runs
// one step per 8 columns.
template <int R, int C, typename WT>
void dot_tile(
    const float* x,
    int64_t K,
    const WT* w,
    float* out,
    int64_t ldo,
    Prefetcher& pf) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (true) { // raw AVX2: keeps all R * C accumulators in registers
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm256_setzero_ps();
      }
    }
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      pf.step();
      __m256 wv[C];
      for (int c = 0; c < C; ++c) {
        wv[c] = load8(w + c * K + k);
      }
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * K + k);
        for (int c = 0; c < C; ++c) {
          acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) {
        __m128 v = _mm_add_ps(
            _mm256_castps256_ps128(acc[r][c]),
            _mm256_extractf128_ps(acc[r][c], 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
        float s = _mm_cvtss_f32(v);
        for (int64_t kk = k; kk < K; ++kk) {
          s += x[r * K + kk] * static_cast<float>(w[c * K + kk]);
        }
        out[r * ldo + c] = s;
      }
    }
    return;
  }
#endif
  using Vec = at::vec::Vectorized<float>;
  Vec acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      acc[r][c] = Vec(0.f);
    }
  }
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) {
      if constexpr (std::is_same_v<WT, float>) {
        wv[c] = Vec::loadu(w + c * K + k);
      } else {
        float buf[Vec::size()];
        for (int64_t i = 0; i < Vec::size(); ++i) {
          buf[i] = static_cast<float>(w[c * K + k + i]);
        }
        wv[c] = Vec::loadu(buf);
      }
    }
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x + r * K + k);
      for (int c = 0; c < C; ++c) {
        acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float s = at::vec::vec_reduce_all<float>(
          [](const Vec& a, const Vec& b) { return a + b; }, acc[r][c]);
      for (int64_t kk = k; kk < K; ++kk) {
        s += x[r * K + kk] * static_cast<float>(w[c * K + kk]);
      }
      out[r * ldo + c] = s;
    }
  }
}

// One column tile of C weight rows against every input row: R = 4 rows at
// a time where there are 4 (12 accumulators: the FMA units stay busy), else
// 2, then 1; the next tile is prefetched meanwhile.
template <int C, typename WT>
void column_tile(
    const float* x,
    int64_t n,
    int64_t K,
    const WT* w,
    float* y,
    int64_t ldy,
    Prefetcher& pf) {
  int64_t r = 0; // passes: row_passes<C>(n)
  if constexpr (C == 3) {
    for (; r + 4 <= n; r += 4) {
      dot_tile<4, C>(x + r * K, K, w, y + r * ldy, ldy, pf);
    }
  }
  for (; r + 2 <= n; r += 2) {
    dot_tile<2, C>(x + r * K, K, w, y + r * ldy, ldy, pf);
  }
  if (r < n) {
    dot_tile<1, C>(x + r * K, K, w, y + r * ldy, ldy, pf);
  }
}

// How many dot_tile passes column_tile<C> makes over n rows.
template <int C>
int64_t row_passes(int64_t n) {
  return C == 3 ? n / 4 + (n % 4) / 2 + n % 2 : (n + 1) / 2;
}

// Columns [j0, j1) of y in tiles of C weight rows (the rest one by one),
// each tile prefetching the next over its passes.
template <int C, typename WT>
void skinny_columns(
    const float* xp,
    int64_t n,
    int64_t K,
    const WT* wp,
    float* yp,
    int64_t Dout,
    int64_t j0,
    int64_t j1) {
  const int64_t passes = row_passes<C>(n);
  const int64_t steps = std::max<int64_t>(K / 8, 1);
  const int64_t tile_lines = (C * K * int64_t(sizeof(WT)) + 63) / 64;
  int64_t j = j0;
  for (; j + C <= j1; j += C) {
    const WT* wj = wp + j * K;
    Prefetcher pf;
    if (j + 2 * C <= j1) { // the next tile, spread over this tile's passes
      pf.p = reinterpret_cast<const char*>(wj + C * K);
      pf.lines = tile_lines;
      pf.per_step = (tile_lines + passes * steps - 1) / (passes * steps);
    }
    column_tile<C>(xp, n, K, wj, yp + j, Dout, pf);
  }
  Prefetcher none;
  for (; j < j1; ++j) {
    column_tile<1>(xp, n, K, wp + j * K, yp + j, Dout, none);
  }
}

// y [n, Dout] = x [n, K] w^T for n <= kStreamingRows, parallel over Dout:
// tiles of weight rows x input rows held in registers, so each weight row
// is read from memory once and each input row from cache once per tile.
// While the passes over one tile compute, the next tile is prefetched (each
// weight row of a typical expert is its own 4 KiB page, where the hardware
// prefetcher alone starts over). x and y are float32; w float32, bfloat16
// or float16 (widened as it streams in).
template <typename WT>
void skinny_mm(const at::Tensor& x, const at::Tensor& w, at::Tensor y) {
  const int64_t n = x.size(0), K = x.size(1), Dout = w.size(0);
  const float* xp = x.const_data_ptr<float>();
  const WT* wp = w.const_data_ptr<WT>();
  float* yp = y.data_ptr<float>();
#if defined(MOEYARD_CPU_AVX512)
  if (streaming::cpu_isa() >= streaming::Isa::kAvx512) {
    at::parallel_for(0, Dout, 48, [&](int64_t j0, int64_t j1) {
      if constexpr (std::is_same_v<WT, float>) {
        streaming::columns_avx512(xp, n, K, wp, yp, Dout, j0, j1);
      } else {
        streaming::columns_avx512_widen(
            xp,
            n,
            K,
            reinterpret_cast<const uint16_t*>(wp),
            std::is_same_v<WT, c10::BFloat16>,
            yp,
            Dout,
            j0,
            j1);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, Dout, 48, [&](int64_t j0, int64_t j1) {
    if (n >= 4) { // 4 x 3 tiles
      skinny_columns<3>(xp, n, K, wp, yp, Dout, j0, j1);
    } else { // 2 x 4 tiles
      skinny_columns<4>(xp, n, K, wp, yp, Dout, j0, j1);
    }
  });
}

// skinny_mm for bfloat16 x and w on CPUs with AVX512_BF16: VDPBF16PS
// multiplies bf16 pairs exactly and sums in float32; y is rounded to
// bfloat16 once, as on the widening path.
void skinny_mm_bf16(const at::Tensor& x, const at::Tensor& w, at::Tensor y) {
#if defined(MOEYARD_CPU_AVX512)
  const int64_t n = x.size(0), K = x.size(1), Dout = w.size(0);
  auto y32 = at::empty({n, Dout}, x.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.const_data_ptr());
  float* yp = y32.data_ptr<float>();
  at::parallel_for(0, Dout, 48, [&](int64_t j0, int64_t j1) {
    streaming::columns_avx512_bf16(xp, n, K, wp, yp, Dout, j0, j1);
  });
  y.copy_(y32);
#else
  TORCH_CHECK(false, "grouped_mm: built without the AVX-512 kernels");
#endif
}

at::Tensor grouped_mm_cpu(
    const at::Tensor& input_in,
    const at::Tensor& weight_in,
    const at::Tensor& expert_offsets) {
  detail::check_grouped_mm_args(
      input_in, weight_in, expert_offsets, "grouped_mm");
  const auto input = input_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t N = input.size(0), E = weight.size(0), Dout = weight.size(1);
  const auto off = read_offsets(expert_offsets, N, "grouped_mm");
  // The experts' rows are written below; only the padding outside their
  // span (null picks, unfilled capacity) is zeroed.
  auto out = at::empty({N, Dout}, input.options());
  out.narrow(0, 0, off.front()).zero_();
  out.narrow(0, off.back(), N - off.back()).zero_();
  const bool via_f32 = gemm_in_float32(input.scalar_type(), input.device());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) {
      continue;
    }
    auto o = out.narrow(0, off[e], n);
    const bool skinny = n <= kStreamingRows && !at::in_parallel_region();
    const bool half = input.scalar_type() == at::kBFloat16 ||
                      input.scalar_type() == at::kHalf;
    if (half && skinny) { // stream the bf16/fp16 weights, widen in place
      if (input.scalar_type() == at::kBFloat16 &&
          streaming::cpu_isa() == streaming::Isa::kAvx512Bf16) {
        skinny_mm_bf16(input.narrow(0, off[e], n), weight[e], o);
        continue;
      }
      const auto x32 = input.narrow(0, off[e], n).to(at::kFloat).contiguous();
      auto y32 = at::empty({n, Dout}, x32.options());
      if (input.scalar_type() == at::kBFloat16) {
        skinny_mm<c10::BFloat16>(x32, weight[e], y32);
      } else {
        skinny_mm<c10::Half>(x32, weight[e], y32);
      }
      o.copy_(y32);
      continue;
    }
    if (via_f32) { // no bf16/fp16 GEMM unit: float32 products, one rounding
      o.copy_(at::mm(
          input.narrow(0, off[e], n).to(at::kFloat),
          weight[e].to(at::kFloat).t()));
      continue;
    }
    if (skinny && input.scalar_type() == at::kFloat) {
      skinny_mm<float>(input.narrow(0, off[e], n), weight[e], o);
    } else {
      at::mm_out(o, input.narrow(0, off[e], n), weight[e].t());
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(
    const at::Tensor& grad_out_in,
    const at::Tensor& input_in,
    const at::Tensor& weight_in,
    const at::Tensor& expert_offsets) {
  constexpr const char* op = "grouped_mm_backward";
  detail::check_grouped_mm_backward_args(
      grad_out_in, input_in, weight_in, expert_offsets);
  const auto input = input_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t N = input.size(0), E = weight.size(0);
  const auto grad_out = grad_out_in.to(input.scalar_type()).contiguous();
  const auto off = read_offsets(expert_offsets, N, op);
  const bool via_f32 = gemm_in_float32(input.scalar_type(), input.device());
  // Only rows outside the experts' span (padding) need zeros: filling the
  // whole [N, Din] gradient first costs as much as a GEMM's epilogue.
  auto grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
  grad_input.narrow(0, 0, off.front()).zero_();
  grad_input.narrow(0, off.back(), N - off.back()).zero_();
  auto grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    auto gw = grad_weight[e];
    if (n == 0) {
      gw.zero_();
      continue;
    }
    const auto go = grad_out.narrow(0, off[e], n);
    auto gi = grad_input.narrow(0, off[e], n);
    if (via_f32) {
      const auto go32 = go.to(at::kFloat);
      gi.copy_(at::mm(go32, weight[e].to(at::kFloat)));
      gw.copy_(at::mm(go32.t(), input.narrow(0, off[e], n).to(at::kFloat)));
      continue;
    }
    at::mm_out(gi, go, weight[e]);
    at::mm_out(gw, go.t(), input.narrow(0, off[e], n));
  }
  return {grad_input, grad_weight};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cpu);
}

} // namespace moeyard::ops
