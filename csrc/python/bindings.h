#pragma once
// Pieces of the moeyard._C module defined outside module.cpp.

#include <torch/extension.h>

#include "model/moe_forward.h"

namespace moeyard::python {

// An MoE layer's outputs beyond y, by name (the op's rows), plus
// dead_experts.
pybind11::dict moe_stats(const MoEOutput& o);

// moe_interface, check_moe_options and the expert-parallel test hooks.
void bind_moe(pybind11::module_& m);

} // namespace moeyard::python
