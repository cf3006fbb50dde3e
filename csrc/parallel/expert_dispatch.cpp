#include "parallel/expert_dispatch.h"
#include "parallel/layout.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace moeyard::parallel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AllToAll : public torch::autograd::Function<AllToAll> {
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const std::vector<int64_t>& send,
      const std::vector<int64_t>& recv,
      int64_t group_ptr) {
    ctx->saved_data["send"] = send;
    ctx->saved_data["recv"] = recv;
    ctx->saved_data["group"] = group_ptr;
    const auto* g = reinterpret_cast<const Group*>(group_ptr);
    return g->all_to_all(x, send, recv);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto* g =
        reinterpret_cast<const Group*>(ctx->saved_data["group"].toInt());
    const auto send = ctx->saved_data["send"].toIntVector();
    const auto recv = ctx->saved_data["recv"].toIntVector();
    // The reverse exchange: what came from member i goes back to it.
    return {g->all_to_all(grads[0].contiguous(), recv, send), {}, {}, {}};
  }
};

// A host copy: on CUDA this waits for the work queued before it (a host
// sync, listed in docs/ops.md).
std::vector<int64_t> to_vector(const at::Tensor& t) {
  const auto c = t.to(at::kCPU, at::kLong).contiguous();
  return {c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel()};
}

} // namespace

at::Tensor all_to_all_autograd(
    const at::Tensor& x,
    const std::vector<int64_t>& send_splits,
    const std::vector<int64_t>& recv_splits,
    const Group& group) {
  return AllToAll::apply(
      x, send_splits, recv_splits, reinterpret_cast<int64_t>(&group));
}

at::Tensor dispatch_to_experts(
    const at::Tensor& rows,
    const at::Tensor& offsets,
    const Group& group,
    const std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>&
        local_experts) {
  const int64_t ep = group.size();
  const auto off = to_vector(offsets);
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  const int64_t El = experts_per_rank(
      E, ep, "expert parallelism (group '" + group.name + "')");
  // 1. Counts: how many rows each rank sends to each of the others' experts.
  std::vector<int64_t> counts(E);
  for (int64_t e = 0; e < E; ++e) {
    counts[e] = off[e + 1] - off[e];
  }
  const auto recv_t = group.all_to_all(
      at::tensor(counts, at::kLong).view({E, 1}),
      std::vector<int64_t>(ep, El),
      std::vector<int64_t>(ep, El));
  const auto recv_counts = to_vector(recv_t); // [src * El + local expert]
  std::vector<int64_t> send_splits(ep, 0), recv_splits(ep, 0);
  for (int64_t j = 0; j < ep; ++j) {
    for (int64_t e = 0; e < El; ++e) {
      send_splits[j] += counts[j * El + e];
      recv_splits[j] += recv_counts[j * El + e];
    }
  }
  // 2. Rows: [src][local expert] blocks.
  const auto sent = rows.narrow(0, 0, off[E]);
  const auto recv =
      all_to_all_autograd(sent.contiguous(), send_splits, recv_splits, group);
  // 3. Re-permute to [local expert][src] so the local experts' rows are
  // contiguous.
  std::vector<int64_t> src_start(ep + 1, 0);
  for (int64_t i = 0; i < ep; ++i) {
    src_start[i + 1] = src_start[i] + recv_splits[i];
  }
  std::vector<int64_t> perm;
  perm.reserve(src_start[ep]);
  std::vector<int64_t> local_off(El + 1, 0);
  for (int64_t e = 0; e < El; ++e) {
    for (int64_t i = 0; i < ep; ++i) {
      int64_t start = src_start[i];
      for (int64_t e2 = 0; e2 < e; ++e2) {
        start += recv_counts[i * El + e2];
      }
      for (int64_t r = 0; r < recv_counts[i * El + e]; ++r) {
        perm.push_back(start + r);
      }
      local_off[e + 1] += recv_counts[i * El + e];
    }
    local_off[e + 1] += local_off[e];
  }
  const auto opts = offsets.options().dtype(at::kLong);
  const auto perm_t = at::tensor(perm, at::kLong).to(rows.device());
  const auto local_rows = recv.index_select(0, perm_t);
  auto out = local_experts(
      local_rows, at::tensor(local_off, at::kLong).to(opts.device()));
  // 4. Back: undo the re-permutation, reverse exchange, pad dropped rows.
  const auto inv = at::empty_like(perm_t).scatter_(
      0, perm_t, at::arange(perm_t.numel(), perm_t.options()));
  const auto back = all_to_all_autograd(
      out.index_select(0, inv).contiguous(), recv_splits, send_splits, group);
  const int64_t tail = rows.size(0) - off[E];
  if (tail == 0) {
    return back;
  }
  return at::cat({back, at::zeros({tail, back.size(1)}, back.options())});
}

} // namespace moeyard::parallel
