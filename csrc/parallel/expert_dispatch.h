#pragma once
// Expert parallelism: the all-to-all token dispatcher between permute and the
// experts (and back before unpermute). Each rank of the expert-parallel group
// holds E / ep consecutive experts; rows are exchanged with autograd (the
// backward is the reverse exchange), counts first, then the variable-size
// all-to-all, then a local re-permutation so each rank's rows are
// expert-contiguous. On CUDA the forward synchronizes with the host: the
// split sizes of a variable-size all-to-all are host vectors (docs/ops.md,
// "Host synchronization", lists each sync and why).

#include <ATen/core/Tensor.h>

#include <functional>

#include "parallel/process_group.h"

namespace moeyard::parallel {

// all_to_all of dim-0 blocks with autograd: block j of x (send_splits[j]
// rows) goes to member j; the result holds recv_splits[i] rows from member i.
at::Tensor all_to_all_autograd(
    const at::Tensor& x,
    const std::vector<int64_t>& send_splits,
    const std::vector<int64_t>& recv_splits,
    const Group& group);

// The experts' output rows for `rows` [N, H] laid out by `offsets` [E + 1]
// over all E experts (route_plan's plan). `local_experts(rows, offsets)` runs
// this rank's E / ep experts on expert-contiguous rows with local offsets
// [E / ep + 1]. Rows past offsets[E] come back as zeros.
at::Tensor dispatch_to_experts(
    const at::Tensor& rows,
    const at::Tensor& offsets,
    const Group& group,
    const std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>&
        local_experts);

} // namespace moeyard::parallel
