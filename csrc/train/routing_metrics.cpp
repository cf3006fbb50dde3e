#include "train/routing_metrics.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

namespace moeyard::train {
namespace {

// The scalars after the two [E] blocks of a row: n, the aux losses, the
// `mean` statistics.
int64_t scalar_sums() {
  int64_t k = 1;
#define MOEYARD_COUNT(name, ...) ++k;
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_COUNT)
#undef MOEYARD_COUNT
#define MOEYARD_COUNT(name, combine, doc) k += std::string(#combine) == "mean";
  MOEYARD_MOE_STATISTICS(MOEYARD_COUNT)
#undef MOEYARD_COUNT
  return k;
}

} // namespace

at::Tensor routing_sums(const MoEOutput& m) {
  const auto d = [](const at::Tensor& t) { return t.detach().to(at::kDouble); };
  const auto n = d(m.valid_tokens);
  std::vector<at::Tensor> scalars = {n};
#define MOEYARD_SUM(name, ...) scalars.push_back(d(m.name) * n);
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_SUM)
#undef MOEYARD_SUM
#define MOEYARD_SUM(name, combine, doc)  \
  if (std::string(#combine) == "mean") { \
    scalars.push_back(d(m.name) * n);    \
  }
  MOEYARD_MOE_STATISTICS(MOEYARD_SUM)
#undef MOEYARD_SUM
  return at::cat({d(m.tokens_per_expert), d(m.importance), at::stack(scalars)});
}

nlohmann::json routing_record(
    const at::Tensor& row, int64_t layer, const MoEOptions& o) {
  const auto r = row.contiguous();
  const double* v = r.const_data_ptr<double>();
  const int64_t experts = (r.numel() - scalar_sums()) / 2;
  const double* counts = v;
  const double* s = v + 2 * experts;
  const double n = s[0], nz = std::max(n, 1.0);
  nlohmann::json rec = {
      {"layer", layer},
      {"tokens", n},
      {"top_k", o.top_k},
      {"tokens_per_expert", std::vector<double>(counts, counts + experts)}};
  int64_t k = 1;
#define MOEYARD_MEAN(name, ...) rec[#name] = s[k++] / nz;
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_MEAN)
#undef MOEYARD_MEAN
#define MOEYARD_MEAN(name, combine, doc) \
  if (std::string(#combine) == "mean") { \
    rec[#name] = s[k++] / nz;            \
  }
  MOEYARD_MOE_STATISTICS(MOEYARD_MEAN)
#undef MOEYARD_MEAN
  // The step's switch loss from its counts and probabilities (a mean of
  // the micro-batches' losses is not the loss of their union); per
  // sequence the mean over sequences is the loss.
  if (!(o.switch_per_sequence && o.routing == "token_choice")) {
    const auto f = r.narrow(0, 0, experts) / (nz * o.top_k);
    const auto p = r.narrow(0, experts, experts) / nz;
    rec["switch_loss"] = switch_loss_of(f, p, o).item<double>();
  }
  int64_t dead = 0; // real experts no token picked
  for (int64_t e = 0; e < experts - o.null_experts; ++e) {
    dead += counts[e] == 0;
  }
  rec["dead_experts"] = dead;
  if (o.capacity_factor > 0) {
    rec["capacity_factor"] = o.capacity_factor;
  }
  return rec;
}

} // namespace moeyard::train
