#include "io/hf/tensor_names.h"

#include <ATen/ATen.h>

namespace moeyard::io::hf {

const TensorRule* rule_of(
    const HfFamily& fam, const std::string& name, int64_t* layer) {
  std::string key = name;
  *layer = -1;
  if (name.rfind("layers.", 0) == 0) {
    const auto dot = name.find('.', 7);
    *layer = std::stoll(name.substr(7, dot - 7));
    key = "{layer}" + name.substr(dot);
  }
  for (const auto& rule : fam.tensors) {
    if (rule.ours == key) {
      return &rule;
    }
  }
  return nullptr;
}

void replace_all(std::string& s, const std::string& key, const std::string& v) {
  for (size_t p = s.find(key); p != std::string::npos; p = s.find(key, p)) {
    s.replace(p, key.size(), v);
    p += v.size();
  }
}

std::string Place::name(std::string tmpl, int64_t e) const {
  replace_all(tmpl, "{moe}", "{layer}." + moe_block);
  replace_all(tmpl, "{layer}", "model.layers." + std::to_string(layer));
  if (e >= 0) {
    replace_all(tmpl, "{e}", std::to_string(e));
  }
  return tmpl;
}

bool per_expert(const TensorRule& rule) {
  return rule.theirs[0].find("{e}") != std::string::npos;
}

at::Tensor interleave(const at::Tensor& t, int64_t dim) {
  const int64_t d = at::maybe_wrap_dim(dim, t.dim());
  const int64_t half = t.size(d) / 2;
  return at::stack({t.narrow(d, 0, half), t.narrow(d, half, half)}, d + 1)
      .flatten(d, d + 1);
}

at::Tensor deinterleave(const at::Tensor& t, int64_t dim) {
  const int64_t d = at::maybe_wrap_dim(dim, t.dim());
  return at::cat(
      {t.slice(d, 0, c10::nullopt, 2), t.slice(d, 1, c10::nullopt, 2)}, d);
}

} // namespace moeyard::io::hf
