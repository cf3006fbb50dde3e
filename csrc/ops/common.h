#pragma once
// Argument checks shared by every op. Each error names the op, the argument,
// the value received and what was expected.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace moeyard::ops::detail {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 ||
         t == at::kHalf;
}

inline void check_defined(
    const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " must be a defined tensor");
}

inline void check_float(const at::Tensor& t, const char* op, const char* arg) {
  check_defined(t, op, arg);
  TORCH_CHECK(
      is_float_dtype(t.scalar_type()),
      op,
      ": ",
      arg,
      " must be float32, float64, bfloat16 or float16, got ",
      t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* op, const char* arg) {
  check_defined(t, op, arg);
  TORCH_CHECK(
      t.scalar_type() == at::kLong,
      op,
      ": ",
      arg,
      " must be int64, got ",
      t.scalar_type());
}

inline void check_dim(
    const at::Tensor& t,
    int64_t dim,
    const char* op,
    const char* arg,
    const char* shape) {
  TORCH_CHECK(
      t.dim() == dim,
      op,
      ": ",
      arg,
      " must be ",
      dim,
      "-D ",
      shape,
      ", got shape ",
      t.sizes());
}

// A gradient (or other tensor) whose shape follows from the other arguments:
// 2-D [rows, cols].
inline void check_shape_2d(
    const at::Tensor& t,
    const c10::SymInt& rows,
    const c10::SymInt& cols,
    const char* op,
    const char* arg) {
  TORCH_CHECK(
      t.dim() == 2 && t.sym_size(0) == rows && t.sym_size(1) == cols,
      op,
      ": ",
      arg,
      " must have shape [",
      rows,
      ", ",
      cols,
      "], got ",
      t.sym_sizes());
}

inline void check_same_device(
    const at::Tensor& a,
    const at::Tensor& b,
    const char* op,
    const char* arg_a,
    const char* arg_b) {
  TORCH_CHECK(
      a.device() == b.device(),
      op,
      ": ",
      arg_a,
      " and ",
      arg_b,
      " must be on the same device, got ",
      a.device(),
      " and ",
      b.device());
}

inline void check_same_dtype(
    const at::Tensor& a,
    const at::Tensor& b,
    const char* op,
    const char* arg_a,
    const char* arg_b) {
  TORCH_CHECK(
      a.scalar_type() == b.scalar_type(),
      op,
      ": ",
      arg_a,
      " and ",
      arg_b,
      " must have the same dtype, got ",
      a.scalar_type(),
      " and ",
      b.scalar_type());
}

// "softmax" -> false, "sigmoid" -> true; anything else is an error.
inline bool parse_score_fn(c10::string_view s, const char* op) {
  if (s == "softmax") {
    return false;
  }
  TORCH_CHECK(
      s == "sigmoid",
      op,
      ": score_fn must be 'softmax' or 'sigmoid', got '",
      std::string(s),
      "'");
  return true;
}

// "position" -> false, "probs" -> true; anything else is an error.
inline bool parse_drop_policy(c10::string_view s, const char* op) {
  if (s == "position") {
    return false;
  }
  TORCH_CHECK(
      s == "probs",
      op,
      ": drop_policy must be 'position' or 'probs', got '",
      std::string(s),
      "'");
  return true;
}

} // namespace moeyard::ops::detail
