#pragma once
// The live views of a run (log.tensorboard, log.wandb; docs/training.md):
// what a step's metrics record shows on a dashboard, and the feed that
// carries it to Weights & Biases. metrics.jsonl stays the record of a run;
// the dashboards are views of it.

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace moeyard::train {

// A step as the dashboards show it.
struct DashboardStep {
  int64_t step = 0;
  // Every number of the record under its key, `tokens_per_s`, and each MoE
  // layer's statistics as moe/<statistic>/layer<i>.
  std::vector<std::pair<std::string, double>> scalars;
  // The experts' loads, a row per MoE layer, over the step's busiest expert
  // (values in [0, 1]); empty when the step shows none.
  std::vector<std::vector<double>> expert_load;
};

// The view of metrics record `rec`; the loads only when `with_load`.
DashboardStep dashboard_step(
    const nlohmann::json& rec, double tokens_per_step, bool with_load);

struct WandbOptions {
  std::string project; // log.wandb
  std::string mode; // log.wandb_mode: online | offline
  std::string name; // the run's name (its directory's)
  std::string dir; // W&B files go to <dir>/wandb
  std::map<std::string, std::string> config; // the resolved config
};

// Rank 0's feed to W&B: a Python process (`$MOEYARD_PYTHON -m
// moeyard.wandb_feed`, else python3) that owns the W&B run and reads one JSON
// line per step from a socket. Construction waits until the W&B run is
// open and fails with the process's own reason (wandb missing, a refused
// login, ...). The feed never stops training: when the process ends or
// stops reading, a warning says so and later steps go to metrics.jsonl only.
class WandbFeed {
 public:
  explicit WandbFeed(const WandbOptions& options);
  ~WandbFeed(); // lets the process finish the run (2 minutes at most)
  WandbFeed(const WandbFeed&) = delete;
  WandbFeed& operator=(const WandbFeed&) = delete;

  void send(const DashboardStep& s);

 private:
  void send_line(const std::string& line);
  // One line from the process, or "" when it closed or `timeout_s` passed.
  std::string read_line(double timeout_s);
  int fd_ = -1;
  pid_t pid_ = -1;
  bool broken_ = false;
};

} // namespace moeyard::train
