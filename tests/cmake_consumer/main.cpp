// Uses moeyard's ops and C++ model from another project: prints swiglu of a
// fixed input (the test compares it with Python's) and a Transformer's
// logits shape.
#include <ATen/ATen.h>

#include <iomanip>
#include <iostream>

#include "model/transformer.h"
#include "ops/ops.h"

int main() {
  const auto gate_up = at::arange(12, at::kFloat).reshape({2, 6}) / 10;
  std::cout << std::setprecision(17) << "swiglu_sum "
            << moeyard::ops::swiglu(gate_up).sum().item<double>() << "\n";
  moeyard::ModelConfig config;
  config.num_layers = 1;
  moeyard::Transformer model(config);
  const auto out = model->forward(at::zeros({1, 5}, at::kLong));
  std::cout << "logits " << out.logits.size(0) << " " << out.logits.size(1)
            << " " << out.logits.size(2) << "\n";
  return 0;
}
