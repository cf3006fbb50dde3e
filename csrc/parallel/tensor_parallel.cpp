#include "parallel/tensor_parallel.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <limits>

namespace moeyard::parallel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const Group& group_of(AutogradContext* ctx) {
  return *reinterpret_cast<const Group*>(ctx->saved_data["group"].toInt());
}

int64_t ptr(const Group& g) {
  return reinterpret_cast<int64_t>(&g);
}

at::Tensor summed(const at::Tensor& x, const Group& g) {
  auto y = x.contiguous().clone();
  g.all_reduce_sum(y);
  return y;
}

struct CopyToTp : public torch::autograd::Function<CopyToTp> {
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, int64_t group) {
    ctx->saved_data["group"] = group;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {summed(grads[0], group_of(ctx)), {}};
  }
};

struct ReduceFromTp : public torch::autograd::Function<ReduceFromTp> {
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, int64_t group) {
    (void)ctx;
    return summed(x, *reinterpret_cast<const Group*>(group));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    (void)ctx;
    return {grads[0], {}};
  }
};

struct AllReduceTp : public torch::autograd::Function<AllReduceTp> {
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, int64_t group) {
    ctx->saved_data["group"] = group;
    return summed(x, *reinterpret_cast<const Group*>(group));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {summed(grads[0], group_of(ctx)), {}};
  }
};

struct GatherFromTp : public torch::autograd::Function<GatherFromTp> {
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, int64_t dim, int64_t group) {
    ctx->saved_data["group"] = group;
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["width"] = x.size(dim);
    return reinterpret_cast<const Group*>(group)->all_gather(x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& g = group_of(ctx);
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const int64_t w = ctx->saved_data["width"].toInt();
    return {grads[0].narrow(dim, g.rank * w, w).contiguous(), {}, {}};
  }
};

struct VocabParallelCE : public torch::autograd::Function<VocabParallelCE> {
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& logits,
      const at::Tensor& target,
      int64_t vocab_start,
      int64_t ignore_index,
      int64_t group) {
    const auto& g = *reinterpret_cast<const Group*>(group);
    const int64_t Vl = logits.size(1);
    auto m = std::get<0>(logits.max(1)).contiguous();
    g.all_reduce_max(m);
    const auto shifted = logits - m.unsqueeze(1);
    auto e = shifted.exp();
    auto sum = e.sum(1).contiguous();
    g.all_reduce_sum(sum);
    const auto local = target - vocab_start;
    const auto mine = (local >= 0) & (local < Vl);
    const auto idx = at::where(mine, local, at::zeros_like(local));
    auto picked = shifted.gather(1, idx.unsqueeze(1)).squeeze(1) *
                  mine.to(shifted.scalar_type());
    picked = picked.contiguous();
    g.all_reduce_sum(picked);
    const auto keep = target != ignore_index;
    auto loss = (sum.log() - picked) * keep.to(picked.scalar_type());
    // Saved for the backward: the local softmax and the one-hot columns.
    e.div_(sum.unsqueeze(1));
    ctx->save_for_backward({e, idx, (mine & keep), keep});
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto& probs = s[0];
    const auto& idx = s[1];
    const auto& hit = s[2];
    const auto& keep = s[3];
    const auto go = grads[0] * keep.to(grads[0].scalar_type());
    auto grad = probs * go.unsqueeze(1);
    grad.scatter_add_(
        1,
        idx.unsqueeze(1),
        (-go * hit.to(go.scalar_type())).unsqueeze(1).to(grad.scalar_type()));
    return {grad, {}, {}, {}, {}};
  }
};

// Log-softmax of logits split over the vocabulary: the row max and the
// sum of exponentials over every piece (g null: one piece).
at::Tensor split_log_softmax(const at::Tensor& logits, const Group* g) {
  auto m = std::get<0>(logits.max(1)).contiguous();
  if (g) {
    g->all_reduce_max(m);
  }
  const auto shifted = logits - m.unsqueeze(1);
  auto sum = shifted.exp().sum(1).contiguous();
  if (g) {
    g->all_reduce_sum(sum);
  }
  return shifted - sum.log().unsqueeze(1);
}

struct VocabParallelKL : public torch::autograd::Function<VocabParallelKL> {
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& student,
      const at::Tensor& teacher,
      const at::Tensor& keep,
      int64_t group) {
    const auto* g = reinterpret_cast<const Group*>(group);
    const auto log_s = split_log_softmax(student, g);
    const auto log_t = split_log_softmax(teacher, g);
    const auto p_t = log_t.exp();
    const auto kept = keep.to(student.scalar_type());
    // Tokens the teacher rules out (p_t = 0, log_t = -inf) add nothing.
    const auto terms =
        at::where(p_t > 0, p_t * (log_t - log_s), at::zeros_like(p_t));
    auto kl = (terms.sum(1) * kept).contiguous();
    if (g) {
      g->all_reduce_sum(kl);
    }
    // d KL / d student = softmax(student) - softmax(teacher), kept rows.
    ctx->save_for_backward({(log_s.exp() - p_t) * kept.unsqueeze(1)});
    return kl;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto diff = ctx->get_saved_variables()[0];
    return {diff * grads[0].unsqueeze(1).to(diff.scalar_type()), {}, {}, {}};
  }
};

} // namespace

at::Tensor vocab_parallel_kl(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const at::Tensor& keep,
    const Group* g) {
  TORCH_CHECK(
      student.dim() == 2 && student.sizes() == teacher.sizes() &&
          keep.dim() == 1 && keep.size(0) == student.size(0),
      "vocab_parallel_kl: student and teacher logits [N, V/tp] and keep [N] "
      "expected, got ",
      student.sizes(),
      ", ",
      teacher.sizes(),
      " and ",
      keep.sizes());
  const auto dt =
      student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return VocabParallelKL::apply(
      student.to(dt),
      teacher.detach().to(dt),
      keep.to(at::kBool),
      reinterpret_cast<int64_t>(g));
}

at::Tensor copy_to_tp(const at::Tensor& x, const Group& g) {
  return CopyToTp::apply(x, ptr(g));
}

at::Tensor reduce_from_tp(const at::Tensor& x, const Group& g) {
  return ReduceFromTp::apply(x, ptr(g));
}

at::Tensor all_reduce_tp(const at::Tensor& x, const Group& g) {
  return AllReduceTp::apply(x, ptr(g));
}

at::Tensor gather_from_tp(const at::Tensor& x, int64_t dim, const Group& g) {
  return GatherFromTp::apply(x, dim < 0 ? dim + x.dim() : dim, ptr(g));
}

at::Tensor vocab_parallel_embedding(
    const at::Tensor& tokens,
    const at::Tensor& weight,
    int64_t vocab_start,
    const Group& g) {
  const int64_t Vl = weight.size(0);
  const auto local = tokens - vocab_start;
  const auto mine = (local >= 0) & (local < Vl);
  const auto rows =
      at::embedding(weight, at::where(mine, local, at::zeros_like(local)));
  return reduce_from_tp(rows * mine.unsqueeze(-1).to(rows.scalar_type()), g);
}

at::Tensor vocab_parallel_cross_entropy(
    const at::Tensor& logits,
    const at::Tensor& target,
    int64_t vocab_start,
    int64_t ignore_index,
    const Group& g) {
  TORCH_CHECK(
      logits.dim() == 2 && target.dim() == 1 &&
          logits.size(0) == target.size(0),
      "vocab_parallel_cross_entropy: logits [N, V/tp] and target [N] "
      "expected, got ",
      logits.sizes(),
      " and ",
      target.sizes());
  const auto l =
      logits.scalar_type() == at::kDouble ? logits : logits.to(at::kFloat);
  return VocabParallelCE::apply(
      l, target.to(at::kLong), vocab_start, ignore_index, ptr(g));
}

at::Tensor tp_slice(
    const at::Tensor& full, const TpSplit& s, int64_t rank, int64_t tp) {
  if (!s.sharded() || tp == 1) {
    return full;
  }
  const int64_t n = full.size(s.dim);
  TORCH_CHECK(
      n % (s.parts * tp) == 0,
      "tensor parallelism: size ",
      n,
      " of dim ",
      s.dim,
      " does not split into ",
      s.parts,
      " x ",
      tp,
      " pieces");
  const int64_t block = n / s.parts, piece = block / tp;
  if (s.parts == 1) {
    return full.narrow(s.dim, rank * piece, piece);
  }
  std::vector<at::Tensor> pieces;
  for (int64_t b = 0; b < s.parts; ++b) {
    pieces.push_back(full.narrow(s.dim, b * block + rank * piece, piece));
  }
  return at::cat(pieces, s.dim);
}

at::Tensor tp_join(const std::vector<at::Tensor>& pieces, const TpSplit& s) {
  TORCH_CHECK(!pieces.empty(), "tp_join: no pieces");
  if (!s.sharded() || pieces.size() == 1) {
    return pieces[0];
  }
  if (s.parts == 1) {
    return at::cat(pieces, s.dim);
  }
  const int64_t w = pieces[0].size(s.dim) / s.parts;
  std::vector<at::Tensor> ordered; // [part][rank]
  for (int64_t b = 0; b < s.parts; ++b) {
    for (const auto& p : pieces) {
      ordered.push_back(p.narrow(s.dim, b * w, w));
    }
  }
  return at::cat(ordered, s.dim);
}

} // namespace moeyard::parallel
