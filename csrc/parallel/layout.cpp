// The parallel layout: sizes, coordinates, groups and ownership
// (layout.h, docs/distributed.md).

#include "parallel/layout.h"

#include <c10/util/Exception.h>

#include <numeric>

namespace moeyard::parallel {

void check_layout_sizes(const LayoutSizes& s, const LayoutKeyNamer& name) {
  auto is = [&](const std::string& key, int64_t v) {
    return (name ? name(key) : key) + " = " + std::to_string(v);
  };
  if (s.expert_parallel <= 1) {
    return;
  }
  TORCH_CHECK(
      s.num_experts % s.expert_parallel == 0,
      "config: ",
      is("moe.num_experts", s.num_experts),
      " must be divisible by ",
      is("parallel.expert_parallel", s.expert_parallel));
  TORCH_CHECK(
      s.data_parallel == 0 || s.data_parallel % s.expert_parallel == 0,
      "config: ",
      is("parallel.data_parallel", s.data_parallel),
      " must be divisible by ",
      is("parallel.expert_parallel", s.expert_parallel),
      ": experts are sharded inside each data-parallel group");
}

int64_t experts_per_rank(
    int64_t num_experts, int64_t ep, const std::string& what) {
  TORCH_CHECK(
      ep >= 1 && num_experts % ep == 0,
      what,
      ": num_experts (",
      num_experts,
      ") must be divisible by expert_parallel (",
      ep,
      ")");
  return num_experts / ep;
}

Layout Layout::build(
    const LayoutSizes& sizes,
    int64_t world,
    int64_t rank,
    const std::string& source) {
  check_layout_sizes(sizes);
  TORCH_CHECK(
      world >= 1 && rank >= 0 && rank < world,
      "launch: rank ",
      rank,
      " is outside world size ",
      world);
  Layout l;
  l.world = world;
  l.rank = rank;
  l.source = source;
  l.tp = sizes.tensor_parallel;
  TORCH_CHECK(
      l.tp >= 1 && (world % l.tp == 0 || sizes.data_parallel > 0),
      "config: parallel.tensor_parallel (",
      l.tp,
      ") must divide the number of processes (WORLD_SIZE ",
      world,
      ", from ",
      source,
      ")");
  l.dp = sizes.data_parallel > 0 ? sizes.data_parallel : world / l.tp;
  TORCH_CHECK(
      l.dp * l.tp == world,
      "config: parallel.data_parallel (",
      l.dp,
      ") x parallel.tensor_parallel (",
      l.tp,
      ") must equal the number of processes (WORLD_SIZE ",
      world,
      ", from ",
      source,
      ")");
  TORCH_CHECK(
      sizes.expert_parallel >= 1 && l.dp % sizes.expert_parallel == 0,
      "config: parallel.expert_parallel (",
      sizes.expert_parallel,
      ") must divide the data-parallel size (",
      l.dp,
      ")");
  l.ep = sizes.expert_parallel;
  l.edp = l.dp / l.ep;
  l.tp_rank = rank % l.tp;
  l.dp_rank = rank / l.tp;
  l.ep_rank = l.dp_rank % l.ep;
  l.edp_rank = l.dp_rank / l.ep;
  return l;
}

std::vector<int64_t> Layout::world_ranks() const {
  std::vector<int64_t> r(world);
  std::iota(r.begin(), r.end(), 0);
  return r;
}

std::vector<int64_t> Layout::dp_ranks() const {
  std::vector<int64_t> r;
  for (int64_t d = 0; d < dp; ++d) {
    r.push_back(global_rank(d, tp_rank));
  }
  return r;
}

std::vector<int64_t> Layout::tp_ranks() const {
  std::vector<int64_t> r;
  for (int64_t t = 0; t < tp; ++t) {
    r.push_back(global_rank(dp_rank, t));
  }
  return r;
}

std::vector<int64_t> Layout::ep_ranks() const {
  std::vector<int64_t> r;
  for (int64_t i = 0; i < ep; ++i) {
    r.push_back(global_rank(edp_rank * ep + i, tp_rank));
  }
  return r;
}

std::vector<int64_t> Layout::edp_ranks() const {
  std::vector<int64_t> r;
  for (int64_t j = 0; j < edp; ++j) {
    r.push_back(global_rank(j * ep + ep_rank, tp_rank));
  }
  return r;
}

std::string Layout::dp_name() const {
  return "data_parallel_" + std::to_string(tp_rank);
}

std::string Layout::tp_name() const {
  return "tensor_parallel_" + std::to_string(dp_rank);
}

std::string Layout::ep_name() const {
  return "expert_parallel_" + std::to_string(tp_rank) + "_" +
         std::to_string(edp_rank);
}

std::string Layout::edp_name() const {
  return "expert_data_parallel_" + std::to_string(tp_rank) + "_" +
         std::to_string(ep_rank);
}

int64_t Layout::first_expert(int64_t num_experts) const {
  return ep_rank * experts_per_rank(num_experts, ep, "moe");
}

PieceIndex Layout::piece(Placement placement) const {
  switch (placement) {
    case Placement::kTensorParallel:
      return {tp_rank, tp};
    case Placement::kExpert:
      return {ep_rank, ep};
    case Placement::kReplicated:
      break;
  }
  return {};
}

bool Layout::writes(Placement placement) const {
  switch (placement) {
    case Placement::kTensorParallel:
      return dp_rank == 0; // one data-parallel replica's pieces
    case Placement::kExpert:
      // One expert-data-parallel replica's slices (tensor-parallel ranks
      // hold the same experts).
      return tp_rank == 0 && edp_rank == 0;
    case Placement::kReplicated:
      break;
  }
  return rank == 0;
}

std::string Layout::file_suffix() const {
  return distributed() ? "-rank" + std::to_string(rank) : std::string();
}

void Layout::connect(
    const LaunchEnv& env,
    c10::Device device,
    std::chrono::milliseconds timeout) {
  TORCH_INTERNAL_ASSERT(env.rank == rank && env.world_size == world);
  if (!distributed()) {
    return;
  }
  const bool gpu = device.is_cuda();
  auto store = make_store(env, timeout);
  // Tensor traffic over NCCL on GPUs, Gloo on CPUs; the world group (stop
  // requests, step checks, checkpoint barriers) is always Gloo.
  auto group = [&](const std::string& name, const std::vector<int64_t>& r) {
    return gpu && name != "world"
               ? make_nccl_group(store, env, name, r, timeout, device)
               : make_gloo_group(store, env, name, r, timeout);
  };
  groups.world = group("world", world_ranks());
  groups.dp = group(dp_name(), dp_ranks());
  if (tp > 1) {
    groups.tp = group(tp_name(), tp_ranks());
  }
  if (ep > 1) {
    groups.ep = group(ep_name(), ep_ranks());
    groups.edp = group(edp_name(), edp_ranks());
  }
}

} // namespace moeyard::parallel
