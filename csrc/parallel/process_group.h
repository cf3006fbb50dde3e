#pragma once
// Process groups for multi-process runs: the launch
// environment torchrun or Slurm sets, a c10d TCPStore, and Gloo process groups
// (CPU) whose collectives fail with an error naming the group and the
// collective when a peer dies or hangs, instead of waiting forever.
// docs/distributed.md describes launching.

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <string>
#include <vector>

namespace moeyard::parallel {

// Where this process sits in the launch: from torchrun's RANK, WORLD_SIZE,
// LOCAL_RANK, MASTER_ADDR, MASTER_PORT, else Slurm's SLURM_PROCID,
// SLURM_NTASKS, SLURM_LOCALID (with MASTER_ADDR/MASTER_PORT from the sbatch
// script), else a single process. Malformed values are errors naming the
// variable and the value.
struct LaunchEnv {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
  std::string source = "single"; // "torchrun" | "slurm" | "single"
  bool agent_store = false; // torchrun's agent already serves the store
  // TORCHELASTIC_RESTART_COUNT: a restarted launch keys its store entries
  // apart from the previous attempt's (torchrun's agent store outlives it).
  int64_t restart_count = 0;
  // GLOO_SOCKET_IFNAME: the network interface Gloo binds to ("" = the one
  // the hostname resolves to).
  std::string gloo_ifname;

  static LaunchEnv from_env();
  // From a map instead of the environment (tests).
  static LaunchEnv from_vars(
      const std::vector<std::pair<std::string, std::string>>& vars);
};

// The rendezvous store: rank 0 serves it (unless torchrun's agent does),
// listening only on the address MASTER_ADDR resolves to (it has no
// authentication); every rank connects within `timeout`. Rank 0 names the
// address and port when it cannot listen there.
c10::intrusive_ptr<c10d::Store> make_store(
    const LaunchEnv& env, std::chrono::milliseconds timeout);

// A named group over `ranks` (global ranks, this process among them): Gloo
// on the CPU or NCCL on a GPU (`device`); collectives time out after
// `timeout`. Tensors on another device than the group's travel through it
// and come back where they were.
struct Group {
  std::string name;
  std::vector<int64_t> ranks;
  int64_t rank = 0; // this process's rank in the group
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout{0};
  c10::Device device{c10::kCPU};

  int64_t size() const {
    return static_cast<int64_t>(ranks.size());
  }
  // Sum (max) over the group, in place; every member gets the same bits.
  void all_reduce_sum(at::Tensor& t) const;
  void all_reduce_max(at::Tensor& t) const;
  // The members' tensors (same shape) concatenated along `dim`, in rank
  // order.
  at::Tensor all_gather(const at::Tensor& t, int64_t dim) const;
  // Flat collectives of a sharded buffer: `out` (size() * n elements) gets
  // every member's `in` (n elements) in rank order; `out` (n elements) gets
  // the sum over the group of the members' `in` elements [rank * n, ...).
  void all_gather_into(at::Tensor& out, const at::Tensor& in) const;
  void reduce_scatter_sum(at::Tensor& out, const at::Tensor& in) const;
  // Splits of dim 0 sent to / received from each member (element counts
  // of dim 0; empty: equal splits).
  at::Tensor all_to_all(
      const at::Tensor& input,
      const std::vector<int64_t>& send_splits,
      const std::vector<int64_t>& recv_splits) const;
  void barrier() const;
  // A barrier that waits up to `timeout` (longer than the collectives':
  // peers waiting while one rank writes a checkpoint).
  void barrier(std::chrono::milliseconds timeout) const;
};

// A group's name, members and this process's place among them (an error
// when it is not a member), without a backend: make_gloo_group and
// make_nccl_group add theirs.
Group group_shell(
    const LaunchEnv& env,
    const std::string& name,
    const std::vector<int64_t>& ranks,
    std::chrono::milliseconds timeout);

Group make_gloo_group(
    const c10::intrusive_ptr<c10d::Store>& store,
    const LaunchEnv& env,
    const std::string& name,
    const std::vector<int64_t>& ranks,
    std::chrono::milliseconds timeout);

// A group on CUDA device `device` with NCCL (the one the PyTorch wheel
// ships). Errors when moeyard was built without CUDA. NCCL's watchdog
// aborts a collective that outlasts `timeout`, naming the group.
Group make_nccl_group(
    const c10::intrusive_ptr<c10d::Store>& store,
    const LaunchEnv& env,
    const std::string& name,
    const std::vector<int64_t>& ranks,
    std::chrono::milliseconds timeout,
    c10::Device device);

// Whether this build has NCCL groups.
bool nccl_available();

// The store and one group over every process of the launch.
Group make_world_group(
    const LaunchEnv& env,
    const std::string& name,
    std::chrono::milliseconds timeout);

} // namespace moeyard::parallel
