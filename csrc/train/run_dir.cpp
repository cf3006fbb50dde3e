#include "train/run_dir.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>

namespace moeyard::train::run_dir {

void fsync_path(const fs::path& p) {
  const bool dir = fs::is_directory(p);
  const int fd = ::open(p.c_str(), O_RDONLY | (dir ? O_DIRECTORY : 0));
  TORCH_CHECK(
      fd >= 0,
      "checkpoint: cannot open ",
      p.string(),
      " to fsync it (",
      std::strerror(errno),
      ")");
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  TORCH_CHECK(
      rc == 0,
      "checkpoint: fsync of ",
      p.string(),
      " failed (",
      std::strerror(err),
      ")");
}

void write_durably(const fs::path& p, const std::string& text) {
  const fs::path tmp = p.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    TORCH_CHECK(
        out.good(),
        "checkpoint: writing ",
        tmp.string(),
        " failed (disk full?)");
  }
  fsync_path(tmp);
  fs::rename(tmp, p);
  fsync_path(p.parent_path().empty() ? fs::path(".") : p.parent_path());
}

void crash_point(const char* name) {
  const char* env = std::getenv("MOEYARD_CRASH_AT");
  if (env == nullptr) {
    return;
  }
  // "name" (its first pass) or "name#k" (its k-th pass).
  const std::string at(env);
  const auto hash = at.find('#');
  if (at.substr(0, hash) != name) {
    return;
  }
  static std::map<std::string, int64_t> passes;
  const int64_t pass = ++passes[name];
  const int64_t want =
      hash == std::string::npos ? 1 : std::atoll(at.c_str() + hash + 1);
  if (pass == want) {
    std::fprintf(stderr, "moeyard: MOEYARD_CRASH_AT=%s: killed here\n", name);
    std::fflush(stderr);
    std::raise(SIGKILL);
  }
}

std::optional<int64_t> parse_step_name(const std::string& name) {
  const std::string pre = "step_";
  if (name.rfind(pre, 0) != 0 || name.size() == pre.size() ||
      name.size() > pre.size() + 18) {
    return std::nullopt;
  }
  const auto digits = name.substr(pre.size());
  if (!std::all_of(digits.begin(), digits.end(), [](char c) {
        return c >= '0' && c <= '9';
      })) {
    return std::nullopt;
  }
  return std::stoll(digits);
}

std::vector<Checkpoint> list_checkpoints(const fs::path& dir) {
  std::vector<Checkpoint> out;
  if (!fs::is_directory(dir)) {
    return out;
  }
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_directory()) {
      continue;
    }
    if (const auto n = parse_step_name(e.path().filename().string())) {
      out.push_back({*n, e.path()});
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.step < b.step;
  });
  return out;
}

std::vector<std::string> recover(
    const fs::path& dir,
    const std::function<std::string(const fs::path&)>& verify) {
  std::vector<std::string> done;
  if (!fs::is_directory(dir)) {
    return done;
  }
  // `latest` is the commit point: a checkpoint it names but that is not in
  // place yet is completed from step_<N>.tmp, or restored from step_<N>.old.
  if (const auto name = read_latest(dir); name && !fs::exists(dir / *name)) {
    const fs::path tmp = dir / (*name + ".tmp"), old = dir / (*name + ".old");
    if (fs::is_directory(tmp) && verify(tmp).empty()) {
      fs::rename(tmp, dir / *name);
      fsync_path(dir);
      done.push_back(
          "completed the save of " + (dir / *name).string() +
          " (interrupted after it was committed)");
    } else if (fs::is_directory(old)) {
      fs::rename(old, dir / *name);
      fsync_path(dir);
      done.push_back(
          "restored " + (dir / *name).string() +
          " (a save that replaced it was interrupted)");
    }
  }
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.is_directory()) {
      entries.push_back(e.path());
    }
  }
  for (const auto& p : entries) {
    const auto name = p.filename().string();
    const auto dot = name.rfind('.');
    if (dot == std::string::npos || !parse_step_name(name.substr(0, dot))) {
      continue;
    }
    const auto kind = name.substr(dot);
    const fs::path committed = dir / name.substr(0, dot);
    if (kind == ".old" && !fs::exists(committed)) {
      fs::rename(p, committed);
      fsync_path(dir);
      done.push_back(
          "restored " + committed.string() +
          " (a save that replaced it was interrupted)");
    } else if (kind == ".old" || kind == ".tmp" || kind == ".deleting") {
      fs::remove_all(p);
      done.push_back(
          "removed " + p.string() + " (left by an interrupted " +
          (kind == ".deleting" ? "deletion)" : "save)"));
    }
  }
  return done;
}

std::optional<std::string> read_latest(const fs::path& dir) {
  std::ifstream in(dir / "latest");
  std::string name;
  // Only a checkpoint name is a usable answer (not "", bytes, a path).
  if (!in || !(in >> name) || !parse_step_name(name)) {
    return std::nullopt;
  }
  return name;
}

Start choose_start(
    const fs::path& dir,
    const std::string& resume,
    const std::function<std::string(const fs::path&)>& verify) {
  Start s;
  if (resume == "never") {
    return s;
  }
  if (resume != "auto") {
    s.from = resume;
    return s;
  }
  const auto all = list_checkpoints(dir);
  const auto latest = read_latest(dir);
  if (latest && fs::is_directory(dir / *latest)) {
    s.from = dir / *latest;
    return s;
  }
  const bool has_latest_file = fs::exists(dir / "latest");
  if (all.empty()) {
    TORCH_CHECK(
        !has_latest_file,
        "resume: ",
        (dir / "latest").string(),
        latest ? " names " + *latest + ", which does not exist,"
               : std::string(" is empty or unreadable"),
        " and ",
        dir.string(),
        " holds no step_<N> checkpoint; to start a new run there, remove ",
        (dir / "latest").string(),
        " or pass --resume never");
    return s; // a new run
  }
  s.notes.push_back(
      !has_latest_file ? (dir / "latest").string() + " is missing"
      : latest         ? (dir / "latest").string() + " names " + *latest +
                     ", which does not exist"
               : (dir / "latest").string() + " is empty or unreadable");
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    const auto why = verify(it->path);
    if (why.empty()) {
      s.from = it->path;
      s.notes.push_back(
          "resuming from the newest checkpoint that verifies: " +
          it->path.string());
      return s;
    }
    s.notes.push_back(it->path.string() + " does not verify: " + why);
  }
  std::string msg;
  for (const auto& n : s.notes) {
    msg += "\n  " + n;
  }
  TORCH_CHECK(
      false,
      "resume: no checkpoint in ",
      dir.string(),
      " can be resumed:",
      msg,
      "\nRepair or remove them, or start a new run with --resume never "
      "--overwrite");
}

void publish(const fs::path& tmp, const fs::path& final_dir) {
  const fs::path parent = final_dir.parent_path();
  const fs::path aside = final_dir.string() + ".old";
  fsync_path(tmp);
  crash_point("publish:before");
  // The commit point: from here on, recover() completes this checkpoint.
  write_durably(parent / "latest", final_dir.filename().string() + "\n");
  crash_point("publish:latest");
  if (fs::exists(final_dir)) {
    fs::remove_all(aside);
    fs::rename(final_dir, aside);
    fsync_path(parent);
    crash_point("publish:aside");
  }
  fs::rename(tmp, final_dir);
  fsync_path(parent);
  crash_point("publish:renamed");
  if (fs::exists(aside)) {
    fs::remove_all(aside);
  }
}

void remove_checkpoints(
    const fs::path& dir, const std::vector<fs::path>& drop) {
  if (drop.empty()) {
    return;
  }
  // Renamed first (atomic) so that a deletion cut short leaves no
  // half-deleted step_<N> behind: recover() finishes it.
  std::vector<fs::path> renamed;
  for (const auto& p : drop) {
    renamed.push_back(p.string() + ".deleting");
    fs::rename(p, renamed.back());
  }
  fsync_path(dir);
  for (const auto& p : renamed) {
    fs::remove_all(p);
    crash_point("prune:one");
  }
}

std::vector<fs::path> prune_list(
    const std::vector<Checkpoint>& all,
    int64_t committed,
    const std::string& run_id,
    int64_t keep_last,
    bool discard_others,
    const std::function<std::string(const fs::path&)>& run_of) {
  std::vector<fs::path> drop;
  std::vector<fs::path> mine_older; // by increasing step
  for (const auto& c : all) {
    if (c.step == committed) {
      continue;
    }
    const bool mine = run_of(c.path) == run_id;
    if (discard_others && (!mine || c.step > committed)) {
      drop.push_back(c.path);
    } else if (mine && c.step < committed) {
      mine_older.push_back(c.path);
    }
  }
  const int64_t keep_older = std::max<int64_t>(keep_last, 1) - 1;
  const int64_t n = static_cast<int64_t>(mine_older.size());
  for (int64_t i = 0; i < n - keep_older; ++i) {
    drop.push_back(mine_older[i]);
  }
  return drop;
}

namespace {

std::string hex(const unsigned char* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += digits[p[i] >> 4];
    s += digits[p[i] & 15];
  }
  return s;
}

} // namespace

nlohmann::json data_fingerprint(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "data: cannot open ", path);
  const uint64_t size = fs::file_size(path);
  constexpr uint64_t kBlock = 1 << 20;
  std::vector<char> buf(kBlock);
  in.read(buf.data(), std::min<uint64_t>(32, size));
  const std::string header =
      hex(reinterpret_cast<const unsigned char*>(buf.data()),
          static_cast<size_t>(in.gcount()));
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  const uint64_t starts[3] = {
      0,
      size > kBlock ? size / 2 - kBlock / 2 : 0,
      size > kBlock ? size - kBlock : 0};
  for (const uint64_t at : starts) {
    in.clear();
    in.seekg(static_cast<std::streamoff>(at));
    in.read(buf.data(), static_cast<std::streamsize>(kBlock));
    EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(in.gcount()));
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx, md, &n);
  EVP_MD_CTX_free(ctx);
  return {
      {"path", path},
      {"bytes", size},
      {"header", header},
      {"sample_sha256", hex(md, n)}};
}

nlohmann::json corpus_fingerprint(const std::vector<std::string>& paths) {
  if (paths.size() == 1) {
    return data_fingerprint(paths[0]);
  }
  nlohmann::json files = nlohmann::json::array();
  std::string joined;
  for (const auto& p : paths) {
    files.push_back(data_fingerprint(p));
    joined += (joined.empty() ? "" : ", ") + p;
  }
  return {{"path", joined}, {"files", files}};
}

std::string fingerprint_difference(
    const nlohmann::json& was, const nlohmann::json& now) {
  for (const char* k : {"weights", "raw_dtype"}) { // how files are sampled
    if (was.value(k, nlohmann::json()) != now.value(k, nlohmann::json())) {
      return std::string(k) + " " + was.value(k, nlohmann::json()).dump() +
             " then, " + now.value(k, nlohmann::json()).dump() + " now";
    }
  }
  if (was.contains("files") || now.contains("files")) {
    const auto list = [](const nlohmann::json& j) {
      return j.contains("files") ? j.at("files") : nlohmann::json::array({j});
    };
    const auto a = list(was), b = list(now);
    if (a.size() != b.size()) {
      return std::to_string(a.size()) + " files then, " +
             std::to_string(b.size()) + " now";
    }
    for (size_t i = 0; i < a.size(); ++i) {
      const auto why = fingerprint_difference(a[i], b[i]);
      if (!why.empty()) {
        return "file " + std::to_string(i + 1) + " (" +
               b[i].value("path", std::string()) + "): " + why;
      }
    }
    return "";
  }
  if (was.value("bytes", uint64_t(0)) != now.value("bytes", uint64_t(0))) {
    return std::to_string(was.value("bytes", uint64_t(0))) + " bytes then, " +
           std::to_string(now.value("bytes", uint64_t(0))) + " bytes now";
  }
  if (was.value("header", "") != now.value("header", "")) {
    return "its header differs";
  }
  if (was.value("sample_sha256", "") != now.value("sample_sha256", "")) {
    return "its content differs (SHA-256 of sampled blocks)";
  }
  return "";
}

} // namespace moeyard::train::run_dir
