// Process groups (Gloo on the CPU; NCCL in nccl_group.cpp) and their
// collectives, each failing with an error that names the group and the
// collective. The launch environment and the rendezvous store are in
// launch_env.cpp.

#include "parallel/process_group.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <algorithm>
#include <numeric>

namespace moeyard::parallel {
namespace {

// Waits for a collective; a failure or timeout names what was waited for.
// On an NCCL group the current CUDA stream waits, not the host: a wait with
// a timeout would block the host until the device has finished everything
// queued before it; NCCL's watchdog enforces the group's timeout instead.
void wait(
    const c10::intrusive_ptr<c10d::Work>& work,
    const Group& g,
    const char* collective,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) {
  if (timeout.count() == 0) {
    timeout = g.timeout;
  }
  std::string why;
  try {
    if (g.device.is_cuda()) {
      work->wait();
    } else {
      work->wait(timeout);
    }
    return;
  } catch (const c10::Error& e) {
    why = e.what_without_backtrace();
  } catch (const std::exception& e) {
    why = e.what();
  }
  TORCH_CHECK(
      false,
      "collective ",
      collective,
      " on process group '",
      g.name,
      "' (",
      g.size(),
      " ranks) failed or timed out after ",
      timeout.count() / 1000.0,
      " s: a peer died or hangs (",
      why,
      ")");
}

} // namespace

Group group_shell(
    const LaunchEnv& env,
    const std::string& name,
    const std::vector<int64_t>& ranks,
    std::chrono::milliseconds timeout) {
  Group g;
  g.name = name;
  g.ranks = ranks;
  g.timeout = timeout;
  const auto it = std::find(ranks.begin(), ranks.end(), env.rank);
  TORCH_CHECK(
      it != ranks.end(),
      "process group '",
      name,
      "': rank ",
      env.rank,
      " is not a member");
  g.rank = it - ranks.begin();
  return g;
}

Group make_gloo_group(
    const c10::intrusive_ptr<c10d::Store>& store,
    const LaunchEnv& env,
    const std::string& name,
    const std::vector<int64_t>& ranks,
    std::chrono::milliseconds timeout) {
  Group g = group_shell(env, name, ranks, timeout);
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  // GLOO_SOCKET_IFNAME if set; else one machine: loopback; several: the
  // interface the hostname resolves to.
  const bool local =
      env.master_addr == "127.0.0.1" || env.master_addr == "localhost";
  try {
    opts->devices.push_back(
        !env.gloo_ifname.empty()
            ? c10d::ProcessGroupGloo::createDeviceForInterface(env.gloo_ifname)
        : local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                : c10d::ProcessGroupGloo::createDefaultDevice());
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false,
        "process group '",
        name,
        "': cannot open a Gloo device",
        env.gloo_ifname.empty()
            ? std::string()
            : " on interface GLOO_SOCKET_IFNAME='" + env.gloo_ifname + "'",
        " (",
        e.what(),
        ")");
  }
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name, store);
  g.backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
      prefixed, static_cast<int>(g.rank), static_cast<int>(ranks.size()), opts);
  return g;
}

#ifndef MOEYARD_WITH_NCCL
bool nccl_available() {
  return false;
}

Group make_nccl_group(
    const c10::intrusive_ptr<c10d::Store>&,
    const LaunchEnv&,
    const std::string& name,
    const std::vector<int64_t>&,
    std::chrono::milliseconds,
    c10::Device) {
  TORCH_CHECK(
      false,
      "process group '",
      name,
      "': NCCL groups need moeyard built with CUDA (this build has none)");
}
#endif

Group make_world_group(
    const LaunchEnv& env,
    const std::string& name,
    std::chrono::milliseconds timeout) {
  std::vector<int64_t> ranks(env.world_size);
  std::iota(ranks.begin(), ranks.end(), 0);
  return make_gloo_group(make_store(env, timeout), env, name, ranks, timeout);
}

namespace {

// `t` on the group's device (itself when it is there already).
at::Tensor on_device(const Group& g, const at::Tensor& t) {
  return t.device() == g.device ? t : t.to(g.device);
}

// Copies a collective's result back into `t` when it ran on a copy.
void write_back(at::Tensor& t, const at::Tensor& result) {
  if (!result.is_same(t)) {
    t.copy_(result);
  }
}

} // namespace

void Group::all_reduce_sum(at::Tensor& t) const {
  auto d = on_device(*this, t);
  std::vector<at::Tensor> v = {d};
  wait(backend->allreduce(v), *this, "all_reduce");
  write_back(t, d);
}

at::Tensor Group::all_to_all(
    const at::Tensor& input,
    const std::vector<int64_t>& send_splits,
    const std::vector<int64_t>& recv_splits) const {
  if (input.device() != device) {
    return all_to_all(input.to(device), send_splits, recv_splits)
        .to(input.device());
  }
  int64_t rows = 0;
  for (auto r : recv_splits) {
    rows += r;
  }
  if (recv_splits.empty()) {
    rows = input.size(0);
  }
  auto sizes = input.sizes().vec();
  sizes[0] = rows;
  auto out = at::empty(sizes, input.options());
  auto in = input.contiguous();
  auto ss = send_splits;
  auto rs = recv_splits;
  wait(backend->alltoall_base(out, in, rs, ss), *this, "all_to_all");
  return out;
}

void Group::all_reduce_max(at::Tensor& t) const {
  auto d = on_device(*this, t);
  std::vector<at::Tensor> v = {d};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::MAX;
  wait(backend->allreduce(v, o), *this, "all_reduce(max)");
  write_back(t, d);
}

at::Tensor Group::all_gather(const at::Tensor& t, int64_t dim) const {
  if (t.device() != device) {
    return all_gather(t.to(device), dim).to(t.device());
  }
  const auto in = t.contiguous();
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < size(); ++i) {
    parts.push_back(at::empty_like(in));
  }
  std::vector<std::vector<at::Tensor>> out = {parts};
  std::vector<at::Tensor> inputs = {in};
  wait(backend->allgather(out, inputs), *this, "all_gather");
  return at::cat(out[0], dim);
}

void Group::all_gather_into(at::Tensor& out, const at::Tensor& in) const {
  TORCH_CHECK(
      out.numel() == in.numel() * size() && out.is_contiguous(),
      "process group '",
      name,
      "': all_gather_into needs a contiguous output of ",
      in.numel() * size(),
      " elements, got ",
      out.numel());
  auto d_out = on_device(*this, out);
  auto d_in = on_device(*this, in).contiguous();
  wait(backend->all_gather_single(d_out, d_in), *this, "all_gather");
  write_back(out, d_out);
}

void Group::reduce_scatter_sum(at::Tensor& out, const at::Tensor& in) const {
  TORCH_CHECK(
      in.numel() == out.numel() * size() && out.is_contiguous(),
      "process group '",
      name,
      "': reduce_scatter_sum needs an input of ",
      out.numel() * size(),
      " elements, got ",
      in.numel());
  auto d_out = on_device(*this, out);
  auto d_in = on_device(*this, in).contiguous();
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  wait(
      backend->reduce_scatter_single(d_out, d_in, opts),
      *this,
      "reduce_scatter");
  write_back(out, d_out);
}

void Group::barrier() const {
  wait(backend->barrier(), *this, "barrier");
}

void Group::barrier(std::chrono::milliseconds timeout) const {
  c10d::BarrierOptions o;
  o.timeout = timeout;
  wait(backend->barrier(o), *this, "barrier", timeout);
}

} // namespace moeyard::parallel
