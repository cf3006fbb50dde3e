// The sharded optimizer (optim.shard: optimizer | optimizer+grads): fp32
// masters, gradients and AdamW moments split over the data-parallel ranks
// (expert slices over the expert-data-parallel ranks), in flat buckets
// (ShardBucket). A step: gradients reduced (or reduce-scattered) into each
// rank's shard, the global norm from the shards, AdamW on the shards, the
// updated shards all-gathered into the parameters. Checkpoints hold each
// parameter's state under its name, so every sharding mode and layout
// loads every other's.

#include "train/trainer_impl.h"

#include <array>

namespace moeyard::train::detail {

void Trainer::build_buckets(size_t n_groups) {
  at::NoGradGuard g;
  for (size_t og = 0; og < n_groups; ++og) {
    for (const int kind : {0, 2, 1}) {
      // Per dtype, buckets of up to kShardBucketElements (the last one
      // open for more members).
      std::map<at::ScalarType, std::vector<ShardBucket>> by_dtype;
      for (size_t i = 0; i < params_.size(); ++i) {
        const auto where = placement(param_names_[i]);
        const int k = where == parallel::Placement::kExpert           ? 1
                      : where == parallel::Placement::kTensorParallel ? 2
                                                                      : 0;
        if (param_group_[i] != og || k != kind) {
          continue;
        }
        auto& list = by_dtype[params_[i].scalar_type()];
        if (list.empty() ||
            (list.back().numel > 0 &&
             list.back().numel + params_[i].numel() > kShardBucketElements)) {
          list.emplace_back();
        }
        auto& b = list.back();
        b.members.push_back(i);
        b.offsets.push_back(b.numel);
        b.numel += params_[i].numel();
      }
      for (auto& [dtype, list] : by_dtype) {
        for (auto& b : list) {
          b.opt_group = og;
          b.kind = kind;
          b.dtype = dtype;
          b.group = kind == 1 ? edp_ : dp_;
          if (b.group && b.group->size() == 1) {
            b.group = nullptr;
          }
          const int64_t n = b.ranks();
          b.shard = (b.numel + n - 1) / n;
          b.begin = (b.group ? b.group->rank : 0) * b.shard;
          if (cfg_.optim.sharded()) {
            b.master =
                at::zeros({b.shard}, params_[0].options().dtype(at::kFloat));
            b.for_each_overlap(
                [&](size_t m, int64_t at_m, int64_t at_s, int64_t len) {
                  b.master.narrow(0, at_s, len)
                      .copy_(params_[b.members[m]].detach().reshape(-1).narrow(
                          0, at_m, len));
                });
            b.master.requires_grad_(true);
          }
          buckets_.push_back(std::move(b));
        }
      }
    }
  }
  if (!cfg_.optim.sharded()) {
    return;
  }
  int64_t owned = 0;
  for (const auto& b : buckets_) {
    owned += b.shard;
  }
  log::info(log::format(
      "optimizer sharded (optim.shard: %s): %ld buckets, %ld fp32 elements "
      "of masters and moments on this rank",
      cfg_.optim.shard.c_str(),
      static_cast<int64_t>(buckets_.size()),
      owned));
}

at::Tensor Trainer::bucket_gradients(const ShardBucket& b, bool release) {
  auto flat = at::zeros(
      {b.shard * b.ranks()}, params_[b.members[0]].options().dtype(at::kFloat));
  for (size_t m = 0; m < b.members.size(); ++m) {
    auto& p = params_[b.members[m]];
    if (p.grad().defined()) {
      flat.narrow(0, b.offsets[m], p.numel()).copy_(p.grad().reshape(-1));
      if (release) {
        p.mutable_grad() = at::Tensor();
      }
    }
  }
  return flat;
}

void Trainer::sum_tp_partial(
    const ShardBucket& b, at::Tensor& grad, int64_t first) {
  if (b.kind != 0 || !tp_) {
    return;
  }
  // TP ranks hold the same replicated members at the same offsets, so their
  // windows cover the same elements.
  std::vector<std::pair<int64_t, int64_t>> spans; // (window offset, len)
  b.for_each_overlap_in(
      first, grad.numel(), [&](size_t m, int64_t, int64_t at_w, int64_t len) {
        if (model_->tp_partial_grad(param_names_[b.members[m]])) {
          spans.emplace_back(at_w, len);
        }
      });
  if (spans.empty()) {
    return;
  }
  std::vector<at::Tensor> parts;
  for (auto [o, n] : spans) {
    parts.push_back(grad.narrow(0, o, n));
  }
  auto partial = at::cat(parts);
  tp_->all_reduce_sum(partial);
  int64_t k = 0;
  for (auto [o, n] : spans) {
    grad.narrow(0, o, n).copy_(partial.narrow(0, k, n));
    k += n;
  }
}

void Trainer::reduce_sharded_gradients() {
  at::NoGradGuard g;
  const bool scatter = cfg_.optim.shard == "optimizer+grads";
  for (auto& b : buckets_) {
    // The critics have gradients on their target steps only (on every rank
    // alike); between them AdamW leaves them, as unsharded.
    if (b.opt_group == critic_group() &&
        std::none_of(b.members.begin(), b.members.end(), [&](size_t m) {
          return params_[m].grad().defined();
        })) {
      b.master.mutable_grad() = at::Tensor();
      continue;
    }
    auto flat = bucket_gradients(b, /*release=*/true);
    at::Tensor grad;
    if (!b.group) {
      grad = flat;
    } else if (scatter) {
      grad = at::empty({b.shard}, flat.options());
      b.group->reduce_scatter_sum(grad, flat);
    } else {
      b.group->all_reduce_sum(flat);
      grad = flat.narrow(0, b.begin, b.shard).clone();
    }
    flat = at::Tensor();
    sum_tp_partial(b, grad, b.begin);
    grad.div_(static_cast<double>(layout_.dp));
    b.master.mutable_grad() = grad;
  }
  if (cfg_.optim.expert_grad_clip > 0) {
    clip_sharded_experts();
  }
}

void Trainer::clip_sharded_experts() {
  // Per layer, each expert's squared gradient norm over its w_gate_up and
  // w_down elements: partial sums over this rank's shards, summed over the
  // expert-data-parallel group (whose shards partition the elements).
  struct Layer {
    const parallel::Group* group = nullptr; // the buckets'
    at::Tensor sq; // float64 [local experts]
    std::vector<std::tuple<ShardBucket*, int64_t, int64_t, at::Tensor>> spans;
  };
  std::map<std::string, Layer> layers;
  for (auto& b : buckets_) {
    if (b.kind != 1 && layout_.ep > 1) {
      continue;
    }
    b.for_each_overlap([&](size_t m, int64_t at_m, int64_t at_s, int64_t len) {
      const auto& n = param_names_[b.members[m]];
      if (!is_expert_parameter(n, /*weights_only=*/true)) {
        return;
      }
      const auto& p = params_[b.members[m]];
      const int64_t experts = p.size(0), per = p.numel() / experts;
      auto& l = layers[n.substr(0, n.rfind('.'))];
      if (!l.sq.defined()) {
        l.sq = at::zeros({experts}, b.master.options().dtype(at::kDouble));
        l.group = b.group;
      }
      auto expert =
          at::arange(at_m, at_m + len, l.sq.options().dtype(at::kLong))
              .div_(per, "floor");
      l.sq.index_add_(
          0,
          expert,
          b.master.grad().narrow(0, at_s, len).to(at::kDouble).square());
      l.spans.emplace_back(&b, at_s, len, expert);
    });
  }
  for (auto& [name, l] : layers) {
    if (l.group) {
      l.group->all_reduce_sum(l.sq);
    }
    const double clip = cfg_.optim.expert_grad_clip;
    const auto scale = (clip / (l.sq.sqrt() + 1e-6)).clamp_max(1.0);
    for (auto& [b, at_s, len, expert] : l.spans) {
      auto gr = b->master.mutable_grad().narrow(0, at_s, len);
      gr.mul_(scale.index_select(0, expert).to(gr.scalar_type()));
    }
  }
}

void Trainer::gather_sharded_params() {
  at::NoGradGuard g;
  for (auto& b : buckets_) {
    const auto shard = b.master.detach().to(b.dtype);
    at::Tensor full = shard;
    if (b.group) {
      full = at::empty({b.shard * b.ranks()}, shard.options());
      b.group->all_gather_into(full, shard);
    }
    for (size_t m = 0; m < b.members.size(); ++m) {
      auto& p = params_[b.members[m]];
      p.detach().view(-1).copy_(full.narrow(0, b.offsets[m], p.numel()));
    }
  }
}

void Trainer::save_sharded_state(
    io::TensorMap& t, std::map<std::string, std::string>& meta) const {
  for (const auto& b : buckets_) {
    const AdamWState* s = opt_->state(b.master);
    if (!s) {
      continue; // before the first step
    }
    b.for_each_overlap([&](size_t m, int64_t at_m, int64_t at_s, int64_t len) {
      const auto& n = param_names_[b.members[m]];
      const auto where = placement(n);
      if (!layout_.writes_dp_shard(where)) {
        return;
      }
      const auto& p = params_[b.members[m]];
      const auto piece = layout_.piece(where);
      const auto split = where == parallel::Placement::kTensorParallel
                             ? model_->tp_split(n)
                             : parallel::TpSplit{0, 1};
      const auto info = io::flat_piece_metadata(
          p.sizes().vec(),
          at_m,
          split,
          where == parallel::Placement::kReplicated ? 0 : piece.index,
          where == parallel::Placement::kReplicated ? 1 : piece.count);
      auto keep = [&](const std::string& key, const at::Tensor& v) {
        t[key] = v.narrow(0, at_s, len).detach();
        meta[key] = info;
      };
      keep(n + ".exp_avg", s->exp_avg);
      keep(n + ".exp_avg_sq", s->exp_avg_sq);
      if (b.dtype != at::kFloat && b.dtype != at::kDouble) {
        keep(n + ".master", b.master);
      }
      // The step count is whole: written with the piece at element 0.
      if (at_m == 0 && piece.index == 0) {
        t[n + ".step"] = s->step.to(at::kCPU, at::kLong);
      }
    });
  }
}

void Trainer::load_sharded_state(const io::CheckpointReader& reader) {
  at::NoGradGuard g;
  for (auto& b : buckets_) {
    auto exp_avg = at::zeros_like(b.master);
    auto exp_avg_sq = at::zeros_like(b.master);
    int64_t step = -1;
    b.for_each_overlap([&](size_t m, int64_t at_m, int64_t at_s, int64_t len) {
      const auto& n = param_names_[b.members[m]];
      if (!reader.has(n + ".exp_avg")) {
        return; // not in the optimizer when saved: fresh state
      }
      // This rank's piece of the parameter (one at a time), then the
      // shard's part of it.
      auto piece_buf =
          at::empty(params_[b.members[m]].sizes(), b.master.options());
      auto part = [&](const std::string& key) {
        reader.read(key, piece_buf, piece(n));
        return piece_buf.view(-1).narrow(0, at_m, len);
      };
      exp_avg.narrow(0, at_s, len).copy_(part(n + ".exp_avg"));
      exp_avg_sq.narrow(0, at_s, len).copy_(part(n + ".exp_avg_sq"));
      if (reader.has(n + ".master")) {
        b.master.detach().narrow(0, at_s, len).copy_(part(n + ".master"));
      }
      const int64_t st = reader.read_whole(n + ".step").item<int64_t>();
      TORCH_CHECK(
          step < 0 || st == step,
          "checkpoint: parameters of one optimizer bucket have different step "
          "counts (",
          step,
          " and ",
          st,
          " for '",
          n,
          "'); the sharded optimizer keeps one count per bucket");
      step = st;
    });
    if (step >= 0) {
      auto& s = opt_->reset_state(b.master, step);
      s.exp_avg = exp_avg;
      s.exp_avg_sq = exp_avg_sq;
    }
  }
}

} // namespace moeyard::train::detail
