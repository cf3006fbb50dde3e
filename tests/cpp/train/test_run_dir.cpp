// The run directory's rules on their own: step names, which checkpoint a
// run starts from, crash recovery and what pruning may delete.

#include <gtest/gtest.h>

#include <c10/util/Exception.h>

#include <fstream>
#include <map>
#include <random>

#include "train/run_dir.h"

namespace rd = moeyard::train::run_dir;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  const auto d =
      fs::temp_directory_path() / ("moeyard_run_dir_" + name + "_" +
                                   std::to_string(std::random_device{}()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write(const fs::path& p, const std::string& text) {
  std::ofstream(p) << text;
}

std::vector<rd::Checkpoint> steps(std::initializer_list<int64_t> s) {
  std::vector<rd::Checkpoint> out;
  for (auto n : s) {
    out.push_back({n, fs::path("step_" + std::to_string(n))});
  }
  return out;
}

} // namespace

TEST(RunDir, StepNames) {
  EXPECT_EQ(rd::parse_step_name("step_12"), 12);
  EXPECT_EQ(rd::parse_step_name("step_0"), 0);
  EXPECT_FALSE(rd::parse_step_name("step_"));
  EXPECT_FALSE(rd::parse_step_name("step_1.tmp"));
  EXPECT_FALSE(rd::parse_step_name("step_x"));
  EXPECT_FALSE(rd::parse_step_name("step_-1"));
  EXPECT_FALSE(rd::parse_step_name("step_99999999999999999999")); // overflow
  EXPECT_FALSE(rd::parse_step_name("latest"));
}

TEST(RunDir, PruneKeepsTheNewestOfThisRunAndNothingElse) {
  // run "a" owns 4, 8, 12; "b" owns 2; 20 is newer than the committed 12.
  std::map<std::string, std::string> owner = {
      {"step_2", "b"},
      {"step_4", "a"},
      {"step_8", "a"},
      {"step_12", "a"},
      {"step_20", "a"}};
  auto run_of = [&](const fs::path& p) { return owner.at(p.string()); };
  auto all = steps({2, 4, 8, 12, 20});
  auto drop = rd::prune_list(all, 12, "a", 2, false, run_of);
  ASSERT_EQ(drop.size(), 1u);
  EXPECT_EQ(drop[0], "step_4");
  // keep_last 1: only the committed one of this run remains.
  drop = rd::prune_list(all, 12, "a", 1, false, run_of);
  EXPECT_EQ(drop, (std::vector<fs::path>{"step_4", "step_8"}));
  // A big keep_last deletes nothing; the committed step is never listed.
  EXPECT_TRUE(rd::prune_list(all, 12, "a", 10, false, run_of).empty());
  EXPECT_TRUE(rd::prune_list(all, 4, "a", 1, false, run_of).empty());
  // --overwrite: another run's and newer checkpoints go too.
  drop = rd::prune_list(all, 12, "a", 3, true, run_of);
  EXPECT_EQ(drop, (std::vector<fs::path>{"step_2", "step_20"}));
}

TEST(RunDir, RecoverFinishesWhatACrashInterrupted) {
  const auto d = fresh_dir("recover");
  auto ok = [](const fs::path&) { return std::string(); };
  // `latest` names step_8, which was set aside and not yet replaced: the
  // committed step_8.tmp is renamed into place.
  write(d / "latest", "step_8\n");
  fs::create_directories(d / "step_8.old");
  fs::create_directories(d / "step_8.tmp");
  write(d / "step_8.tmp" / "manifest.json", "new");
  fs::create_directories(d / "step_4");
  fs::create_directories(d / "step_4.old");
  fs::create_directories(d / "step_12.deleting");
  fs::create_directories(d / "step_2.old"); // its step_2 never returned
  auto notes = rd::recover(d, ok);
  EXPECT_EQ(notes.size(), 5u);
  std::ifstream in(d / "step_8" / "manifest.json");
  std::string text;
  in >> text;
  EXPECT_EQ(text, "new");
  for (const char* gone :
       {"step_8.old",
        "step_8.tmp",
        "step_4.old",
        "step_12.deleting",
        "step_2.old"}) {
    EXPECT_FALSE(fs::exists(d / gone)) << gone;
  }
  EXPECT_TRUE(fs::exists(d / "step_4"));
  EXPECT_TRUE(fs::exists(d / "step_2"));
  // A .tmp that does not verify is not completed: the .old comes back.
  fs::remove_all(d / "step_8");
  fs::create_directories(d / "step_8.tmp");
  fs::create_directories(d / "step_8.old");
  write(d / "step_8.old" / "manifest.json", "old");
  notes = rd::recover(d, [](const fs::path&) { return std::string("bad"); });
  std::ifstream in2(d / "step_8" / "manifest.json");
  in2 >> text;
  EXPECT_EQ(text, "old");
  EXPECT_FALSE(fs::exists(d / "step_8.tmp"));
  fs::remove_all(d);
}

TEST(RunDir, ChooseStart) {
  const auto d = fresh_dir("start");
  auto ok = [](const fs::path&) { return std::string(); };
  // An empty directory: a new run; "never" and an explicit path as given.
  EXPECT_TRUE(rd::choose_start(d, "auto", ok).from.empty());
  EXPECT_TRUE(rd::choose_start(d, "never", ok).from.empty());
  EXPECT_EQ(rd::choose_start(d, "/x/step_3", ok).from, "/x/step_3");
  fs::create_directories(d / "step_4");
  fs::create_directories(d / "step_8");
  write(d / "latest", "step_4\n");
  // `latest` decides, even with a newer checkpoint beside it.
  EXPECT_EQ(rd::choose_start(d, "auto", ok).from, d / "step_4");
  auto bad8 = [](const fs::path& p) {
    return p.filename() == "step_8" ? std::string("corrupt") : std::string();
  };
  // An empty `latest`: the newest that verifies, with the reasons.
  write(d / "latest", "");
  const auto s = rd::choose_start(d, "auto", bad8);
  EXPECT_EQ(s.from, d / "step_4");
  ASSERT_EQ(s.notes.size(), 3u);
  EXPECT_NE(s.notes[1].find("corrupt"), std::string::npos);
  // None verifies: an error, never a fresh start.
  auto bad = [](const fs::path&) { return std::string("corrupt"); };
  EXPECT_THROW(rd::choose_start(d, "auto", bad), c10::Error);
  // `latest` names a missing checkpoint and none is left: an error.
  fs::remove_all(d / "step_4");
  fs::remove_all(d / "step_8");
  write(d / "latest", "step_8\n");
  EXPECT_THROW(rd::choose_start(d, "auto", ok), c10::Error);
  fs::remove_all(d);
}

TEST(RunDir, PublishSwapsAnExistingStepAndDeletions) {
  const auto d = fresh_dir("publish");
  fs::create_directories(d / "step_4");
  write(d / "step_4" / "manifest.json", "old");
  fs::create_directories(d / "step_4.tmp");
  write(d / "step_4.tmp" / "manifest.json", "new");
  rd::publish(d / "step_4.tmp", d / "step_4");
  std::ifstream in(d / "step_4" / "manifest.json");
  std::string text;
  in >> text;
  EXPECT_EQ(text, "new");
  EXPECT_EQ(rd::read_latest(d), "step_4");
  EXPECT_FALSE(fs::exists(d / "step_4.old"));
  EXPECT_FALSE(fs::exists(d / "step_4.tmp"));
  fs::create_directories(d / "step_2");
  rd::remove_checkpoints(d, {d / "step_2"});
  EXPECT_FALSE(fs::exists(d / "step_2"));
  EXPECT_FALSE(fs::exists(d / "step_2.deleting"));
  fs::remove_all(d);
}

TEST(RunDir, DataFingerprint) {
  const auto d = fresh_dir("fingerprint");
  std::string big(3 << 20, 'a');
  write(d / "a.bin", big);
  big[(3 << 20) / 2] = 'b'; // inside the middle block
  write(d / "b.bin", big);
  write(d / "c.bin", big);
  const auto a = rd::data_fingerprint((d / "a.bin").string());
  const auto b = rd::data_fingerprint((d / "b.bin").string());
  const auto c = rd::data_fingerprint((d / "c.bin").string());
  EXPECT_EQ(a.at("bytes"), 3u << 20);
  EXPECT_NE(rd::fingerprint_difference(a, b), "");
  EXPECT_EQ(rd::fingerprint_difference(b, c), ""); // same content elsewhere
  write(d / "short.bin", "abc");
  EXPECT_NE(
      rd::fingerprint_difference(
          a, rd::data_fingerprint((d / "short.bin").string())),
      "");
  fs::remove_all(d);
}
