#include "train/routing_metrics.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

namespace moeyard::train {
namespace {

// The scalars after the vector blocks of a row: n, the aux losses, the
// `mean` statistics.
int64_t scalar_sums() {
  int64_t k = 1;
#define MOEYARD_COUNT(name, ...) ++k;
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_COUNT)
#undef MOEYARD_COUNT
#define MOEYARD_COUNT(name, combine, length, doc) \
  k += std::string(#combine) == "mean";
  MOEYARD_MOE_STATISTICS(MOEYARD_COUNT)
#undef MOEYARD_COUNT
  return k;
}

} // namespace

at::Tensor routing_sums(const MoEOutput& m) {
  const auto d = [](const at::Tensor& t) { return t.detach().to(at::kDouble); };
  const auto n = d(m.valid_tokens);
  std::vector<at::Tensor> blocks, scalars = {n};
#define MOEYARD_SUM(name, combine, length, doc) \
  if (std::string(#combine) == "sum") {         \
    blocks.push_back(d(m.name));                \
  }
  MOEYARD_MOE_STATISTICS(MOEYARD_SUM)
#undef MOEYARD_SUM
  blocks.push_back(d(m.importance));
#define MOEYARD_SUM(name, ...) scalars.push_back(d(m.name) * n);
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_SUM)
#undef MOEYARD_SUM
#define MOEYARD_SUM(name, combine, length, doc) \
  if (std::string(#combine) == "mean") {        \
    scalars.push_back(d(m.name) * n);           \
  }
  MOEYARD_MOE_STATISTICS(MOEYARD_SUM)
#undef MOEYARD_SUM
  blocks.push_back(at::stack(scalars));
  return at::cat(blocks);
}

nlohmann::json routing_record(
    const at::Tensor& row,
    int64_t layer,
    const MoEOptions& o,
    int64_t num_experts) {
  const auto r = row.contiguous();
  const int64_t E = num_experts, Z = o.null_experts;
  nlohmann::json rec = {{"layer", layer}, {"top_k", o.top_k}};
  // The `sum` statistics' counts, then the importance (E + Z).
  int64_t at = 0;
  const auto block = [&](int64_t length) {
    TORCH_CHECK(at + length <= r.numel(), "routing_record: a row is too short");
    const auto b = r.narrow(0, at, length);
    at += length;
    return b;
  };
  at::Tensor counts; // tokens_per_expert
#define MOEYARD_BLOCK(name, combine, length, doc)                            \
  if (std::string(#combine) == "sum") {                                      \
    const auto b = block(length);                                            \
    rec[#name] = std::vector<double>(                                        \
        b.const_data_ptr<double>(), b.const_data_ptr<double>() + b.numel()); \
    if (std::string(#name) == "tokens_per_expert") {                         \
      counts = b;                                                            \
    }                                                                        \
  }
  MOEYARD_MOE_STATISTICS(MOEYARD_BLOCK)
#undef MOEYARD_BLOCK
  const auto importance = block(E + Z);
  TORCH_CHECK(
      at + scalar_sums() == r.numel(),
      "routing_record: a row of ",
      r.numel(),
      " sums does not fit ",
      E,
      " + ",
      Z,
      " experts");
  const double* s = r.const_data_ptr<double>() + at;
  const double n = s[0], nz = std::max(n, 1.0);
  rec["tokens"] = n;
  int64_t k = 1;
#define MOEYARD_MEAN(name, ...) rec[#name] = s[k++] / nz;
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_MEAN)
#undef MOEYARD_MEAN
#define MOEYARD_MEAN(name, combine, length, doc) \
  if (std::string(#combine) == "mean") {         \
    rec[#name] = s[k++] / nz;                    \
  }
  MOEYARD_MOE_STATISTICS(MOEYARD_MEAN)
#undef MOEYARD_MEAN
  // The step's switch loss from its counts and probabilities (a mean of
  // the micro-batches' losses is not the loss of their union); per
  // sequence the mean over sequences is the loss.
  if (!(o.switch_per_sequence && o.routing != "expert_choice")) {
    rec["switch_loss"] =
        switch_loss_of(counts / (nz * o.top_k), importance / nz, o)
            .item<double>();
  }
  // Over the real experts: those no token picked, and the most loaded
  // one's excess over the mean load (MaxVio).
  const auto real = counts.narrow(0, 0, E);
  rec["dead_experts"] = (real == 0).sum().item<int64_t>();
  const double mean_load = real.mean().item<double>();
  rec["max_violation"] =
      mean_load > 0 ? real.max().item<double>() / mean_load - 1.0 : 0.0;
  if (o.capacity_factor > 0) {
    rec["capacity_factor"] = o.capacity_factor;
  }
  return rec;
}

double mean_real_experts_per_token(const nlohmann::json& moe_layers) {
  double k = 0;
  for (const auto& layer : moe_layers) {
    k += layer.at("real_experts_per_token").get<double>();
  }
  return moe_layers.empty() ? 0.0 : k / static_cast<double>(moe_layers.size());
}

} // namespace moeyard::train
