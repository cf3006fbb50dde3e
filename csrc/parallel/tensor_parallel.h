#pragma once
// Tensor parallelism (Megatron-LM's layout): column-parallel linears split
// their output features over the TP group, row-parallel linears their input
// features with the partial outputs summed; attention splits heads, the
// dense MLP its hidden width, the embedding and the output head the
// vocabulary (with a vocabulary-parallel cross-entropy). The collectives
// below carry autograd; the model (csrc/model) places them.

#include <ATen/core/Tensor.h>

#include "parallel/process_group.h"

namespace moeyard::parallel {

// Megatron's f: identity forward, all-reduce of the gradient backward. At
// the input of column-parallel layers: each rank's gradient of the
// replicated input is only its shard's share.
at::Tensor copy_to_tp(const at::Tensor& x, const Group& g);

// Megatron's g: all-reduce forward, identity backward. At the output of
// row-parallel layers: sums the partial outputs into the replicated one.
at::Tensor reduce_from_tp(const at::Tensor& x, const Group& g);

// All-reduce forward and backward: a sum of shards' contributions that each
// rank then uses in its own shard (the RMS of a split projection).
at::Tensor all_reduce_tp(const at::Tensor& x, const Group& g);

// The members' shards concatenated along `dim`; the gradient of the result
// flows back to each member's own slice.
at::Tensor gather_from_tp(const at::Tensor& x, int64_t dim, const Group& g);

// Embedding rows of `tokens` from a vocabulary shard [V / tp, H] holding
// tokens [vocab_start, vocab_start + V / tp): each rank fills its tokens'
// rows, the sum over the group is the whole lookup.
at::Tensor vocab_parallel_embedding(
    const at::Tensor& tokens,
    const at::Tensor& weight,
    int64_t vocab_start,
    const Group& g);

// Per-row cross-entropy [N] (float32; float64 stays) of logits split over
// the vocabulary ([N, V / tp] here, columns [vocab_start, ...)) against
// target [N] (global ids; ignore_index rows give 0): max, sum of
// exponentials and target logit all-reduced; the backward (softmax minus
// one-hot on the local columns) needs no communication.
at::Tensor vocab_parallel_cross_entropy(
    const at::Tensor& logits,
    const at::Tensor& target,
    int64_t vocab_start,
    int64_t ignore_index,
    const Group& g);

// Per-row KL(teacher || student) [N] (float32; float64 stays) of two
// logits split alike over the vocabulary ([N, V / tp] each; g null: the
// whole vocabulary), 0 where keep [N] is false: each side's row max and sum
// of exponentials, then the row sums, all-reduced. The teacher is a
// constant; the student's gradient (its softmax minus the teacher's, local
// columns) needs no communication.
at::Tensor vocab_parallel_kl(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const at::Tensor& keep,
    const Group* g);

// How a parameter is split over the TP group: along `dim` (-1: replicated)
// into tp pieces; a fused tensor of `parts` equal blocks along dim (the
// dense MLP's [gate; up]) splits each block, so rank r holds
// [gate_r; up_r].
struct TpSplit {
  int64_t dim = -1;
  int64_t parts = 1;
  bool sharded() const {
    return dim >= 0;
  }
};

// Rank r's piece of a full tensor (a view when parts == 1).
at::Tensor tp_slice(
    const at::Tensor& full, const TpSplit& s, int64_t rank, int64_t tp);

// The full tensor from every rank's piece, in rank order (the inverse of
// tp_slice).
at::Tensor tp_join(const std::vector<at::Tensor>& pieces, const TpSplit& s);

} // namespace moeyard::parallel
