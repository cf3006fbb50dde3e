// moeyard._C: loading this module loads libmoeyard, whose static registrars
// define torch.ops.moeyard.*; it also binds the C++ Transformer.

#include <torch/extension.h>

#include <optional>

#include "config/model_yaml.h"
#include "io/checkpoint.h"
#include "io/hf/family.h"
#include "io/hf_checkpoint.h"
#include "io/hf_peft.h"
#include "model/lora.h"
#include "model/transformer.h"
#include "parallel/process_group.h"
#include "python/bindings.h"
#include "text/tokenizer.h"
#include "train/trainer.h"
#include "version.h"

namespace py = pybind11;
using namespace pybind11::literals;

using moeyard::TransformerImpl;

namespace {

py::dict output_dict(const moeyard::TransformerOutput& out) {
  py::dict d;
  d["logits"] = out.logits;
  py::list layers;
  for (const auto& l : out.moe_layers) {
    py::dict s = moeyard::python::moe_stats(l.moe);
    s["layer"] = l.layer;
    layers.append(s);
  }
  d["moe_layers"] = layers;
  return d;
}

at::Tensor opt_mask(const std::optional<at::Tensor>& m) {
  return m.has_value() ? *m : at::Tensor();
}

} // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moeyard native library";
  m.attr("__version__") = moeyard::kVersion;

  m.def(
      "train",
      [](const std::string& config,
         const std::vector<std::string>& overrides,
         const std::string& resume,
         bool overwrite,
         bool allow_data_change) {
        auto cfg = moeyard::train::TrainConfig::load(config, overrides);
        moeyard::train::RunResult r;
        {
          py::gil_scoped_release release;
          r = moeyard::train::run_training(
              cfg, {resume, overwrite, allow_data_change});
        }
        py::dict d;
        d["steps"] = r.steps_done;
        d["final_loss"] = r.final_loss;
        d["final_valid_loss"] = r.final_valid_loss;
        d["skipped_steps"] = r.skipped_steps;
        d["interrupted"] = r.interrupted;
        d["host_reads"] = r.host_reads;
        return d;
      },
      py::arg("config"),
      py::arg("overrides") = std::vector<std::string>{},
      py::arg("resume") = "auto",
      py::arg("overwrite") = false,
      py::arg("allow_data_change") = false,
      "Runs the C++ trainer (the same as `moeyard train`).");

  m.def(
      "rotary_tables",
      [](const std::string& yaml) {
        moeyard::Rotary r(moeyard::config::model_config_from_yaml_string(yaml));
        return py::make_tuple(r.cos, r.sin);
      },
      "cos, sin [max_seq_len, rotary dims] of a model config (for tests)");

  py::class_<TransformerImpl, std::shared_ptr<TransformerImpl>>(
      m, "TransformerImpl")
      .def(py::init([](const std::string& yaml) {
        return std::make_shared<TransformerImpl>(
            moeyard::config::model_config_from_yaml_string(yaml));
      }))
      .def_static(
          "from_file",
          [](const std::string& path) {
            return std::make_shared<TransformerImpl>(
                moeyard::config::model_config_from_yaml_file(path));
          })
      .def(
          "forward",
          [](TransformerImpl& self,
             const at::Tensor& tokens,
             const std::optional<at::Tensor>& mask) {
            return output_dict(self.forward(tokens, opt_mask(mask)));
          },
          py::arg("tokens"),
          py::arg("mask") = py::none())
      .def(
          "loss",
          [](TransformerImpl& self,
             const at::Tensor& tokens,
             const std::optional<at::Tensor>& mask,
             const std::optional<at::Tensor>& loss_mask) {
            auto r = self.loss(tokens, opt_mask(mask), opt_mask(loss_mask));
            py::dict d = output_dict(r.out);
            d["loss"] = r.loss;
            d["ce"] = r.ce;
            d["aux"] = r.aux;
            d["tokens"] = r.tokens;
            return d;
          },
          py::arg("tokens"),
          py::arg("mask") = py::none(),
          py::arg("loss_mask") = py::none())
      .def(
          "named_parameters",
          [](TransformerImpl& self) {
            py::list out;
            for (const auto& p : self.named_parameters()) {
              out.append(py::make_tuple(p.key(), p.value()));
            }
            return out;
          })
      .def(
          "named_buffers",
          [](TransformerImpl& self) {
            py::list out;
            for (const auto& p : self.named_buffers()) {
              out.append(py::make_tuple(p.key(), p.value()));
            }
            return out;
          })
      .def("train", [](TransformerImpl& self, bool on) { self.train(on); })
      .def(
          "set_recompute",
          [](TransformerImpl& self,
             const std::string& mode,
             const std::vector<int64_t>& layers) {
            self.set_recompute(
                moeyard::parse_recompute(mode, "set_recompute: mode"), layers);
          },
          py::arg("mode"),
          py::arg("layers") = std::vector<int64_t>{},
          "activation recompute: none, moe, attention or full, in `layers` "
          "(empty: every block)")
      .def(
          "is_training",
          [](TransformerImpl& self) { return self.is_training(); })
      .def(
          "moe_layer_indices",
          [](TransformerImpl& self) {
            std::vector<int64_t> out;
            for (int64_t i = 0; i < self.config.num_layers; ++i) {
              if (self.config.is_moe_layer(i)) {
                out.push_back(i);
              }
            }
            return out;
          })
      .def(
          "critic_predictions",
          [](TransformerImpl& self, const at::Tensor& tokens) {
            // Each MoE layer's routing critic on its input of this forward
            // (no gradient): [B, S] per layer with a critic.
            at::NoGradGuard g;
            std::vector<moeyard::MoELayerImpl*> layers;
            for (const auto& m : self.layers->children()) {
              auto* block = m->as<moeyard::BlockImpl>();
              if (block->moe && block->moe->critic_w1.defined()) {
                layers.push_back(block->moe.get());
                layers.back()->capture_input = true;
              }
            }
            self.forward(tokens, {});
            std::vector<at::Tensor> out;
            for (auto* l : layers) {
              l->capture_input = false;
              out.push_back(l->critic(l->captured_input));
              l->captured_input = at::Tensor();
            }
            return out;
          },
          py::arg("tokens"),
          "the routing critics' predictions ([B, S] per MoE layer that has "
          "one): the loss increase if each token's lowest pick is skipped")
      .def(
          "update_selection_bias",
          [](TransformerImpl& self,
             int64_t layer,
             const at::Tensor& load,
             double rate) {
            auto block = self.layers[layer]->as<moeyard::BlockImpl>();
            TORCH_CHECK(block->moe, "layer ", layer, " is not an MoE layer");
            block->moe->update_selection_bias(load, rate);
          })
      .def(
          "generate",
          [](TransformerImpl& self,
             const std::vector<int64_t>& prompt,
             int64_t max_new,
             double temperature,
             double top_p,
             uint64_t seed,
             bool use_cache) {
            return self.generate(
                prompt, max_new, temperature, top_p, seed, use_cache);
          },
          py::arg("prompt"),
          py::arg("max_new_tokens") = 32,
          py::arg("temperature") = 0.0,
          py::arg("top_p") = 1.0,
          py::arg("seed") = 0,
          py::arg("use_cache") = true)
      .def(
          "init_weights", &TransformerImpl::init_weights, py::arg("std") = 0.02)
      .def(
          "add_lora",
          [](TransformerImpl& self,
             int64_t rank,
             double alpha,
             double dropout,
             const std::vector<std::string>& targets,
             const std::string& base_dtype) {
            moeyard::LoraOptions o;
            o.enabled = true;
            o.rank = rank;
            o.alpha = alpha;
            o.dropout = dropout;
            o.targets = targets;
            o.base_dtype = base_dtype;
            TORCH_CHECK(rank >= 1, "add_lora: rank must be >= 1, got ", rank);
            return moeyard::apply_lora(self, o);
          },
          py::arg("rank"),
          py::arg("alpha"),
          py::arg("dropout"),
          py::arg("targets"),
          py::arg("base_dtype"))
      .def("lora_merged_weights", [](const TransformerImpl& self) {
        py::dict out;
        for (auto& [name, w] : moeyard::lora_merged_weights(self)) {
          out[py::str(name)] = w;
        }
        return out;
      });

  // Hugging Face checkpoints (csrc/io/hf_checkpoint.h).
  m.def(
      "load_hf",
      [](const std::string& dir, const std::string& dtype) {
        return std::shared_ptr<TransformerImpl>(
            moeyard::io::load_hf_model(dir, dtype).ptr());
      },
      py::arg("dir"),
      py::arg("dtype") = "float32",
      "the C++ model of a Hugging Face checkpoint directory, in dtype "
      "(quantized releases dequantized into it)");
  m.def(
      "save_hf",
      [](const TransformerImpl& model,
         const std::string& family,
         const std::string& out_dir,
         const std::string& base_config_json,
         int64_t max_shard_bytes) {
        const auto base = base_config_json.empty()
                              ? nlohmann::json(nullptr)
                              : nlohmann::json::parse(base_config_json);
        moeyard::io::save_hf(model, family, out_dir, base, max_shard_bytes);
      },
      py::arg("model"),
      py::arg("family"),
      py::arg("out_dir"),
      py::arg("base_config_json") = "",
      py::arg("max_shard_bytes") = int64_t(5) << 30,
      "writes config.json + safetensors in the family's own layout");
  m.def("hf_families", &moeyard::io::hf_families);
  m.def(
      "hf_moe_block",
      [](const std::string& config_json) {
        // A transformers config -> the nn.MoE of its MoE blocks: the
        // constructor's arguments, and where the block keeps each weight
        // (the family's tensor rules, relative to the block).
        namespace hf = moeyard::io::hf;
        const auto hf_config = nlohmann::json::parse(config_json);
        const auto c = moeyard::io::hf_model_config(hf_config, "config");
        const auto& family = hf::family_of(
            hf_config.value("model_type", std::string()), "config");
        py::dict args;
        args["hidden_size"] = c.hidden_size;
        args["ffn_size"] = hf::expert_ffn_size(c);
        args["num_experts"] = c.moe.num_experts;
        args["num_shared_experts"] = c.moe.num_shared_experts;
        args["shared_ffn_size"] = c.moe.shared_ffn_size;
        args["shared_gate"] = c.moe.shared_gate;
        args["router_bias"] = c.moe.router_bias;
        args["selection_bias"] = c.moe.selection_bias;
        args["expert_bias"] = c.moe.expert_bias;
        auto routing = c.moe.routing;
        moeyard::for_each_moe_option(
            routing,
            [&](const char* name, auto& v, const auto&) { args[name] = v; });
        const std::string ours = "{layer}.moe.", theirs = "{moe}.";
        auto relative = [&](const std::string& name) {
          return name.rfind(theirs, 0) == 0 ? name.substr(theirs.size())
                                            : std::string();
        };
        py::list rules;
        for (const auto& r : family.tensors) {
          if (r.ours.rfind(ours, 0) != 0) {
            continue;
          }
          py::list names;
          for (const auto& t : r.theirs) {
            names.append(relative(t));
          }
          rules.append(py::dict(
              "ours"_a = r.ours.substr(ours.size()),
              "theirs"_a = names,
              "fused"_a = relative(r.fused),
              "interleaved"_a = r.interleaved,
              "transposed"_a = r.transposed,
              "optional"_a = r.optional));
        }
        return py::make_tuple(args, rules);
      },
      py::arg("config_json"),
      "the nn.MoE arguments of a transformers config's MoE blocks, and the "
      "family's rules for the block's weights");
  m.def(
      "save_peft",
      &moeyard::io::save_peft,
      py::arg("model"),
      py::arg("family"),
      py::arg("out_dir"),
      py::arg("base_model") = "",
      "writes the model's LoRA factors as a PEFT adapter directory");
  m.def(
      "load_trained",
      [](const std::string& step_dir) {
        return std::shared_ptr<TransformerImpl>(
            moeyard::train::load_model(step_dir).ptr());
      },
      py::arg("step_dir"),
      "the model of a native checkpoint step directory (LoRA factors "
      "included), in eval mode");

  // Native checkpoints (csrc/io/checkpoint.h), for moeyard.checkpoint.
  m.def(
      "load_checkpoint",
      [](const std::string& step_dir, const std::string& kind) {
        moeyard::io::read_manifest(step_dir); // every file's SHA-256
        py::dict out;
        for (auto& [name, t] :
             moeyard::io::load_checkpoint_tensors(step_dir, kind)) {
          out[py::str(name)] = t;
        }
        return out;
      },
      py::arg("step_dir"),
      py::arg("kind") = "model",
      "the full tensors of a checkpoint's files of `kind` (model or "
      "optimizer), whatever the layout it was saved at");

  moeyard::python::bind_moe(m); // csrc/python/bind_moe.cpp

  // Hugging Face tokenizer.json (csrc/text/tokenizer.h).
  py::class_<moeyard::Tokenizer>(m, "Tokenizer")
      .def_static("from_file", &moeyard::Tokenizer::from_file, py::arg("path"))
      .def_static(
          "from_str",
          [](const std::string& json) {
            return moeyard::Tokenizer::from_json_string(json);
          },
          py::arg("json"))
      .def(
          "encode",
          &moeyard::Tokenizer::encode,
          py::arg("text"),
          py::arg("add_special_tokens") = false)
      .def(
          "decode",
          [](const moeyard::Tokenizer& t,
             const std::vector<int64_t>& ids,
             bool skip_special_tokens) {
            // Invalid UTF-8 cannot come back (bytes are decoded lossily),
            // so this never raises UnicodeDecodeError.
            return t.decode(ids, skip_special_tokens);
          },
          py::arg("ids"),
          py::arg("skip_special_tokens") = true)
      .def_property_readonly("vocab_size", &moeyard::Tokenizer::vocab_size)
      .def_property_readonly("bos_id", &moeyard::Tokenizer::bos_id)
      .def_property_readonly("eos_id", &moeyard::Tokenizer::eos_id)
      .def("token_to_id", &moeyard::Tokenizer::token_to_id, py::arg("token"));
}
