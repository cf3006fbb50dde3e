#include "train/train_config.h"

#include <c10/util/Exception.h>
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <filesystem>
#include <sstream>

#include "config/yaml_reader.h"
#include "io/hf_checkpoint.h"

namespace moeyard::train {

double Schedule::value(int64_t step, int64_t total) const {
  const int64_t len = steps > 0 ? steps : std::max<int64_t>(total - begin, 1);
  const double f =
      std::clamp(static_cast<double>(step - begin) / len, 0.0, 1.0);
  if (type == "constant") {
    return start;
  }
  if (type == "linear") {
    return start + (end - start) * f;
  }
  if (type == "cosine") {
    return end + (start - end) * 0.5 * (1 + std::cos(M_PI * f));
  }
  // step: start until the move ends, then end
  return f < 1.0 ? start : end;
}

namespace {

// With model.init_from the `moe:` section may change routing options
// (capacity, drop policy, aux coefficients, noise, top-k, selection bias for
// aux-loss-free updates) but nothing the loaded weights depend on.
void check_same_architecture(
    const MoEConfig& was, const MoEConfig& now, const std::string& from) {
  auto same = [&](const char* key, auto a, auto b) {
    if (!(a == b)) {
      std::ostringstream msg;
      msg << "config: moe." << key << " = " << b
          << " changes the architecture of the checkpoint in model.init_from ("
          << from << ": " << a
          << "); with init_from only routing options may change (capacity, "
             "drop policy, aux coefficients, noise, top_k, selection_bias)";
      TORCH_CHECK(false, msg.str());
    }
  };
  same("num_experts", was.num_experts, now.num_experts);
  same("ffn_size", was.ffn_size, now.ffn_size);
  same("moe_every_n", was.moe_every_n, now.moe_every_n);
  same("first_k_dense", was.first_k_dense, now.first_k_dense);
  same("layers", was.layers.size(), now.layers.size());
  same("layers", was.layers == now.layers, true);
  same("num_shared_experts", was.num_shared_experts, now.num_shared_experts);
  same("shared_ffn_size", was.shared_ffn_size, now.shared_ffn_size);
  same("shared_gate", was.shared_gate, now.shared_gate);
  same("router_bias", was.router_bias, now.router_bias);
  same("score_fn", was.routing.score_fn, now.routing.score_fn);
  same("renormalize", was.routing.renormalize, now.routing.renormalize);
  same("scale", was.routing.scale, now.routing.scale);
  same("num_groups", was.routing.num_groups, now.routing.num_groups);
  same("topk_groups", was.routing.topk_groups, now.routing.topk_groups);
  same(
      "weight_on_input",
      was.routing.weight_on_input,
      now.routing.weight_on_input);
}

void read_schedule(config::YamlReader r, Schedule& s) {
  r.get("type", s.type);
  r.get("start", s.start);
  r.get("end", s.end);
  r.get("steps", s.steps);
  r.get("begin", s.begin);
  r.finish();
  for (const char* t : {"constant", "linear", "cosine", "step"}) {
    if (s.type == t) {
      return;
    }
  }
  r.fail(
      "type", "must be constant, linear, cosine or step, got '" + s.type + "'");
}

// Applies "a.b.c=value" to the YAML tree.
void apply_override(YAML::Node root, const std::string& kv) {
  const auto eq = kv.find('=');
  TORCH_CHECK(
      eq != std::string::npos && eq > 0,
      "config: --set expects key.path=value, got '",
      kv,
      "'");
  const std::string path = kv.substr(0, eq);
  YAML::Node value = YAML::Load(kv.substr(eq + 1));
  std::stringstream ss(path);
  std::string part;
  std::vector<std::string> parts;
  while (std::getline(ss, part, '.')) {
    parts.push_back(part);
  }
  YAML::Node node = root;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node next = node[parts[i]];
    if (!next.IsDefined() || next.IsNull()) {
      node[parts[i]] = YAML::Node(YAML::NodeType::Map);
    }
    node.reset(node[parts[i]]);
  }
  node[parts.back()] = value;
}

} // namespace

TrainConfig TrainConfig::load(
    const std::string& file, const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(file);
  } catch (const YAML::Exception& e) {
    TORCH_CHECK(false, "config: cannot read ", file, ": ", e.what());
  }
  for (const auto& o : overrides) {
    apply_override(root, o);
  }
  return parse(root, file, nullptr);
}

TrainConfig TrainConfig::from_text(
    const std::string& text, const nlohmann::json& hf_config) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    TORCH_CHECK(false, "config: cannot parse YAML: ", e.what());
  }
  return parse(root, "", hf_config);
}

TrainConfig TrainConfig::parse(
    YAML::Node root, const std::string& file, const nlohmann::json& hf) {
  TrainConfig c;
  config::YamlReader top(root, "", file);
  auto resolved = std::make_shared<config::YamlReader::Resolved>();
  top.record_into(resolved);
  {
    auto r = top.child("model");
    r.get("init_from", c.init_from);
    if (c.init_from.empty()) {
      read_model_fields(r, c.model);
    } else {
      // The checkpoint's config.json defines the architecture; the YAML may
      // set only the compute dtype and the longest sequence.
      c.hf_config = hf.is_null() ? io::read_hf_config(c.init_from) : hf;
      c.model = io::hf_model_config(
          c.hf_config,
          (std::filesystem::path(c.init_from) / "config.json").string());
      r.get("dtype", c.model.dtype);
      r.get("max_seq_len", c.model.max_seq_len);
      const YAML::Node m = root["model"];
      for (const auto& kv : m) {
        const auto k = kv.first.as<std::string>();
        if (k != "init_from" && k != "dtype" && k != "max_seq_len") {
          r.fail(
              k.c_str(),
              "is set by the checkpoint's config.json (model.init_from: " +
                  c.init_from +
                  "); with init_from only dtype and max_seq_len may be set");
        }
      }
    }
    r.finish();
  }
  {
    const MoEConfig imported = c.model.moe;
    read_moe_config(top.child("moe"), c.model.moe);
    if (!c.init_from.empty()) {
      check_same_architecture(imported, c.model.moe, c.init_from);
    }
  }
  {
    auto r = top.child("data");
    r.get("train", c.data.train);
    r.get("valid", c.data.valid);
    r.get("seq_len", c.data.seq_len);
    r.get("seed", c.data.seed);
    r.finish();
    if (c.data.seq_len < 2) {
      r.fail("seq_len", "must be >= 2");
    }
  }
  {
    auto r = top.child("optim");
    auto& o = c.optim;
    r.get("lr", o.lr);
    r.get("min_lr_ratio", o.min_lr_ratio);
    r.get("lr_schedule", o.lr_schedule);
    r.get("warmup", o.warmup);
    r.get("wsd_decay_fraction", o.wsd_decay_fraction);
    r.get("weight_decay", o.weight_decay);
    r.get("beta1", o.beta1);
    r.get("beta2", o.beta2);
    r.get("eps", o.eps);
    r.get("router_lr_mult", o.router_lr_mult);
    r.get("grad_clip", o.grad_clip);
    r.get("expert_grad_clip", o.expert_grad_clip);
    r.get("freeze", o.freeze);
    if (r.has("groups")) {
      auto list = r.child_list("groups");
      for (auto& g : list) {
        OptimConfig::Group grp;
        g.get("pattern", grp.pattern);
        g.get("lr_mult", grp.lr_mult);
        g.get("weight_decay", grp.weight_decay);
        g.finish();
        if (grp.pattern.empty()) {
          g.fail("pattern", "is required (a substring of parameter names)");
        }
        o.groups.push_back(grp);
      }
    }
    r.finish();
    if (!(o.lr > 0)) {
      r.fail("lr", "must be > 0");
    }
    if (o.lr_schedule != "cosine" && o.lr_schedule != "linear" &&
        o.lr_schedule != "constant" && o.lr_schedule != "wsd") {
      r.fail(
          "lr_schedule",
          "must be cosine, linear, constant or wsd, got '" + o.lr_schedule +
              "'");
    }
  }
  {
    auto r = top.child("train");
    auto& t = c.train;
    r.get("steps", t.steps);
    r.get("micro_batch", t.micro_batch);
    r.get("grad_accum", t.grad_accum);
    r.get("seed", t.seed);
    r.get("threads", t.threads);
    r.get("eval_every", t.eval_every);
    r.get("eval_batches", t.eval_batches);
    r.get("max_bad_steps", t.max_bad_steps);
    r.get("spike_factor", t.spike_factor);
    r.get("spike_window", t.spike_window);
    r.get("device", t.device);
    r.finish();
    if (t.steps < 1) {
      r.fail("steps", "must be >= 1");
    }
    if (t.micro_batch < 1) {
      r.fail("micro_batch", "must be >= 1");
    }
    if (t.grad_accum < 1) {
      r.fail("grad_accum", "must be >= 1");
    }
    if (!(t.spike_factor == 0 || t.spike_factor > 1)) {
      r.fail("spike_factor", "must be 0 (off) or > 1");
    }
    if (t.spike_window < 1) {
      r.fail("spike_window", "must be >= 1");
    }
  }
  {
    auto r = top.child("checkpoint");
    r.get("dir", c.checkpoint.dir);
    r.get("every", c.checkpoint.every);
    r.get("keep_last", c.checkpoint.keep_last);
    r.get("timeout_s", c.checkpoint.timeout_s);
    r.finish();
    if (!(c.checkpoint.timeout_s > 0)) {
      r.fail("timeout_s", "must be > 0");
    }
  }
  {
    auto r = top.child("log");
    r.get("every", c.log.every);
    r.get("metrics", c.log.metrics);
    r.finish();
  }
  {
    auto r = top.child("schedule");
    c.schedule.capacity_factor.start = -1; // "not scheduled"
    c.schedule.top_k.start = -1;
    read_schedule(r.child("capacity_factor"), c.schedule.capacity_factor);
    read_schedule(r.child("top_k"), c.schedule.top_k);
    r.get("bias_update_rate", c.schedule.bias_update_rate);
    r.finish();
  }
  {
    auto r = top.child("parallel");
    auto& p = c.parallel;
    r.get("tensor_parallel", p.tensor_parallel);
    r.get("data_parallel", p.data_parallel);
    r.get("expert_parallel", p.expert_parallel);
    r.get("timeout_s", p.timeout_s);
    r.finish();
    if (p.data_parallel < 0) {
      r.fail("data_parallel", "must be >= 0 (0: WORLD_SIZE / tensor_parallel)");
    }
    if (p.tensor_parallel < 1) {
      r.fail("tensor_parallel", "must be >= 1");
    }
    if (p.expert_parallel < 1) {
      r.fail("expert_parallel", "must be >= 1");
    }
    if (!(p.timeout_s > 0)) {
      r.fail("timeout_s", "must be > 0");
    }
  }
  top.finish();
  c.model.validate();
  c.model.check_tensor_parallel(c.parallel.tensor_parallel);
  if (c.parallel.expert_parallel > 1) {
    TORCH_CHECK(
        c.model.moe.num_experts % c.parallel.expert_parallel == 0,
        "config: moe.num_experts (",
        c.model.moe.num_experts,
        ") must be divisible by parallel.expert_parallel (",
        c.parallel.expert_parallel,
        ")");
    TORCH_CHECK(
        c.parallel.data_parallel == 0 ||
            c.parallel.data_parallel % c.parallel.expert_parallel == 0,
        "config: parallel.data_parallel (",
        c.parallel.data_parallel,
        ") must be divisible by parallel.expert_parallel (",
        c.parallel.expert_parallel,
        "): experts are sharded inside each data-parallel group");
  }
  if (c.data.seq_len > c.model.max_seq_len) {
    TORCH_CHECK(
        false,
        "config: data.seq_len (",
        c.data.seq_len,
        ") exceeds model.max_seq_len (",
        c.model.max_seq_len,
        ")");
  }
  YAML::Emitter out;
  out << root;
  c.text = out.c_str();
  c.resolved = *resolved;
  return c;
}

} // namespace moeyard::train
