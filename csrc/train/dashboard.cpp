#include "train/dashboard.h"

#include <c10/util/Exception.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "util/log.h"

extern char** environ;

namespace moeyard::train {

using json = nlohmann::json;

DashboardStep dashboard_step(
    const json& rec, double tokens_per_step, bool with_load) {
  DashboardStep out;
  out.step = rec.at("step").get<int64_t>();
  for (const auto& [k, v] : rec.items()) {
    if (v.is_number() && k != "step") {
      out.scalars.emplace_back(k, v.get<double>());
    }
  }
  out.scalars.emplace_back(
      "tokens_per_s", tokens_per_step / rec.at("step_s").get<double>());
  double busiest = 0;
  for (const auto& layer : rec.at("moe_layers")) {
    const auto name =
        "layer" + std::to_string(layer.at("layer").get<int64_t>());
    for (const auto& [k, v] : layer.items()) {
      if (v.is_number() && k != "layer" && k != "top_k") {
        out.scalars.emplace_back("moe/" + k + "/" + name, v.get<double>());
      }
    }
    if (with_load) {
      out.expert_load.push_back(
          layer.at("tokens_per_expert").get<std::vector<double>>());
      for (const double c : out.expert_load.back()) {
        busiest = std::max(busiest, c);
      }
    }
  }
  for (auto& row : out.expert_load) {
    for (auto& c : row) {
      c = busiest > 0 ? c / busiest : 0;
    }
  }
  return out;
}

namespace {

constexpr double kReadyTimeoutS = 300; // wandb.init, a login included
constexpr double kFinishTimeoutS = 120; // wandb.finish
constexpr int kStalledMs = 30000; // a process that reads nothing this long

std::string python_executable() {
  const char* p = std::getenv("MOEYARD_PYTHON");
  return p && *p ? p : "python3";
}

} // namespace

WandbFeed::WandbFeed(const WandbOptions& o) {
  int fds[2];
  TORCH_CHECK(
      ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0,
      "log.wandb: socketpair failed: ",
      std::strerror(errno));
  // Records queue in the socket while the process logs (as much as the
  // system allows: net.core.wmem_max).
  const int buffer = 4 << 20;
  ::setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &buffer, sizeof(buffer));
  const std::string python = python_executable();
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 0); // its stdin
  std::vector<std::string> args = {python, "-m", "moeyard.wandb_feed"};
  std::vector<char*> argv;
  for (auto& a : args) {
    argv.push_back(a.data());
  }
  argv.push_back(nullptr);
  const int rc = ::posix_spawnp(
      &pid_, python.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  fd_ = fds[0];
  if (rc != 0) {
    ::close(fd_);
    TORCH_CHECK(
        false,
        "log.wandb: cannot start ",
        python,
        " (set MOEYARD_PYTHON to the Python that has moeyard and wandb): ",
        std::strerror(rc));
  }
  send_line(json{
      {"project", o.project},
      {"mode", o.mode},
      {"name", o.name},
      {"dir", o.dir},
      {"config", o.config}}
                .dump());
  const std::string reply = read_line(kReadyTimeoutS);
  if (reply != "ready") {
    int status = 0;
    const bool exited = ::waitpid(pid_, &status, WNOHANG) == pid_;
    std::string why;
    if (reply.rfind("error ", 0) == 0) {
      why = reply.substr(6);
    } else if (!reply.empty()) {
      why = "unexpected answer '" + reply + "'";
    } else if (exited) {
      why = "it exited (status " +
            std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1) +
            ", its error above) before the W&B run was open";
    } else {
      why = "no answer in " + std::to_string(static_cast<int>(kReadyTimeoutS)) +
            " s";
    }
    ::close(fd_);
    fd_ = -1;
    if (!exited) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    pid_ = -1;
    TORCH_CHECK(false, "log.wandb: ", python, " -m moeyard.wandb_feed: ", why);
  }
}

WandbFeed::~WandbFeed() {
  if (pid_ < 0) {
    return;
  }
  // End of the records: the process finishes the W&B run and exits (its
  // end of the socket closes as it does). One deadline for both waits.
  const auto until = std::chrono::steady_clock::now() +
                     std::chrono::duration<double>(kFinishTimeoutS);
  ::shutdown(fd_, SHUT_WR);
  if (!broken_) {
    read_line(kFinishTimeoutS);
  }
  ::close(fd_);
  while (::waitpid(pid_, nullptr, WNOHANG) == 0) {
    if (broken_ || std::chrono::steady_clock::now() > until) {
      if (!broken_) {
        log::warn(
            "log.wandb: the W&B process did not finish in " +
            std::to_string(static_cast<int>(kFinishTimeoutS)) +
            " s; stopping it");
      }
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void WandbFeed::send(const DashboardStep& s) {
  json scalars = json::object();
  for (const auto& [k, v] : s.scalars) {
    scalars[k] = v;
  }
  json line = {{"step", s.step}, {"scalars", scalars}};
  if (!s.expert_load.empty()) {
    line["expert_load"] = s.expert_load;
  }
  send_line(line.dump());
}

void WandbFeed::send_line(const std::string& text) {
  if (broken_) {
    return;
  }
  const std::string line = text + "\n";
  size_t sent = 0;
  while (sent < line.size()) {
    pollfd p{fd_, POLLOUT, 0};
    const int ready = ::poll(&p, 1, kStalledMs);
    if (ready < 0 && errno == EINTR) {
      continue; // a signal (the trainer's stop handlers)
    }
    if (ready == 0) {
      log::warn(
          "log.wandb: the W&B process has read nothing for " +
          std::to_string(kStalledMs / 1000) +
          " s; the next steps go to metrics.jsonl only");
      broken_ = true;
      return;
    }
    // Never blocks: a line larger than the free buffer goes in pieces, each
    // after poll() says there is room.
    const ssize_t n = ::send(
        fd_,
        line.data() + sent,
        line.size() - sent,
        MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) {
      continue;
    }
    if (n <= 0) {
      log::warn(
          "log.wandb: the W&B process has ended (" +
          std::string(std::strerror(errno)) +
          "); the next steps go to metrics.jsonl only");
      broken_ = true;
      return;
    }
    sent += static_cast<size_t>(n);
  }
}

std::string WandbFeed::read_line(double timeout_s) {
  std::string line;
  const auto until = std::chrono::steady_clock::now() +
                     std::chrono::duration<double>(timeout_s);
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          until - std::chrono::steady_clock::now())
                          .count();
    if (left <= 0) {
      return "";
    }
    pollfd p{fd_, POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(left));
    if (ready < 0 && errno == EINTR) {
      continue; // a signal: wait for the time that is left
    }
    if (ready <= 0) {
      return "";
    }
    char c = 0;
    const ssize_t n = ::recv(fd_, &c, 1, 0);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return "";
    }
    if (c == '\n') {
      return line;
    }
    line += c;
  }
}

} // namespace moeyard::train
