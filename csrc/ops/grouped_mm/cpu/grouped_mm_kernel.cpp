// grouped_mm on the CPU: one BLAS GEMM per expert on views of the rows
// (the BLAS call is itself multi-threaded), written straight into the output.
// Experts with few rows (decoding) take a weight-streaming kernel instead:
// BLAS packs the weight matrix before a GEMM, which for a handful of rows
// costs more than the product; reading each weight row once from memory and
// dotting it with the (cache-resident) input rows is memory-bound instead.

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

#include <vector>

#include "ops/grouped_mm/grouped_mm_checks.h"

namespace moeyard::ops {
namespace {

std::vector<int64_t> read_offsets(
    const at::Tensor& offsets, int64_t N, const char* op) {
  const auto o = offsets.contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + o.numel());
  detail::check_grouped_mm_offsets(v.data(), v.size(), N, op);
  return v;
}

// Experts with at most this many rows use the streaming kernel (float32).
constexpr int64_t kSkinnyRows = 16;

// out[r, j] = dot(x[r, :], w[j, :]) for R rows and one weight row j.
template <int R>
void dot_rows(
    const float* x, int64_t K, const float* w, float* out, int64_t ldo) {
  using Vec = at::vec::Vectorized<float>;
  Vec acc[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = Vec(0.f);
  }
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) {
    const Vec wv = Vec::loadu(w + k);
    for (int r = 0; r < R; ++r) {
      acc[r] = at::vec::fmadd(Vec::loadu(x + r * K + k), wv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = at::vec::vec_reduce_all<float>(
        [](const Vec& a, const Vec& b) { return a + b; }, acc[r]);
    for (int64_t kk = k; kk < K; ++kk) {
      s += x[r * K + kk] * w[kk];
    }
    out[r * ldo] = s;
  }
}

// y [n, Dout] = x [n, K] w^T for n <= kSkinnyRows, parallel over Dout.
void skinny_mm(const at::Tensor& x, const at::Tensor& w, at::Tensor y) {
  const int64_t n = x.size(0), K = x.size(1), Dout = w.size(0);
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, Dout, 32, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* wj = wp + j * K;
      for (int64_t r = 0; r < n; r += 8) {
        const float* xr = xp + r * K;
        float* yr = yp + r * Dout + j;
        switch (std::min<int64_t>(8, n - r)) {
          case 8:
            dot_rows<8>(xr, K, wj, yr, Dout);
            break;
          case 7:
            dot_rows<7>(xr, K, wj, yr, Dout);
            break;
          case 6:
            dot_rows<6>(xr, K, wj, yr, Dout);
            break;
          case 5:
            dot_rows<5>(xr, K, wj, yr, Dout);
            break;
          case 4:
            dot_rows<4>(xr, K, wj, yr, Dout);
            break;
          case 3:
            dot_rows<3>(xr, K, wj, yr, Dout);
            break;
          case 2:
            dot_rows<2>(xr, K, wj, yr, Dout);
            break;
          default:
            dot_rows<1>(xr, K, wj, yr, Dout);
            break;
        }
      }
    }
  });
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
  const bool covers_all = off.front() == 0 && off.back() == N;
  auto out = covers_all ? at::empty({N, Dout}, input.options())
                        : at::zeros({N, Dout}, input.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) {
      continue;
    }
    auto o = out.narrow(0, off[e], n);
    if (n <= kSkinnyRows && input.scalar_type() == at::kFloat &&
        !at::in_parallel_region()) {
      skinny_mm(input.narrow(0, off[e], n), weight[e], o);
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
  detail::check_grouped_mm_args(input_in, weight_in, expert_offsets, op);
  const auto input = input_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t N = input.size(0), E = weight.size(0), Dout = weight.size(1);
  TORCH_CHECK(
      grad_out_in.dim() == 2 && grad_out_in.size(0) == N &&
          grad_out_in.size(1) == Dout,
      op,
      ": grad_out must have shape [",
      N,
      ", ",
      Dout,
      "], got ",
      grad_out_in.sizes());
  const auto grad_out = grad_out_in.to(input.scalar_type()).contiguous();
  const auto off = read_offsets(expert_offsets, N, op);
  auto grad_input = at::zeros_like(input, at::MemoryFormat::Contiguous);
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
