// torch.ops.moeyard.moe_forward: moe_forward (moe_forward.h) as a
// CompositeImplicitAutograd op, so Python calls the same C++ function and
// torch.compile traces through to the moeyard ops underneath. Its schema,
// its arguments and its outputs are the rows of moe_interface.h:
//   moe_forward(Tensor x, <weights>, Tensor? mask=None,
//               Tensor? token_ids=None, Tensor? drop_lowest=None, *,
//               <options>, bool training=False) -> (Tensor y, <aux losses>,
//               <statistics>, Tensor indices)

#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "model/moe_forward.h"

namespace moeyard {
namespace {

// The op's C++ argument type of each row.
template <typename T>
struct OpArg {
  using arg = T;
};
template <>
struct OpArg<std::string> {
  using arg = c10::string_view;
};
#define MOEYARD_WEIGHT_ARG_required const at::Tensor&
#define MOEYARD_WEIGHT_ARG_optional const std::optional<at::Tensor>&

at::Tensor tensor_of(const at::Tensor& t) {
  return t;
}
at::Tensor tensor_of(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

#define MOEYARD_TENSOR(...) , at::Tensor
using Out = std::tuple<
    at::Tensor MOEYARD_MOE_AUX_LOSSES(MOEYARD_TENSOR)
        MOEYARD_MOE_STATISTICS(MOEYARD_TENSOR),
    at::Tensor>;
#undef MOEYARD_TENSOR

#define MOEYARD_WEIGHT_PARAM(name, required, doc) \
  , MOEYARD_WEIGHT_ARG_##required name
#define MOEYARD_OPTION_PARAM(type, name, def, allowed, doc) \
  , OpArg<type>::arg name
Out moe_forward_op(
    const at::Tensor& x MOEYARD_MOE_WEIGHTS(MOEYARD_WEIGHT_PARAM),
    const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& token_ids,
    const std::optional<at::Tensor>& drop_lowest
        MOEYARD_MOE_OPTIONS(MOEYARD_OPTION_PARAM),
    bool training) {
  MoEWeights w;
#define MOEYARD_SET(name, ...) w.name = tensor_of(name);
  MOEYARD_MOE_WEIGHTS(MOEYARD_SET)
#undef MOEYARD_SET
  MoEOptions o;
#define MOEYARD_SET(type, name, ...) o.name = type(name);
  MOEYARD_MOE_OPTIONS(MOEYARD_SET)
#undef MOEYARD_SET
  o.training = training;
  const auto r = moe_forward(
      x, w, o, tensor_of(mask), tensor_of(token_ids), tensor_of(drop_lowest));
#define MOEYARD_GET(name, ...) , r.name
  return {
      r.y MOEYARD_MOE_AUX_LOSSES(MOEYARD_GET)
          MOEYARD_MOE_STATISTICS(MOEYARD_GET),
      r.indices};
#undef MOEYARD_GET
}
#undef MOEYARD_WEIGHT_PARAM
#undef MOEYARD_OPTION_PARAM

// A default as the schema parser reads it.
std::string schema_default(int64_t v) {
  return std::to_string(v);
}
std::string schema_default(bool v) {
  return v ? "True" : "False";
}
std::string schema_default(const std::string& v) {
  return "\"" + v + "\"";
}
std::string schema_default(double v) {
  // The shortest text that reads back as v, always with a '.' or exponent.
  char buf[32];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) {
      break;
    }
  }
  std::string s = buf;
  if (s.find_first_of(".e") == std::string::npos) {
    s += ".0";
  }
  return s;
}

const char* schema_type(int64_t) {
  return "int";
}
const char* schema_type(bool) {
  return "bool";
}
const char* schema_type(const std::string&) {
  return "str";
}
const char* schema_type(double) {
  return "float";
}

std::string moe_forward_schema() {
  std::string s = "moe_forward(Tensor x";
  // An optional weight takes a default only when no required one follows.
  std::vector<std::pair<std::string, bool>> weights;
#define MOEYARD_ROW(name, required, doc) \
  weights.emplace_back(#name, std::string(#required) == "required");
  MOEYARD_MOE_WEIGHTS(MOEYARD_ROW)
#undef MOEYARD_ROW
  size_t last_required = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    if (weights[i].second) {
      last_required = i;
    }
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& [name, required] = weights[i];
    s += required ? ", Tensor " + name : ", Tensor? " + name;
    s += !required && i > last_required ? "=None" : "";
  }
  s += ", Tensor? mask=None, Tensor? token_ids=None, Tensor? drop_lowest=None, "
       "*";
  const MoEOptions defaults;
#define MOEYARD_ROW(type, name, ...)                                    \
  s += std::string(", ") + schema_type(defaults.name) + " " #name "=" + \
       schema_default(defaults.name);
  MOEYARD_MOE_OPTIONS(MOEYARD_ROW)
#undef MOEYARD_ROW
  s += ", bool training=False) -> (Tensor y";
#define MOEYARD_ROW(name, ...) s += ", Tensor " #name;
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_ROW)
  MOEYARD_MOE_STATISTICS(MOEYARD_ROW)
#undef MOEYARD_ROW
  return s + ", Tensor indices)";
}

} // namespace

TORCH_LIBRARY_FRAGMENT(moeyard, m) {
  m.def(moe_forward_schema().c_str());
}

TORCH_LIBRARY_IMPL(moeyard, CompositeImplicitAutograd, m) {
  m.impl("moe_forward", &moe_forward_op);
}

} // namespace moeyard
