// The moeyard command line. Sub-commands grow with the trainer issue; for now
// `version` and `ops` (lists the registered moeyard operators).

#include <ATen/core/dispatch/Dispatcher.h>
#include <CLI/CLI.hpp>

#include <iostream>

#include "version.h"

int main(int argc, char** argv) {
  CLI::App app{"moeyard: sparse Mixture-of-Experts training in C++"};
  app.require_subcommand(1);
  auto* version = app.add_subcommand("version", "print the version");
  auto* ops = app.add_subcommand("ops", "list the registered moeyard ops");
  CLI11_PARSE(app, argc, argv);
  if (*version) {
    std::cout << "moeyard " << moeyard::kVersion << "\n";
  } else if (*ops) {
    for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
      if (name.name.rfind("moeyard::", 0) == 0) {
        std::cout << name.name << "\n";
      }
    }
  }
  return 0;
}
