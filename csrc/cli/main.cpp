// The moeyard command line: train, ops, version.

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <CLI/CLI.hpp>

#include <iostream>

#include "train/trainer.h"
#include "version.h"

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
  CLI11_PARSE(app, argc, argv);
  try {
    if (*version) {
      std::cout << "moeyard " << moeyard::kVersion << "\n";
    } else if (*ops) {
      for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
        if (name.name.rfind("moeyard::", 0) == 0) {
          std::cout << name.name << "\n";
        }
      }
    } else if (*train) {
      auto cfg = moeyard::train::TrainConfig::load(config, overrides);
      auto r = moeyard::train::run_training(cfg, resume);
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
      return r.interrupted ? 130 : 0;
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
