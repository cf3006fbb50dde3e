#pragma once
// Public C++ API of the moeyard custom ops. Every function calls through the
// PyTorch dispatcher, so autograd, Meta (shape) kernels and device kernels are
// picked exactly as for `torch.ops.moeyard.*` in Python.

#include "ops/grouped_mm/grouped_mm.h"
#include "ops/permute/permute.h"
#include "ops/route_plan/route_plan.h"
#include "ops/router_topk/router_topk.h"
#include "ops/swiglu/swiglu.h"
#include "ops/unpermute/unpermute.h"
