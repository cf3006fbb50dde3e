// grouped_mm on CUDA through cuBLAS: one cublasGemmGroupedBatchedEx call for
// all non-empty experts (fp32 / bf16 / fp16, fp32 accumulation), per-expert
// GEMMs through ATen for float64. The expert offsets are read on the host
// (one small device-to-host copy, a host sync): cuBLAS takes the GEMM sizes
// from host arrays. docs/ops.md, "Host synchronization", lists this sync and
// what removing it would take.

#include <ATen/cuda/CUDABlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <vector>

#include "ops/cuda_utils.h"
#include "ops/grouped_mm/grouped_mm_checks.h"

namespace moeyard::ops {
namespace {

// One column-major GEMM C = op(A) op(B) (m x n, inner k).
struct Gemm {
  cublasOperation_t ta, tb;
  int m, n, k;
  const void* a;
  int lda;
  const void* b;
  int ldb;
  void* c;
  int ldc;
};

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CUDA_R_32F;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK(false, "grouped_mm: no cuBLAS grouped GEMM for ", t);
  }
}

void run_grouped(const std::vector<Gemm>& gemms, const at::Tensor& like) {
  const int G = static_cast<int>(gemms.size());
  if (G == 0) {
    return;
  }
  std::vector<cublasOperation_t> ta(G), tb(G);
  std::vector<int> m(G), n(G), k(G), lda(G), ldb(G), ldc(G), size(G, 1);
  std::vector<float> alpha(G, 1.f), beta(G, 0.f);
  auto host_ptrs = at::empty(
      {3 * G}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  auto* p = reinterpret_cast<const void**>(host_ptrs.data_ptr<int64_t>());
  for (int i = 0; i < G; ++i) {
    const Gemm& g = gemms[i];
    ta[i] = g.ta;
    tb[i] = g.tb;
    m[i] = g.m;
    n[i] = g.n;
    k[i] = g.k;
    lda[i] = g.lda;
    ldb[i] = g.ldb;
    ldc[i] = g.ldc;
    p[i] = g.a;
    p[G + i] = g.b;
    p[2 * G + i] = g.c;
  }
  auto dev_ptrs = host_ptrs.to(like.device(), /*non_blocking=*/true);
  auto** d = reinterpret_cast<void**>(dev_ptrs.data_ptr<int64_t>());
  const cudaDataType_t type = cuda_type(like.scalar_type());
  TORCH_CUDABLAS_CHECK(cublasGemmGroupedBatchedEx(
      at::cuda::getCurrentCUDABlasHandle(),
      ta.data(),
      tb.data(),
      m.data(),
      n.data(),
      k.data(),
      alpha.data(),
      const_cast<const void* const*>(d),
      type,
      lda.data(),
      const_cast<const void* const*>(d + G),
      type,
      ldb.data(),
      beta.data(),
      d + 2 * G,
      type,
      ldc.data(),
      G,
      size.data(),
      CUBLAS_COMPUTE_32F));
}

std::vector<int64_t> host_offsets(const at::Tensor& offsets, int64_t N) {
  const auto o = offsets.to(at::kCPU).contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + o.numel());
  detail::check_grouped_mm_offsets(v.data(), v.size(), N, "grouped_mm");
  return v;
}

char* row_ptr(const at::Tensor& t, int64_t row) {
  return static_cast<char*>(const_cast<void*>(t.const_data_ptr())) +
         row * t.stride(0) * t.element_size();
}

at::Tensor grouped_mm_cuda(
    const at::Tensor& input_in,
    const at::Tensor& weight_in,
    const at::Tensor& expert_offsets) {
  detail::check_grouped_mm_args(
      input_in, weight_in, expert_offsets, "grouped_mm");
  detail::check_cuda(input_in, "grouped_mm", "input");
  c10::cuda::CUDAGuard guard(input_in.device());
  const auto input = input_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t N = input.size(0), E = weight.size(0);
  const int64_t Dout = weight.size(1), Din = weight.size(2);
  const auto off = host_offsets(expert_offsets, N);
  // The experts' rows are written below; only the padding outside their
  // span (null picks, unfilled capacity) is zeroed.
  auto out = at::empty({N, Dout}, input.options());
  out.narrow(0, 0, off.front()).zero_();
  out.narrow(0, off.back(), N - off.back()).zero_();
  std::vector<Gemm> gemms;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0 || Dout == 0) {
      continue;
    }
    if (input.scalar_type() == at::kDouble || Din == 0) {
      auto o = out.narrow(0, off[e], n);
      at::mm_out(o, input.narrow(0, off[e], n), weight[e].t());
      continue;
    }
    // out^T [Dout, n] = W[e] [Dout, Din] . in^T [Din, n]  (column-major)
    gemms.push_back(
        {CUBLAS_OP_T,
         CUBLAS_OP_N,
         int(Dout),
         int(n),
         int(Din),
         row_ptr(weight, e * Dout),
         int(Din),
         row_ptr(input, off[e]),
         int(Din),
         row_ptr(out, off[e]),
         int(Dout)});
  }
  run_grouped(gemms, input);
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cuda(
    const at::Tensor& grad_out_in,
    const at::Tensor& input_in,
    const at::Tensor& weight_in,
    const at::Tensor& expert_offsets) {
  constexpr const char* op = "grouped_mm_backward";
  detail::check_grouped_mm_backward_args(
      grad_out_in, input_in, weight_in, expert_offsets);
  detail::check_cuda(input_in, op, "input");
  c10::cuda::CUDAGuard guard(input_in.device());
  const auto input = input_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t N = input.size(0), E = weight.size(0);
  const int64_t Dout = weight.size(1), Din = weight.size(2);
  const auto grad_out = grad_out_in.to(input.scalar_type()).contiguous();
  const auto off = host_offsets(expert_offsets, N);
  auto grad_input = at::zeros_like(input, at::MemoryFormat::Contiguous);
  auto grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  std::vector<Gemm> gemms;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0 || Dout == 0 || Din == 0) {
      continue;
    }
    if (input.scalar_type() == at::kDouble) {
      const auto go = grad_out.narrow(0, off[e], n);
      auto gi = grad_input.narrow(0, off[e], n);
      auto gw = grad_weight[e];
      at::mm_out(gi, go, weight[e]);
      at::mm_out(gw, go.t(), input.narrow(0, off[e], n));
      continue;
    }
    // grad_in^T [Din, n] = W[e]^T [Din, Dout] . grad_out^T [Dout, n]
    gemms.push_back(
        {CUBLAS_OP_N,
         CUBLAS_OP_N,
         int(Din),
         int(n),
         int(Dout),
         row_ptr(weight, e * Dout),
         int(Din),
         row_ptr(grad_out, off[e]),
         int(Dout),
         row_ptr(grad_input, off[e]),
         int(Din)});
    // grad_W^T [Din, Dout] = in^T [Din, n] . grad_out [n, Dout]
    gemms.push_back(
        {CUBLAS_OP_N,
         CUBLAS_OP_T,
         int(Din),
         int(Dout),
         int(n),
         row_ptr(input, off[e]),
         int(Din),
         row_ptr(grad_out, off[e]),
         int(Dout),
         row_ptr(grad_weight, e * Dout),
         int(Din)});
  }
  run_grouped(gemms, input);
  return {grad_input, grad_weight};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cuda);
}

} // namespace moeyard::ops
