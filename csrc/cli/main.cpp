// The moeyard command line: train, ops, version.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <optional>
#include <thread>

#include "io/hf_checkpoint.h"
#include "io/hf_peft.h"
#include "parallel/process_group.h"
#include "text/tokenizer.h"
#include "train/plan.h"
#include "train/trainer.h"
#include "version.h"

namespace {

// Every MoE layer's moe.skip_ratio.
void set_skip_ratio(moeyard::TransformerImpl& model, double ratio) {
  for (const auto& layer : *model.layers) {
    auto* block = layer->as<moeyard::BlockImpl>();
    if (block->moe) {
      block->moe->options.skip_ratio = ratio;
    }
  }
}

} // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeyard: sparse Mixture-of-Experts training in C++"};
  app.require_subcommand(1);
  auto* version = app.add_subcommand("version", "print the version");
  auto* ops = app.add_subcommand("ops", "list the registered moeyard ops");
  auto* train = app.add_subcommand("train", "train a model from a YAML config");
  std::string config, resume = "auto";
  std::vector<std::string> overrides;
  train->add_option("--config,-c", config, "YAML config (see docs/training.md)")
      ->required()
      ->check(CLI::ExistingFile);
  train->add_option(
      "--set", overrides, "override a key: --set optim.lr=1e-3 (repeatable)");
  train->add_option(
      "--resume",
      resume,
      "auto (continue from <checkpoint.dir>/latest), never, or a checkpoint "
      "dir");
  moeyard::train::RunOptions run_options;
  train->add_flag(
      "--overwrite",
      run_options.overwrite,
      "start although checkpoint.dir holds newer checkpoints (another run's, "
      "or after --resume of an older step); they are deleted at this run's "
      "first checkpoint");
  train->add_flag(
      "--allow-data-change",
      run_options.allow_data_change,
      "resume although data.train, data.seed or data.seq_len differ from "
      "the checkpoint's");
  auto* gen = app.add_subcommand(
      "generate",
      "sample text from a checkpoint (byte-level or with its tokenizer.json)");
  std::string ckpt, prompt, tokenizer_path;
  int64_t max_new = 200;
  double temperature = 0.8, top_p = 0.95;
  uint64_t seed = 0;
  gen->add_option(
         "--checkpoint",
         ckpt,
         "checkpoint directory (step_<N>/) or run directory")
      ->required();
  gen->add_option("--prompt,-p", prompt, "prompt text")->required();
  gen->add_option(
      "--max-new-tokens,-n", max_new, "tokens to sample (default 200)");
  gen->add_option("--temperature,-t", temperature, "0: greedy (default 0.8)");
  gen->add_option("--top-p", top_p, "nucleus sampling mass (default 0.95)");
  gen->add_option("--seed", seed, "sampling seed (default 0)");
  double skip_ratio = 0;
  gen->add_option(
      "--skip-ratio",
      skip_ratio,
      "skip each routing pick whose weight is below this times the token's "
      "largest (moe.skip_ratio) and report tokens/s against plain top-K "
      "(default 0: the checkpoint's routing)");
  gen->add_option(
         "--tokenizer",
         tokenizer_path,
         "a Hugging Face tokenizer.json (default: <checkpoint>/tokenizer.json "
         "if present, else byte-level)")
      ->check(CLI::ExistingFile);
  auto* conv = app.add_subcommand(
      "convert",
      "export a checkpoint in Hugging Face format (docs/checkpoints.md)");
  std::string conv_to = "hf", conv_ckpt, conv_out, conv_family;
  int64_t shard_mb = 5000;
  conv->add_option(
          "--to",
          conv_to,
          "target format: hf (a LoRA model's weights merged) or peft (its "
          "LoRA adapter)")
      ->check(CLI::IsMember({"hf", "peft"}));
  conv->add_option(
          "--checkpoint", conv_ckpt, "checkpoint directory or run directory")
      ->required();
  conv->add_option("--out,-o", conv_out, "output directory")->required();
  conv->add_option(
      "--family",
      conv_family,
      "model_type to write (default: that of model.init_from)");
  conv->add_option(
      "--max-shard-mb", shard_mb, "largest safetensors file (default 5000)");
  auto* plan = app.add_subcommand(
      "plan",
      "print what each rank of a launch holds and sends: parameters, "
      "gradients, optimizer state, activations, load peak, communication "
      "(docs/scaling.md)");
  std::string plan_config;
  std::vector<std::string> plan_overrides;
  int64_t plan_world = 1;
  plan->add_option("--config,-c", plan_config, "YAML config")
      ->required()
      ->check(CLI::ExistingFile);
  plan->add_option("--world,-n", plan_world, "processes (default 1)")
      ->check(CLI::PositiveNumber);
  plan->add_option(
      "--set", plan_overrides, "override a key, as for train (repeatable)");
  bool plan_as_json = false;
  plan->add_flag("--json", plan_as_json, "print JSON (bytes) instead");
  auto* dist = app.add_subcommand(
      "dist-check",
      "check a multi-process launch (torchrun or srun): rendezvous, "
      "all-reduce and all-to-all over every rank");
  double dist_timeout = 60;
  int64_t exit_rank = -1, stall_rank = -1;
  dist->add_option(
      "--timeout", dist_timeout, "rendezvous/collective timeout, s (60)");
  std::string dist_device = "cpu";
  dist->add_option(
      "--device",
      dist_device,
      "cpu (Gloo) or cuda (NCCL, GPU LOCAL_RANK of each process)");
  dist->add_option(
          "--exit-rank",
          exit_rank,
          "this rank exits before the collectives (tests the peer-failure "
          "error)")
      ->group("");
  dist->add_option(
          "--stall-rank",
          stall_rank,
          "this rank sleeps 3 timeouts before the collectives (tests the "
          "hung-peer error)")
      ->group("");
  CLI11_PARSE(app, argc, argv);
  // A run directory stands for its latest checkpoint.
  auto checkpoint_dir = [](const std::string& d) {
    std::filesystem::path dir(d);
    if (std::filesystem::exists(dir / "latest")) {
      std::ifstream latest(dir / "latest");
      std::string name;
      latest >> name;
      dir /= name;
    }
    return dir;
  };
  try {
    if (*version) {
      std::cout << "moeyard " << moeyard::kVersion << "\n";
    } else if (*ops) {
      for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
        if (name.name.rfind("moeyard::", 0) == 0) {
          std::cout << name.name << "\n";
        }
      }
    } else if (*gen) {
      TORCH_CHECK(
          skip_ratio >= 0 && skip_ratio < 1,
          "generate: --skip-ratio must be in [0, 1), got ",
          skip_ratio);
      const auto dir = checkpoint_dir(ckpt);
      auto model = moeyard::train::load_model(dir.string());
      // Greedy or sampled continuation of `ids`, timed; with --skip-ratio
      // also without it (the same seed), the two rates side by side.
      auto sample = [&](const std::vector<int64_t>& ids,
                        const std::vector<int64_t>& eos) {
        auto timed = [&](std::optional<double> ratio) {
          if (ratio) {
            set_skip_ratio(*model, *ratio);
          }
          const auto t0 = std::chrono::steady_clock::now();
          auto out = model->generate(
              ids, max_new, temperature, top_p, seed, /*use_cache=*/true, eos);
          const std::chrono::duration<double> s =
              std::chrono::steady_clock::now() - t0;
          return std::make_pair(out, out.size() / std::max(s.count(), 1e-9));
        };
        if (skip_ratio == 0) {
          auto [out, rate] = timed(std::nullopt);
          std::cerr << "moeyard generate: " << out.size() << " tokens, "
                    << c10::str(std::round(rate * 10) / 10) << " tokens/s\n";
          return out;
        }
        const auto plain = timed(0.0);
        auto [out, rate] = timed(skip_ratio);
        std::cerr << "moeyard generate: " << out.size() << " tokens, "
                  << c10::str(std::round(rate * 10) / 10)
                  << " tokens/s with skip_ratio " << skip_ratio << ", "
                  << c10::str(std::round(plain.second * 10) / 10)
                  << " tokens/s with plain top-K (x"
                  << c10::str(std::round(rate / plain.second * 100) / 100)
                  << ")\n";
        return out;
      };
      if (tokenizer_path.empty() &&
          std::filesystem::exists(dir / "tokenizer.json")) {
        tokenizer_path = (dir / "tokenizer.json").string();
      }
      if (!tokenizer_path.empty()) {
        const auto tok = moeyard::Tokenizer::from_file(tokenizer_path);
        TORCH_CHECK(
            tok.vocab_size() <= model->config.vocab_size,
            "generate: the tokenizer ",
            tokenizer_path,
            " has ",
            tok.vocab_size(),
            " tokens, more than the model's vocab_size ",
            model->config.vocab_size);
        // The EOS of the checkpoint's Hugging Face config wins over the
        // tokenizer's guess.
        std::vector<int64_t> eos;
        if (std::filesystem::exists(dir / "hf_config.json")) {
          std::ifstream in(dir / "hf_config.json");
          const auto cfg = nlohmann::json::parse(in);
          const auto e = cfg.value("eos_token_id", nlohmann::json());
          if (e.is_number_integer()) {
            eos.push_back(e.get<int64_t>());
          } else if (e.is_array()) {
            for (const auto& x : e) {
              eos.push_back(x.get<int64_t>());
            }
          }
        }
        if (eos.empty() && tok.eos_id()) {
          eos.push_back(*tok.eos_id());
        }
        const auto ids = tok.encode(prompt, /*add_special_tokens=*/true);
        std::cerr << "moeyard generate: tokenizer " << tokenizer_path << " ("
                  << tok.kind() << ", " << tok.vocab_size()
                  << " tokens), prompt of " << ids.size() << " tokens, eos "
                  << (eos.empty() ? std::string("none") : c10::Join(",", eos))
                  << "\n";
        auto out = sample(ids, eos);
        const auto stop = std::find_if(out.begin(), out.end(), [&](int64_t t) {
          return std::find(eos.begin(), eos.end(), t) != eos.end();
        });
        out.erase(stop, out.end());
        // Decode prompt and continuation together (a character may span
        // both); print the prompt as given, then what follows it.
        std::vector<int64_t> all(ids);
        all.insert(all.end(), out.begin(), out.end());
        const auto text = tok.decode(all);
        const auto head = tok.decode(ids);
        std::cout << (text.rfind(head, 0) == 0
                          ? prompt + text.substr(head.size())
                          : text)
                  << "\n";
      } else {
        std::cerr << "moeyard generate: byte-level (no tokenizer.json)\n";
        TORCH_CHECK(
            model->config.vocab_size >= 256,
            "generate: byte-level prompts need model.vocab_size >= 256, got ",
            model->config.vocab_size);
        std::vector<int64_t> tokens(prompt.begin(), prompt.end());
        for (auto& t : tokens) {
          t = static_cast<unsigned char>(t);
        }
        const auto out = sample(tokens, {});
        std::string text(prompt);
        for (auto t : out) {
          text.push_back(static_cast<char>(t < 256 ? t : '?'));
        }
        std::cout << text << "\n";
      }
    } else if (*dist) {
      namespace par = moeyard::parallel;
      const auto env = par::LaunchEnv::from_env();
      const auto timeout =
          std::chrono::milliseconds(static_cast<int64_t>(dist_timeout * 1000));
      TORCH_CHECK(
          dist_device == "cpu" || dist_device == "cuda",
          "dist-check: --device must be cpu or cuda, got '",
          dist_device,
          "'");
      auto world =
          dist_device == "cpu"
              ? par::make_world_group(env, "world", timeout)
              : par::make_nccl_group(
                    par::make_store(env, timeout),
                    env,
                    "world",
                    [&] {
                      std::vector<int64_t> r(env.world_size);
                      std::iota(r.begin(), r.end(), 0);
                      return r;
                    }(),
                    timeout,
                    c10::Device(
                        c10::kCUDA,
                        static_cast<c10::DeviceIndex>(env.local_rank)));
      if (env.rank == exit_rank) {
        std::cerr << "rank " << env.rank << ": exiting early (--exit-rank)\n";
        return 3;
      }
      if (env.rank == stall_rank) {
        std::this_thread::sleep_for(3 * timeout);
      }
      const int64_t W = env.world_size, r = env.rank;
      // On the group's device (the GPU under NCCL), checked on the CPU.
      auto t = at::full({3}, double(r + 1), at::kDouble).to(world.device);
      world.all_reduce_sum(t);
      t = t.cpu();
      const double want_sum = W * (W + 1) / 2.0;
      TORCH_CHECK(
          (t == want_sum).all().item<bool>(),
          "dist-check: all_reduce gave ",
          t[0].item<double>(),
          ", expected ",
          want_sum);
      // Row j of rank r's input goes to rank j and holds 100 r + j.
      auto in = (at::arange(W, at::kDouble) + 100.0 * r).view({W, 1});
      auto out = world
                     .all_to_all(
                         in.to(world.device),
                         std::vector<int64_t>(W, 1),
                         std::vector<int64_t>(W, 1))
                     .cpu();
      auto want = (at::arange(W, at::kDouble) * 100.0 + r).view({W, 1});
      TORCH_CHECK(
          at::equal(out, want), "dist-check: all_to_all gave wrong rows");
      world.barrier();
      std::cout << "rank " << r << "/" << W << " (" << env.source
                << (dist_device == "cuda" ? ", NCCL" : "")
                << "): all_reduce ok (" << t[0].item<double>()
                << "), all_to_all ok\n";
    } else if (*conv) {
      const auto dir = checkpoint_dir(conv_ckpt);
      auto model = moeyard::train::load_model(dir.string());
      nlohmann::json base = nullptr;
      if (std::filesystem::exists(dir / "hf_config.json")) {
        std::ifstream in(dir / "hf_config.json");
        base = nlohmann::json::parse(in);
      }
      if (conv_family.empty()) {
        TORCH_CHECK(
            base.is_object() && base.contains("model_type"),
            "convert: ",
            dir.string(),
            " was not fine-tuned from a Hugging Face checkpoint; name the "
            "family with --family (one of: ",
            c10::Join(", ", moeyard::io::hf_families()),
            ")");
        conv_family = base.at("model_type").get<std::string>();
      }
      if (conv_to == "peft") {
        moeyard::io::save_peft(
            *model,
            conv_family,
            conv_out,
            base.is_object() ? base.value("_name_or_path", "") : "");
        std::cout << "wrote " << conv_family << " LoRA adapter to " << conv_out
                  << "\n";
        return 0;
      }
      moeyard::io::save_hf(
          *model, conv_family, conv_out, base, shard_mb * (int64_t(1) << 20));
      if (std::filesystem::exists(dir / "tokenizer.json")) {
        std::filesystem::copy_file(
            dir / "tokenizer.json",
            std::filesystem::path(conv_out) / "tokenizer.json",
            std::filesystem::copy_options::overwrite_existing);
      }
      std::cout << "wrote " << conv_family << " checkpoint to " << conv_out
                << "\n";
    } else if (*plan) {
      const auto cfg =
          moeyard::train::TrainConfig::load(plan_config, plan_overrides);
      const auto p = moeyard::train::make_plan(cfg, plan_world);
      std::cout
          << (plan_as_json ? moeyard::train::plan_json(p)
                           : moeyard::train::format_plan(p, cfg));
    } else if (*train) {
      auto cfg = moeyard::train::TrainConfig::load(config, overrides);
      // A requested stop (SIGTERM/SIGINT) returns after every rank saved
      // and rank 0 verified the checkpoint of the step it stopped at: that
      // is a success, exit 0, so that torchrun does not restart the workers
      // and Slurm does not count a failed step. A failed save throws (exit 1).
      run_options.resume = resume;
      auto r = moeyard::train::run_training(cfg, run_options);
      if (moeyard::parallel::LaunchEnv::from_env().rank != 0) {
        return 0; // rank 0 reports
      }
      std::cout << "done: " << r.steps_done << " steps, final loss "
                << r.final_loss
                << (r.final_valid_loss > 0
                        ? ", valid loss " + std::to_string(r.final_valid_loss)
                        : "")
                << (r.skipped_steps
                        ? ", skipped " + std::to_string(r.skipped_steps)
                        : "")
                << (r.interrupted ? " (interrupted; resume with --resume auto)"
                                  : "")
                << "\n";
    }
  } catch (const c10::Error& e) {
    std::cerr << "moeyard: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "moeyard: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
