// NCCL process groups (process_group.h), compiled when moeyard is built
// with CUDA: the c10d ProcessGroupNCCL of the PyTorch wheel.
#ifdef MOEYARD_WITH_NCCL

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "parallel/process_group.h"

namespace moeyard::parallel {

bool nccl_available() {
  return true;
}

Group make_nccl_group(
    const c10::intrusive_ptr<c10d::Store>& store,
    const LaunchEnv& env,
    const std::string& name,
    const std::vector<int64_t>& ranks,
    std::chrono::milliseconds timeout,
    c10::Device device) {
  TORCH_CHECK(
      device.is_cuda() && device.has_index(),
      "process group '",
      name,
      "': NCCL needs a CUDA device with an index, got ",
      device);
  Group g = group_shell(env, name, ranks, timeout);
  g.device = device;
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout; // the watchdog aborts a collective past it
  opts->group_name = name;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name, store);
  g.backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(
      prefixed, static_cast<int>(g.rank), static_cast<int>(ranks.size()), opts);
  return g;
}

} // namespace moeyard::parallel

#endif // MOEYARD_WITH_NCCL
