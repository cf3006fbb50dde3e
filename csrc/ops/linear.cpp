#include "ops/linear.h"

#include "ops/grouped_mm/grouped_mm.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/cpu/Utils.h>

namespace moeyard::ops {
namespace {

bool cpu_has(const char* key) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(key);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

} // namespace

bool gemm_in_float32(at::ScalarType dtype, const at::Device& device) {
  if (!device.is_cpu()) {
    return false;
  }
  static const bool native_bf16 = cpu_has("avx512_bf16") || cpu_has("amx_bf16");
  static const bool native_fp16 = cpu_has("avx512_fp16") || cpu_has("amx_fp16");
  return (dtype == at::kBFloat16 && !native_bf16) ||
         (dtype == at::kHalf && !native_fp16);
}

at::Tensor linear(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias) {
  const auto dt = x.scalar_type();
  const int64_t rows =
      x.dim() > 0 && x.size(-1) > 0 ? x.numel() / x.size(-1) : 0;
  const bool no_grad = !at::GradMode::is_enabled() ||
                       (!x.requires_grad() && !weight.requires_grad());
  if (x.device().is_cpu() && no_grad && rows > 0 && rows <= kStreamingRows &&
      weight.dim() == 2 && weight.scalar_type() == dt &&
      (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf)) {
    // A few rows (decoding): grouped_mm's weight-streaming kernel, one group.
    auto y = grouped_mm(
        x.reshape({rows, x.size(-1)}),
        weight.unsqueeze(0),
        at::tensor({int64_t(0), rows}, at::kLong));
    if (bias && bias->defined()) {
      y = y + bias->to(dt);
    }
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return y.view(shape);
  }
  if (!gemm_in_float32(dt, x.device()) || weight.scalar_type() != dt) {
    return at::linear(x, weight, bias);
  }
  std::optional<at::Tensor> b;
  if (bias && bias->defined()) {
    b = bias->to(at::kFloat);
  }
  return at::linear(x.to(at::kFloat), weight.to(at::kFloat), b).to(dt);
}

} // namespace moeyard::ops
