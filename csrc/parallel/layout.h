#pragma once
// The parallel layout of a run (docs/distributed.md): the sizes of the
// tensor-, data-, expert- and expert-data-parallel dimensions, this rank's
// coordinates in them, the members of its groups, what it owns (which
// experts, which tensor-parallel piece) and what it writes in a checkpoint.
// Built once from the config and the launch; every check that the sizes fit
// together lives here.
//
// Rank order: tensor-parallel ranks are consecutive (TP fastest), then
// expert-parallel ranks (consecutive data-parallel indices), then
// expert-data-parallel ranks (data-parallel indices strided by ep):
//   rank = dp_rank * tp + tp_rank,  dp_rank = edp_rank * ep + ep_rank.

#include <c10/core/Device.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "parallel/process_group.h"

namespace moeyard::parallel {

// What a config asks for: the parallel.* keys and moe.num_experts.
struct LayoutSizes {
  int64_t data_parallel = 0; // 0: the processes / tensor_parallel
  int64_t tensor_parallel = 1;
  int64_t expert_parallel = 1;
  int64_t num_experts = 0; // 0: a dense model
};

// Names a key in an error with where it was given ("parallel.expert_parallel
// (--set parallel.expert_parallel=3)"); empty: the bare key.
using LayoutKeyNamer = std::function<std::string(const std::string& key)>;

// The checks that need no launch: num_experts and data_parallel (when
// given) divisible by expert_parallel. Errors name both keys and values.
void check_layout_sizes(const LayoutSizes& s, const LayoutKeyNamer& name = {});

// Experts per rank when `num_experts` split over `ep` expert-parallel ranks:
// the one place `num_experts % ep` is checked. `what` starts the error
// ("moe", "checkpoint: expert tensor 'x'").
int64_t experts_per_rank(
    int64_t num_experts, int64_t ep, const std::string& what);

// How a tensor is spread over the ranks.
enum class Placement {
  kReplicated, // whole on every rank
  kTensorParallel, // one piece per tensor-parallel rank
  kExpert, // one slice of experts (dim 0) per expert-parallel rank
};

// A piece's place in its full tensor: piece `index` of `count`.
struct PieceIndex {
  int64_t index = 0;
  int64_t count = 1;
};

// The process groups of a layout (absent in one process; tp, ep and edp
// only when their size is above one).
struct LayoutGroups {
  std::optional<Group> world, dp, tp, ep, edp;
};

struct Layout {
  int64_t world = 1; // processes
  int64_t rank = 0; // this process
  int64_t tp = 1, dp = 1, ep = 1, edp = 1; // sizes; edp = dp / ep
  int64_t tp_rank = 0, dp_rank = 0, ep_rank = 0, edp_rank = 0;
  std::string source = "single"; // where world and rank came from
  LayoutGroups groups;

  // The layout of process `rank` of `world` (launched by `source`). Errors
  // name the field, its value and what it must be.
  static Layout build(
      const LayoutSizes& sizes,
      int64_t world,
      int64_t rank,
      const std::string& source = "single");

  bool distributed() const {
    return world > 1;
  }
  // Global rank of (data-parallel index, tensor-parallel rank).
  int64_t global_rank(int64_t dp_index, int64_t tp_index) const {
    return dp_index * tp + tp_index;
  }
  // Global ranks of this rank's groups, in group-rank order.
  std::vector<int64_t> world_ranks() const;
  std::vector<int64_t> dp_ranks() const;
  std::vector<int64_t> tp_ranks() const;
  std::vector<int64_t> ep_ranks() const;
  std::vector<int64_t> edp_ranks() const;
  // Group names, unique per group of the launch.
  std::string dp_name() const;
  std::string tp_name() const;
  std::string ep_name() const;
  std::string edp_name() const;

  // Experts [first_expert(E), first_expert(E) + experts_per_rank(E, ep)) of
  // every MoE layer are this rank's.
  int64_t first_expert(int64_t num_experts) const;
  // This rank's piece of a tensor of `placement`.
  PieceIndex piece(Placement placement) const;
  // Whether this rank writes its copy of a tensor of `placement` to a
  // checkpoint (one copy of each tensor or piece over the whole launch):
  // rank 0 the replicated tensors, data-parallel replica 0 its
  // tensor-parallel pieces, the TP-rank-0 ranks of expert-data-parallel
  // replica 0 their expert slices.
  bool writes(Placement placement) const;
  // Whether this rank writes its data-parallel shard of a tensor of
  // `placement` (the sharded optimizer's state): every data-parallel rank
  // holds a different shard, tensor-parallel ranks the same one unless the
  // tensor is split over them.
  bool writes_dp_shard(Placement placement) const {
    return placement == Placement::kTensorParallel || tp_rank == 0;
  }
  // Whether this rank writes the random stream of its data-parallel rank
  // (tensor-parallel ranks share theirs).
  bool writes_rng() const {
    return tp_rank == 0;
  }
  // "-rank<r>" in a multi-process run, "": the suffix of this rank's files.
  std::string file_suffix() const;

  // Creates the groups: Gloo, or NCCL on `device` when it is a GPU (the
  // world group is always Gloo); collectives time out after `timeout`.
  void connect(
      const LaunchEnv& env,
      c10::Device device,
      std::chrono::milliseconds timeout);
};

} // namespace moeyard::parallel
