// The parallel layout against a naive enumeration of the rank order (TP
// fastest, then EP, then expert-DP): every rank's coordinates and group
// members, the experts and pieces it owns and what it writes in a
// checkpoint, for several world / tp / ep combinations; and each bad
// combination's error naming the field, its value and what was expected.

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "parallel/layout.h"

namespace {

using moeyard::parallel::check_layout_sizes;
using moeyard::parallel::experts_per_rank;
using moeyard::parallel::Layout;
using moeyard::parallel::LayoutSizes;
using moeyard::parallel::Placement;

// Every rank's (edp, ep, tp) index by plain counting, rank 0 first.
struct Coords {
  int64_t edp, ep, tp;
};
std::vector<Coords> enumerate(int64_t edp, int64_t ep, int64_t tp) {
  std::vector<Coords> out;
  for (int64_t a = 0; a < edp; ++a) {
    for (int64_t b = 0; b < ep; ++b) {
      for (int64_t c = 0; c < tp; ++c) {
        out.push_back({a, b, c});
      }
    }
  }
  return out;
}

// The ranks whose coordinates satisfy `same`, in rank order.
template <typename F>
std::vector<int64_t> members(const std::vector<Coords>& all, F same) {
  std::vector<int64_t> r;
  for (size_t i = 0; i < all.size(); ++i) {
    if (same(all[i])) {
      r.push_back(static_cast<int64_t>(i));
    }
  }
  return r;
}

struct Combo {
  int64_t world, tp, ep, data_parallel; // data_parallel 0: world / tp
};

class LayoutCombos : public testing::TestWithParam<Combo> {};

TEST_P(LayoutCombos, CoordinatesGroupsAndOwnershipMatchTheEnumeration) {
  const auto c = GetParam();
  const int64_t E = 8;
  const LayoutSizes sizes{c.data_parallel, c.tp, c.ep, E};
  const int64_t dp = c.world / c.tp, edp = dp / c.ep;
  const auto all = enumerate(edp, c.ep, c.tp);
  ASSERT_EQ(static_cast<int64_t>(all.size()), c.world);
  std::map<int64_t, int64_t> replicated_writers, tp_writers, expert_writers;
  std::set<int64_t> experts_seen;
  for (int64_t r = 0; r < c.world; ++r) {
    const auto l = Layout::build(sizes, c.world, r, "test");
    const auto& me = all[r];
    SCOPED_TRACE(
        "world " + std::to_string(c.world) + " tp " + std::to_string(c.tp) +
        " ep " + std::to_string(c.ep) + " rank " + std::to_string(r));
    EXPECT_EQ(l.world, c.world);
    EXPECT_EQ(l.rank, r);
    EXPECT_EQ(l.tp, c.tp);
    EXPECT_EQ(l.dp, dp);
    EXPECT_EQ(l.ep, c.ep);
    EXPECT_EQ(l.edp, edp);
    EXPECT_EQ(l.tp_rank, me.tp);
    EXPECT_EQ(l.ep_rank, me.ep);
    EXPECT_EQ(l.edp_rank, me.edp);
    EXPECT_EQ(l.dp_rank, me.edp * c.ep + me.ep);
    EXPECT_EQ(l.distributed(), c.world > 1);

    std::vector<int64_t> world(c.world);
    for (int64_t i = 0; i < c.world; ++i) {
      world[i] = i;
    }
    EXPECT_EQ(l.world_ranks(), world);
    EXPECT_EQ(l.dp_ranks(), members(all, [&](const Coords& o) {
                return o.tp == me.tp;
              }));
    EXPECT_EQ(l.tp_ranks(), members(all, [&](const Coords& o) {
                return o.edp == me.edp && o.ep == me.ep;
              }));
    EXPECT_EQ(l.ep_ranks(), members(all, [&](const Coords& o) {
                return o.tp == me.tp && o.edp == me.edp;
              }));
    EXPECT_EQ(l.edp_ranks(), members(all, [&](const Coords& o) {
                return o.tp == me.tp && o.ep == me.ep;
              }));
    // This rank's place in each group is its coordinate.
    EXPECT_EQ(l.dp_ranks()[l.dp_rank], r);
    EXPECT_EQ(l.tp_ranks()[l.tp_rank], r);
    EXPECT_EQ(l.ep_ranks()[l.ep_rank], r);
    EXPECT_EQ(l.edp_ranks()[l.edp_rank], r);

    // Ownership: E / ep consecutive experts; the pieces it holds.
    const int64_t El = E / c.ep;
    EXPECT_EQ(l.first_expert(E), me.ep * El);
    for (int64_t e = l.first_expert(E); e < l.first_expert(E) + El; ++e) {
      experts_seen.insert(e);
    }
    EXPECT_EQ(l.piece(Placement::kReplicated).count, 1);
    EXPECT_EQ(l.piece(Placement::kTensorParallel).index, me.tp);
    EXPECT_EQ(l.piece(Placement::kTensorParallel).count, c.tp);
    EXPECT_EQ(l.piece(Placement::kExpert).index, me.ep);
    EXPECT_EQ(l.piece(Placement::kExpert).count, c.ep);
    if (l.writes(Placement::kReplicated)) {
      ++replicated_writers[0];
    }
    if (l.writes(Placement::kTensorParallel)) {
      ++tp_writers[me.tp];
    }
    if (l.writes(Placement::kExpert)) {
      ++expert_writers[me.ep];
    }
    EXPECT_EQ(l.writes_rng(), me.tp == 0);
    EXPECT_EQ(l.file_suffix(), c.world > 1 ? "-rank" + std::to_string(r) : "");
  }
  // Every tensor and every piece is written exactly once.
  EXPECT_EQ(replicated_writers, (std::map<int64_t, int64_t>{{0, 1}}));
  std::map<int64_t, int64_t> once_tp, once_ep;
  for (int64_t t = 0; t < c.tp; ++t) {
    once_tp[t] = 1;
  }
  for (int64_t e = 0; e < c.ep; ++e) {
    once_ep[e] = 1;
  }
  EXPECT_EQ(tp_writers, once_tp);
  EXPECT_EQ(expert_writers, once_ep);
  EXPECT_EQ(static_cast<int64_t>(experts_seen.size()), E);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts,
    LayoutCombos,
    testing::Values(
        Combo{1, 1, 1, 0},
        Combo{2, 1, 1, 0},
        Combo{2, 1, 2, 0},
        Combo{2, 2, 1, 0},
        Combo{4, 1, 2, 0},
        Combo{4, 1, 4, 2 * 2},
        Combo{4, 2, 2, 0},
        Combo{8, 2, 2, 4},
        Combo{8, 2, 4, 0},
        Combo{16, 2, 2, 0},
        Combo{12, 3, 2, 0}),
    [](const testing::TestParamInfo<Combo>& info) {
      const auto& c = info.param;
      return "world" + std::to_string(c.world) + "_tp" + std::to_string(c.tp) +
             "_ep" + std::to_string(c.ep) + "_dp" +
             std::to_string(c.data_parallel);
    });

TEST(Layout, GroupNamesAreUniquePerGroup) {
  const LayoutSizes sizes{0, 2, 2, 4};
  std::map<std::string, std::set<std::vector<int64_t>>> by_name;
  for (int64_t r = 0; r < 8; ++r) {
    const auto l = Layout::build(sizes, 8, r);
    by_name[l.dp_name()].insert(l.dp_ranks());
    by_name[l.tp_name()].insert(l.tp_ranks());
    by_name[l.ep_name()].insert(l.ep_ranks());
    by_name[l.edp_name()].insert(l.edp_ranks());
  }
  for (const auto& [name, groups] : by_name) {
    EXPECT_EQ(groups.size(), 1u) << name << " names different groups";
  }
  // 2 data-parallel, 4 tensor-parallel, 4 expert-parallel and 4
  // expert-data-parallel groups.
  EXPECT_EQ(by_name.size(), 14u);
}

// `f` throws an error that contains `want`.
template <typename F>
void expect_error(F f, const std::string& want) {
  try {
    f();
  } catch (const c10::Error& e) {
    const std::string got = e.what_without_backtrace();
    EXPECT_NE(got.find(want), std::string::npos)
        << "got: " << got << "\nwant: " << want;
    return;
  }
  ADD_FAILURE() << "no error; want: " << want;
}

TEST(Layout, BadCombinationsNameTheFieldValueAndExpectation) {
  struct Bad {
    LayoutSizes sizes;
    int64_t world;
    std::string message;
  };
  const std::vector<Bad> bad = {
      {{0, 3, 1, 4},
       4,
       "parallel.tensor_parallel (3) must divide the number of processes "
       "(WORLD_SIZE 4, from torchrun)"},
      {{3, 2, 1, 4},
       4,
       "parallel.data_parallel (3) x parallel.tensor_parallel (2) must equal "
       "the number of processes (WORLD_SIZE 4, from torchrun)"},
      {{0, 1, 4, 8},
       2,
       "parallel.expert_parallel (4) must divide the data-parallel size (2)"},
      {{0, 2, 2, 4},
       2,
       "parallel.expert_parallel (2) must divide the data-parallel size (1)"},
      {{0, 1, 4, 6},
       4,
       "moe.num_experts = 6 must be divisible by parallel.expert_parallel = "
       "4"},
      {{3, 1, 2, 4},
       6,
       "parallel.data_parallel = 3 must be divisible by "
       "parallel.expert_parallel = 2"},
  };
  for (const auto& b : bad) {
    expect_error(
        [&] { Layout::build(b.sizes, b.world, 0, "torchrun"); }, b.message);
  }
  expect_error(
      [] { Layout::build({}, 2, 2); }, "rank 2 is outside world size 2");
}

TEST(Layout, ConfigChecksNameWhereEachKeyWasGiven) {
  const auto namer = [](const std::string& key) {
    return key + " (x.yaml:" + std::to_string(key.size()) + ")";
  };
  expect_error(
      [&] {
        check_layout_sizes({0, 1, 3, 4}, namer);
      },
      "config: moe.num_experts (x.yaml:15) = 4 must be divisible by "
      "parallel.expert_parallel (x.yaml:24) = 3");
  // Dense models and expert_parallel 1 are always fine.
  check_layout_sizes({0, 1, 1, 0}, namer);
  check_layout_sizes({3, 1, 1, 5}, namer);
}

TEST(Layout, ExpertsPerRankIsTheOneDivisibilityCheck) {
  EXPECT_EQ(experts_per_rank(8, 4, "moe"), 2);
  EXPECT_EQ(experts_per_rank(8, 1, "moe"), 8);
  expect_error(
      [] { experts_per_rank(6, 4, "moe"); },
      "moe: num_experts (6) must be divisible by expert_parallel (4)");
  expect_error(
      [] { experts_per_rank(4, 0, "checkpoint: expert tensor 'w'"); },
      "checkpoint: expert tensor 'w': num_experts (4) must be divisible by "
      "expert_parallel (0)");
}

} // namespace
