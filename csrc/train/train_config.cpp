#include "train/train_config.h"

#include <c10/util/Exception.h>
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "config/lora_yaml.h"
#include "config/model_yaml.h"
#include "config/yaml_reader.h"
#include "io/checkpoint.h"
#include "io/hf_checkpoint.h"
#include "train/recompute_config.h"
#include "train/run_dir.h"

namespace moeyard::train {

Schedule OptimConfig::lr_factor() const {
  Schedule s;
  s.enabled = true;
  s.type = lr_schedule;
  s.start = 1.0;
  s.end = min_lr_ratio;
  s.warmup = warmup;
  s.begin = warmup;
  s.decay_fraction = wsd_decay_fraction;
  return s;
}

namespace {

using config::Range;

// Names a key in a message about two keys: "data.seq_len (x.yaml:9)".
using KeyNamer = ModelConfig::KeyNamer;

// With model.init_from the `moe:` section may change routing options
// (capacity, drop policy, aux coefficients, noise, top-k, selection bias for
// aux-loss-free updates) but nothing the loaded weights depend on.
void check_same_architecture(
    const MoEConfig& was,
    const MoEConfig& now,
    const std::string& from,
    const KeyNamer& name) {
  auto same = [&](const char* key, auto a, auto b) {
    if (!(a == b)) {
      std::ostringstream msg;
      msg << "config: " << name(std::string("moe.") + key) << " = " << b
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

// data.train: a path or glob, a list of them, or a list of {path, weight}
// (weights > 0, every item one); `node` is the value given (null: the
// default stays).
void read_train_sources(
    config::YamlReader& r,
    const YAML::Node& node,
    std::vector<io::CorpusSource>& out) {
  if (!node || node.IsNull()) {
    return;
  }
  if (node.IsSequence() && node.size() > 0 && node[0].IsMap()) {
    out.clear();
    for (auto& item : r.child_list("train")) {
      io::CorpusSource s;
      item.get("path", s.path);
      item.get("weight", s.weight, Range::greater_than(0));
      item.finish();
      if (s.path.empty()) {
        item.fail("path", "is required (a file or a glob)");
      }
      if (!item.has("weight")) {
        item.fail("weight", "is required in a list of {path, weight} (> 0)");
      }
      out.push_back(s);
    }
  } else if (node.IsSequence()) {
    std::vector<std::string> paths;
    r.get("train", paths);
    out.clear();
    for (const auto& p : paths) {
      out.push_back({p, 0});
    }
  } else {
    std::string path;
    r.get("train", path);
    out = {{path, 0}};
  }
  for (const auto& s : out) {
    if (s.path.empty()) {
      r.fail("train", "names an empty path");
    }
  }
  if (out.empty()) {
    r.fail("train", "names no file");
  }
}

// The adaptive L1 of relu routing multiplies moe.switch_coeff: it needs that
// routing, a coefficient to start from and no schedule of its own.
void check_relu_l1(const TrainConfig& c, const KeyNamer& name) {
  const double mult = c.schedule.relu_l1_mult;
  if (mult == 0) {
    return;
  }
  const std::string key = name("schedule.relu_l1_mult");
  TORCH_CHECK(
      mult > 1,
      "config: ",
      key,
      " = ",
      config::show_number(mult),
      " must be 0 (off) or > 1");
  const auto& o = c.model.moe.routing;
  TORCH_CHECK(
      o.routing == "relu",
      "config: ",
      key,
      " > 0 adapts the L1 of relu routing: it needs ",
      name("moe.routing"),
      ": relu, got '",
      o.routing,
      "'");
  TORCH_CHECK(
      o.switch_coeff > 0 && !c.schedule.options.count("switch_coeff"),
      "config: ",
      key,
      " > 0 multiplies ",
      name("moe.switch_coeff"),
      ": it needs a value > 0 to start from (ReMoE: 1e-8) and no "
      "schedule.switch_coeff, got ",
      config::show_number(o.switch_coeff));
}

// An integer option takes each step's rounded value: no warmup ramp from 0,
// and every value the run will use must suit the model (e.g. num_groups
// dividing num_experts), checked against the other options' moe: values.
void check_integer_schedules(const TrainConfig& c, const KeyNamer& name) {
  if (c.model.moe.num_experts == 0) {
    return;
  }
  MoEOptions o = c.model.moe.routing;
  for_each_moe_option(o, [&](const char* key, auto& v, const auto&) {
    using T = std::decay_t<decltype(v)>;
    const auto it = c.schedule.options.find(key);
    if constexpr (std::is_same_v<T, int64_t>) {
      if (it == c.schedule.options.end()) {
        return;
      }
      const Schedule& sched = it->second;
      const std::string where = name(std::string("schedule.") + key);
      TORCH_CHECK(
          sched.warmup == 0,
          "config: ",
          where,
          ".warmup: an integer option has no warmup (",
          key,
          " would start at 0)");
      std::set<int64_t> values;
      for (int64_t step = 0; step < c.train.steps; ++step) {
        values.insert(std::llround(sched.value(step, c.train.steps)));
      }
      const T was = v;
      for (const int64_t x : values) {
        v = x;
        check_moe_options(
            o,
            c.model.moe.num_experts,
            "config: " + where + " gives " + key + " = " + std::to_string(x));
      }
      v = was;
    }
  });
}

// Applies "a.b.c=value" to the YAML tree and records it in `sources`.
void apply_override(
    YAML::Node root, const std::string& kv, config::Sources& sources) {
  const auto eq = kv.find('=');
  TORCH_CHECK(
      eq != std::string::npos && eq > 0,
      "config: --set expects key.path=value, got '",
      kv,
      "'");
  const std::string path = kv.substr(0, eq);
  YAML::Node value;
  try {
    value = YAML::Load(kv.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    TORCH_CHECK(
        false, "config: --set ", kv, ": cannot parse the value: ", e.what());
  }
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
  sources.add_override(path, kv);
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
  auto sources = std::make_shared<config::Sources>();
  sources->file = file;
  for (const auto& o : overrides) {
    apply_override(root, o, *sources);
  }
  return parse(root, sources, nullptr);
}

TrainConfig TrainConfig::from_text(
    const std::string& text, const nlohmann::json& hf_config) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    TORCH_CHECK(false, "config: cannot parse YAML: ", e.what());
  }
  return parse(root, std::make_shared<config::Sources>(), hf_config);
}

TrainConfig TrainConfig::parse(
    YAML::Node root,
    std::shared_ptr<const config::Sources> sources,
    const nlohmann::json& hf) {
  TrainConfig c;
  config::YamlReader top(root, "", sources);
  auto resolved = std::make_shared<config::YamlReader::Resolved>();
  top.record_into(resolved);
  {
    auto r = top.child("model");
    r.get("init_from", c.init_from);
    if (c.init_from.empty()) {
      config::read_model_fields(r, c.model);
    } else {
      // The checkpoint's config.json defines the architecture; the YAML may
      // set only the compute dtype and the longest sequence.
      c.hf_config = hf.is_null() ? io::read_hf_config(c.init_from) : hf;
      c.model = io::hf_model_config(
          c.hf_config,
          (std::filesystem::path(c.init_from) / "config.json").string());
      config::read_model_field(r, c.model, "dtype");
      config::read_model_field(r, c.model, "max_seq_len");
      const YAML::Node m = root["model"];
      for (const auto& kv : m) {
        const auto k = kv.first.as<std::string>();
        if (k != "init_from" && k != "dtype" && k != "max_seq_len") {
          r.fail(
              k,
              "is set by the checkpoint's config.json (model.init_from: " +
                  c.init_from +
                  "); with init_from only dtype and max_seq_len may be set");
        }
      }
    }
    r.finish();
  }
  // Keys in messages about two keys; a key the YAML does not give is a
  // default, or with init_from (model, moe) from the checkpoint's config.
  const KeyNamer name = [&](const std::string& key) {
    const std::string loc = top.locate(key);
    if (!loc.empty()) {
      return key + loc;
    }
    const bool from_hf = !c.init_from.empty() && (key.rfind("model.", 0) == 0 ||
                                                  key.rfind("moe.", 0) == 0);
    return key +
           (from_hf ? " (" + c.init_from + "/config.json)" : " (default)");
  };
  {
    const MoEConfig imported = c.model.moe;
    config::read_moe_config(top.child("moe"), c.model.moe);
    if (!c.init_from.empty()) {
      check_same_architecture(imported, c.model.moe, c.init_from, name);
    }
  }
  {
    auto r = top.child("data");
    const YAML::Node& given = root;
    read_train_sources(
        r, given["data"] ? given["data"]["train"] : YAML::Node(), c.data.train);
    r.get("valid", c.data.valid);
    r.get("raw_dtype", c.data.raw_dtype);
    if (!c.data.raw_dtype.empty() && c.data.raw_width() == 0) {
      r.fail(
          "raw_dtype",
          "must be uint16, uint32 or \"\" (no raw token files), got '" +
              c.data.raw_dtype + "'");
    }
    r.get("seq_len", c.data.seq_len, Range::at_least(2)); // <= max_seq_len
    r.get("seed", c.data.seed, Range::at_least(0));
    r.finish();
  }
  {
    auto r = top.child("optim");
    auto& o = c.optim;
    r.get("lr", o.lr, Range::greater_than(0));
    r.get("min_lr_ratio", o.min_lr_ratio, Range::closed(0, 1));
    r.get("lr_schedule", o.lr_schedule);
    r.get("warmup", o.warmup, Range::at_least(0));
    r.get("wsd_decay_fraction", o.wsd_decay_fraction, Range::open_closed(0, 1));
    r.get("weight_decay", o.weight_decay, Range::at_least(0));
    r.get("beta1", o.beta1, Range::closed_open(0, 1));
    r.get("beta2", o.beta2, Range::closed_open(0, 1));
    r.get("eps", o.eps, Range::greater_than(0));
    r.get("router_lr_mult", o.router_lr_mult, Range::at_least(0));
    r.get("grad_clip", o.grad_clip, Range::at_least(0));
    r.get("expert_grad_clip", o.expert_grad_clip, Range::at_least(0));
    r.get("freeze", o.freeze);
    r.get("shard", o.shard);
    for (auto& g : r.child_list("groups")) {
      OptimConfig::Group grp;
      g.get("pattern", grp.pattern);
      g.get("lr_mult", grp.lr_mult, Range::at_least(0));
      g.get("weight_decay", grp.weight_decay, Range::at_least(0));
      g.finish();
      if (grp.pattern.empty()) {
        g.fail("pattern", "is required (a substring of parameter names)");
      }
      o.groups.push_back(grp);
    }
    r.finish();
    if (o.lr_schedule != "cosine" && o.lr_schedule != "linear" &&
        o.lr_schedule != "constant" && o.lr_schedule != "wsd") {
      r.fail(
          "lr_schedule",
          "must be cosine, linear, constant or wsd, got '" + o.lr_schedule +
              "'");
    }
    if (o.shard != "none" && o.shard != "optimizer" &&
        o.shard != "optimizer+grads") {
      r.fail(
          "shard",
          "must be none, optimizer or optimizer+grads, got '" + o.shard + "'");
    }
  }
  {
    auto r = top.child("train");
    auto& t = c.train;
    r.get("steps", t.steps, Range::at_least(1));
    r.get("micro_batch", t.micro_batch, Range::at_least(1));
    r.get("grad_accum", t.grad_accum, Range::at_least(1));
    r.get("seed", t.seed, Range::at_least(0));
    r.get("threads", t.threads, Range::at_least(0));
    r.get("eval_every", t.eval_every, Range::at_least(0));
    r.get("eval_batches", t.eval_batches, Range::at_least(1));
    r.get("max_bad_steps", t.max_bad_steps, Range::at_least(1));
    r.get("spike_factor", t.spike_factor, Range::at_least(0));
    r.get("spike_window", t.spike_window, Range::at_least(1));
    r.get("device", t.device);
    read_recompute(r, c, name); // train/recompute_config.cpp
    r.finish();
    if (t.spike_factor > 0 && t.spike_factor <= 1) {
      r.fail(
          "spike_factor",
          config::show_number(t.spike_factor) +
              " would skip ordinary steps: use 0 (off) or a factor > 1");
    }
  }
  {
    auto r = top.child("checkpoint");
    r.get("dir", c.checkpoint.dir);
    r.get("every", c.checkpoint.every, Range::at_least(0));
    r.get("keep_last", c.checkpoint.keep_last, Range::at_least(1));
    r.get("timeout_s", c.checkpoint.timeout_s, Range::greater_than(0));
    r.finish();
  }
  {
    auto r = top.child("log");
    r.get("every", c.log.every, Range::at_least(1));
    r.get("metrics", c.log.metrics);
    r.get("tensorboard", c.log.tensorboard);
    r.get("wandb", c.log.wandb);
    r.get("wandb_mode", c.log.wandb_mode);
    if (c.log.wandb_mode != "online" && c.log.wandb_mode != "offline") {
      r.fail(
          "wandb_mode",
          "must be online or offline, got '" + c.log.wandb_mode + "'");
    }
    r.get("peak_tflops", c.log.peak_tflops, Range::at_least(0));
    r.finish();
  }
  {
    auto r = top.child("schedule");
    const int64_t experts = c.model.moe.num_experts;
    const auto top_k_values = Range::closed(1, static_cast<double>(experts))
                                  .shown_as(
                                      "[1, " + name("moe.num_experts") + " = " +
                                      std::to_string(experts) + "]");
    const MoEOptions options;
    for_each_moe_option(options, [&](const char* key, auto& v, const auto& a) {
      using T = std::decay_t<decltype(v)>;
      if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, double>) {
        Schedule s;
        // The option's own range, but top_k at most num_experts and a
        // capacity factor > 0 (a schedule cannot make routing dropless).
        const std::string k = key;
        read_schedule(
            r.child(key),
            s,
            k == "top_k"             ? top_k_values
            : k == "capacity_factor" ? Range::greater_than(0)
                                     : a.range);
        if (s.enabled) {
          c.schedule.options[key] = s;
        }
      }
    });
    r.get("bias_update_rate", c.schedule.bias_update_rate, Range::at_least(0));
    r.get("null_bias_rate", c.schedule.null_bias_rate, Range::at_least(0));
    r.get(
        "null_target_fraction",
        c.schedule.null_target_fraction,
        Range::closed(0, 1));
    r.get("relu_l1_mult", c.schedule.relu_l1_mult, Range::at_least(0));
    r.finish();
    check_integer_schedules(c, name);
  }
  {
    auto r = top.child("parallel");
    auto& p = c.parallel;
    // data_parallel 0: WORLD_SIZE / tensor_parallel
    r.get("data_parallel", p.data_parallel, Range::at_least(0));
    r.get("tensor_parallel", p.tensor_parallel, Range::at_least(1));
    r.get("expert_parallel", p.expert_parallel, Range::at_least(1));
    r.get("timeout_s", p.timeout_s, Range::greater_than(0));
    r.finish();
  }
  {
    auto r = top.child("critic");
    auto& k = c.critic;
    r.get("every", k.every, Range::at_least(0));
    r.get("clip", k.clip, Range::greater_than(0));
    r.get("skip_budget", k.skip_budget, Range::closed_open(0, 1));
    r.get("skip_in_training", k.skip_in_training);
    r.finish();
    if (k.skip_budget > 0 && c.model.moe.critic_hidden == 0) {
      r.fail(
          "skip_budget",
          config::show_number(k.skip_budget) +
              " needs a critic: set moe.critic_hidden > 0");
    }
    if (k.skip_budget > 0 && c.data.valid.empty()) {
      r.fail(
          "skip_budget",
          config::show_number(k.skip_budget) +
              " calibrates on the validation batches: set data.valid");
    }
  }
  {
    auto r = top.child("distill");
    auto& d = c.distill;
    r.get("teacher", d.teacher);
    r.get("kl_coeff", d.kl_coeff, Range::at_least(0));
    r.get("ce_coeff", d.ce_coeff, Range::at_least(0));
    r.get("init_student", d.init_student);
    r.get("null_logit_offset", d.null_logit_offset, Range::any());
    r.finish();
    const YAML::Node given = root["distill"];
    if (!d.enabled() && given && !given.IsNull() && given.size() > 0) {
      r.fail("teacher", "is required by the other distill: keys");
    }
    if (d.enabled() && d.kl_coeff == 0 && d.ce_coeff == 0) {
      r.fail(
          "kl_coeff",
          "and distill.ce_coeff are both 0: nothing but the aux losses would "
          "train");
    }
  }
  if (!c.init_from.empty() && c.model.moe.routing.null_experts > 0 &&
      !(c.distill.enabled() && c.distill.init_student)) {
    TORCH_CHECK(
        false,
        "config: ",
        name("moe.null_experts"),
        " = ",
        c.model.moe.routing.null_experts,
        " adds router rows the checkpoint in model.init_from (",
        c.init_from,
        ") lacks: set distill.teacher to that checkpoint, whose real router "
        "rows then initialize them (distill.init_student; distill.kl_coeff: "
        "0 and ce_coeff: 1 fine-tune without distillation)");
  }
  config::read_finetune(top.child("finetune"), c.lora);
  top.finish();
  c.model.validate(name);
  c.model.check_tensor_parallel(c.parallel.tensor_parallel, name);
  parallel::check_layout_sizes(c.layout_sizes(), name);
  auto is = [&](const std::string& key, int64_t v) {
    return name(key) + " = " + std::to_string(v);
  };
  TORCH_CHECK(
      c.data.seq_len <= c.model.max_seq_len,
      "config: ",
      is("data.seq_len", c.data.seq_len),
      " exceeds ",
      is("model.max_seq_len", c.model.max_seq_len));
  TORCH_CHECK(
      c.schedule.null_bias_rate == 0 ||
          (c.model.moe.routing.null_experts > 0 && c.model.moe.selection_bias),
      "config: ",
      name("schedule.null_bias_rate"),
      " > 0 moves the null experts' selection bias: it needs ",
      name("moe.null_experts"),
      " > 0 and ",
      name("moe.selection_bias"),
      ": true");
  check_relu_l1(c, name);
  YAML::Emitter out;
  out << root;
  c.text = out.c_str();
  c.resolved = *resolved;
  return c;
}

TeacherSource find_teacher(const std::string& path, bool verify) {
  namespace fs = std::filesystem;
  fs::path p(path);
  TORCH_CHECK(
      fs::is_directory(p),
      "config: distill.teacher (",
      path,
      ") is not a directory; expected a moeyard checkpoint (a step or run "
      "directory) or a Hugging Face checkpoint directory");
  if (!fs::exists(p / "manifest.json") && !fs::exists(p / "config.json")) {
    if (const auto latest = run_dir::read_latest(p)) {
      p /= *latest;
    }
  }
  TeacherSource t;
  t.dir = p.string();
  auto read_json = [](const fs::path& f) {
    std::ifstream in(f);
    return nlohmann::json::parse(in);
  };
  if (fs::exists(p / "manifest.json")) {
    const auto manifest =
        verify ? io::read_manifest(p) : read_json(p / "manifest.json");
    nlohmann::json hf = nullptr; // fine-tuned from a Hugging Face checkpoint
    if (fs::exists(p / "hf_config.json")) {
      hf = read_json(p / "hf_config.json");
    }
    t.config =
        TrainConfig::from_text(manifest.at("config").get<std::string>(), hf);
  } else if (fs::exists(p / "config.json")) {
    t.hf = io::read_hf_config(t.dir);
    t.config.model = io::hf_model_config(t.hf, (p / "config.json").string());
  } else {
    TORCH_CHECK(
        false,
        "config: distill.teacher (",
        path,
        ") holds neither a moeyard checkpoint (manifest.json, or a `latest` "
        "file naming one) nor a Hugging Face checkpoint (config.json)");
  }
  return t;
}

parallel::LayoutSizes TrainConfig::layout_sizes() const {
  return {
      parallel.data_parallel,
      parallel.tensor_parallel,
      parallel.expert_parallel,
      model.moe.num_experts};
}

} // namespace moeyard::train
