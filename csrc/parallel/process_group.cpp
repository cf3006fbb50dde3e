#include "parallel/process_group.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>

#include "util/log.h"

namespace moeyard::parallel {
namespace {

int64_t parse_int(const std::string& var, const std::string& value) {
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  TORCH_CHECK(
      used == value.size() && !value.empty(),
      "launch environment: ",
      var,
      "='",
      value,
      "' is not an integer");
  return v;
}

// Waits for a collective; a failure or timeout names what was waited for.
void wait(
    const c10::intrusive_ptr<c10d::Work>& work,
    const Group& g,
    const char* collective,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) {
  if (timeout.count() == 0) {
    timeout = g.timeout;
  }
  std::string why;
  try {
    work->wait(timeout);
    return;
  } catch (const c10::Error& e) {
    why = e.what_without_backtrace();
  } catch (const std::exception& e) {
    why = e.what();
  }
  TORCH_CHECK(
      false,
      "collective ",
      collective,
      " on process group '",
      g.name,
      "' (",
      g.size(),
      " ranks) failed or timed out after ",
      timeout.count() / 1000.0,
      " s: a peer died or hangs (",
      why,
      ")");
}

// The numeric form of a resolved address ("127.0.0.1", "::1").
std::string numeric_host(const sockaddr* a, socklen_t len) {
  char host[NI_MAXHOST] = {0};
  if (getnameinfo(a, len, host, sizeof(host), nullptr, 0, NI_NUMERICHOST) !=
      0) {
    return "?";
  }
  return host;
}

bool is_loopback(const sockaddr* a) {
  if (a->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(a);
    return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
  }
  if (a->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(a);
    return IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr);
  }
  return false;
}

// A socket listening on the address MASTER_ADDR resolves to and on
// MASTER_PORT, for rank 0's store server. TCPStore's own server would listen
// on every interface, and the store has no authentication: bound here, a
// run with MASTER_ADDR=127.0.0.1 is reachable from this machine only, and a
// multi-node run from the network of MASTER_ADDR only. The store takes
// ownership of the descriptor.
int listen_on_master_addr(const LaunchEnv& env) {
  const std::string where =
      env.master_addr + ":" + std::to_string(env.master_port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(
      env.master_addr.c_str(),
      std::to_string(env.master_port).c_str(),
      &hints,
      &found);
  TORCH_CHECK(
      rc == 0,
      "rank 0: cannot serve the rendezvous store on ",
      where,
      ": MASTER_ADDR does not resolve (",
      gai_strerror(rc),
      ")");
  std::string why;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const auto host = numeric_host(a->ai_addr, a->ai_addrlen);
    const int fd =
        socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why += (why.empty() ? "" : "; ") + host + ": " + std::strerror(errno);
      continue;
    }
    const int one = 1;
    // Rebind at once after a previous run (TIME_WAIT), as TCPStore does;
    // an IPv6 address serves IPv6 only, like the address it names.
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (a->ai_family == AF_INET6) {
      ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    }
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        ::listen(fd, SOMAXCONN) == 0) {
      // A host name that this machine maps to loopback (Debian's
      // "127.0.1.1 <hostname>" in /etc/hosts) keeps other machines out.
      if (is_loopback(a->ai_addr) && env.master_addr != "localhost" &&
          host != env.master_addr) {
        log::warn(
            "MASTER_ADDR=" + env.master_addr + " resolves to " + host +
            " (loopback) on rank 0: the rendezvous store listens there only, "
            "out of reach of other machines; on a multi-node launch set "
            "MASTER_ADDR to this machine's network address");
      }
      freeaddrinfo(found);
      return fd;
    }
    why += (why.empty() ? "" : "; ") + host + ": " + std::strerror(errno);
    ::close(fd);
  }
  freeaddrinfo(found);
  TORCH_CHECK(
      false,
      "rank 0: cannot listen for the rendezvous store on ",
      where,
      " (",
      why,
      "); MASTER_ADDR must be an address of rank 0's machine and "
      "MASTER_PORT a free port");
  return -1;
}

} // namespace

LaunchEnv LaunchEnv::from_vars(
    const std::vector<std::pair<std::string, std::string>>& vars) {
  std::map<std::string, std::string> v(vars.begin(), vars.end());
  auto has = [&](const char* k) { return v.count(k) && !v.at(k).empty(); };
  LaunchEnv e;
  if (has("RANK") || has("WORLD_SIZE")) {
    TORCH_CHECK(
        has("RANK") && has("WORLD_SIZE"),
        "launch environment: RANK and WORLD_SIZE must be set together (as "
        "torchrun does)");
    e.source = "torchrun";
    e.rank = parse_int("RANK", v.at("RANK"));
    e.world_size = parse_int("WORLD_SIZE", v.at("WORLD_SIZE"));
    e.local_rank =
        has("LOCAL_RANK") ? parse_int("LOCAL_RANK", v.at("LOCAL_RANK")) : 0;
    e.agent_store = has("TORCHELASTIC_USE_AGENT_STORE") &&
                    v.at("TORCHELASTIC_USE_AGENT_STORE") == "True";
    if (has("TORCHELASTIC_RESTART_COUNT")) {
      e.restart_count = parse_int(
          "TORCHELASTIC_RESTART_COUNT", v.at("TORCHELASTIC_RESTART_COUNT"));
    }
  } else if (has("SLURM_PROCID") && has("SLURM_NTASKS")) {
    e.source = "slurm";
    e.rank = parse_int("SLURM_PROCID", v.at("SLURM_PROCID"));
    e.world_size = parse_int("SLURM_NTASKS", v.at("SLURM_NTASKS"));
    e.local_rank = has("SLURM_LOCALID")
                       ? parse_int("SLURM_LOCALID", v.at("SLURM_LOCALID"))
                       : 0;
  } else {
    return e;
  }
  TORCH_CHECK(
      e.world_size >= 1 && e.rank >= 0 && e.rank < e.world_size,
      "launch environment: rank ",
      e.rank,
      " is outside world size ",
      e.world_size);
  if (e.world_size > 1) {
    TORCH_CHECK(
        has("MASTER_ADDR") && has("MASTER_PORT"),
        "launch environment: MASTER_ADDR and MASTER_PORT must be set for ",
        e.world_size,
        " processes (torchrun sets them; in Slurm, export them in the sbatch "
        "script)");
  }
  if (has("GLOO_SOCKET_IFNAME")) {
    e.gloo_ifname = v.at("GLOO_SOCKET_IFNAME");
  }
  if (has("MASTER_ADDR")) {
    e.master_addr = v.at("MASTER_ADDR");
  }
  if (has("MASTER_PORT")) {
    e.master_port = parse_int("MASTER_PORT", v.at("MASTER_PORT"));
    TORCH_CHECK(
        e.master_port > 0 && e.master_port < 65536,
        "launch environment: MASTER_PORT=",
        e.master_port,
        " is not a port");
  }
  return e;
}

LaunchEnv LaunchEnv::from_env() {
  std::vector<std::pair<std::string, std::string>> vars;
  for (const char* k :
       {"RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_USE_AGENT_STORE",
        "TORCHELASTIC_RESTART_COUNT",
        "GLOO_SOCKET_IFNAME",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID"}) {
    if (const char* s = std::getenv(k)) {
      vars.emplace_back(k, s);
    }
  }
  return from_vars(vars);
}

c10::intrusive_ptr<c10d::Store> make_store(
    const LaunchEnv& env, std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions o;
  o.port = static_cast<uint16_t>(env.master_port);
  o.isServer = env.rank == 0 && !env.agent_store;
  o.numWorkers =
      env.agent_store ? std::nullopt : std::optional<size_t>(env.world_size);
  o.waitWorkers = !env.agent_store;
  o.timeout = timeout;
  if (o.isServer) {
    o.masterListenFd = listen_on_master_addr(env);
  }
  try {
    auto store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
    return c10::make_intrusive<c10d::PrefixStore>(
        "moeyard/" + std::to_string(env.restart_count), store);
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false,
        "rank ",
        env.rank,
        ": cannot reach the rendezvous store at ",
        env.master_addr,
        ":",
        env.master_port,
        " within ",
        timeout.count() / 1000.0,
        " s (",
        e.what(),
        ")");
  }
  return {};
}

Group group_shell(
    const LaunchEnv& env,
    const std::string& name,
    const std::vector<int64_t>& ranks,
    std::chrono::milliseconds timeout) {
  Group g;
  g.name = name;
  g.ranks = ranks;
  g.timeout = timeout;
  const auto it = std::find(ranks.begin(), ranks.end(), env.rank);
  TORCH_CHECK(
      it != ranks.end(),
      "process group '",
      name,
      "': rank ",
      env.rank,
      " is not a member");
  g.rank = it - ranks.begin();
  return g;
}

Group make_gloo_group(
    const c10::intrusive_ptr<c10d::Store>& store,
    const LaunchEnv& env,
    const std::string& name,
    const std::vector<int64_t>& ranks,
    std::chrono::milliseconds timeout) {
  Group g = group_shell(env, name, ranks, timeout);
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  // GLOO_SOCKET_IFNAME if set; else one machine: loopback; several: the
  // interface the hostname resolves to.
  const bool local =
      env.master_addr == "127.0.0.1" || env.master_addr == "localhost";
  try {
    opts->devices.push_back(
        !env.gloo_ifname.empty()
            ? c10d::ProcessGroupGloo::createDeviceForInterface(env.gloo_ifname)
        : local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                : c10d::ProcessGroupGloo::createDefaultDevice());
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false,
        "process group '",
        name,
        "': cannot open a Gloo device",
        env.gloo_ifname.empty()
            ? std::string()
            : " on interface GLOO_SOCKET_IFNAME='" + env.gloo_ifname + "'",
        " (",
        e.what(),
        ")");
  }
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name, store);
  g.backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
      prefixed, static_cast<int>(g.rank), static_cast<int>(ranks.size()), opts);
  return g;
}

#ifndef MOEYARD_WITH_NCCL
bool nccl_available() {
  return false;
}

Group make_nccl_group(
    const c10::intrusive_ptr<c10d::Store>&,
    const LaunchEnv&,
    const std::string& name,
    const std::vector<int64_t>&,
    std::chrono::milliseconds,
    c10::Device) {
  TORCH_CHECK(
      false,
      "process group '",
      name,
      "': NCCL groups need moeyard built with CUDA (this build has none)");
}
#endif

Group make_world_group(
    const LaunchEnv& env,
    const std::string& name,
    std::chrono::milliseconds timeout) {
  std::vector<int64_t> ranks(env.world_size);
  std::iota(ranks.begin(), ranks.end(), 0);
  return make_gloo_group(make_store(env, timeout), env, name, ranks, timeout);
}

namespace {

// `t` on the group's device (itself when it is there already).
at::Tensor on_device(const Group& g, const at::Tensor& t) {
  return t.device() == g.device ? t : t.to(g.device);
}

// Copies a collective's result back into `t` when it ran on a copy.
void write_back(at::Tensor& t, const at::Tensor& result) {
  if (!result.is_same(t)) {
    t.copy_(result);
  }
}

} // namespace

void Group::all_reduce_sum(at::Tensor& t) const {
  auto d = on_device(*this, t);
  std::vector<at::Tensor> v = {d};
  wait(backend->allreduce(v), *this, "all_reduce");
  write_back(t, d);
}

at::Tensor Group::all_to_all(
    const at::Tensor& input,
    const std::vector<int64_t>& send_splits,
    const std::vector<int64_t>& recv_splits) const {
  if (input.device() != device) {
    return all_to_all(input.to(device), send_splits, recv_splits)
        .to(input.device());
  }
  int64_t rows = 0;
  for (auto r : recv_splits) {
    rows += r;
  }
  if (recv_splits.empty()) {
    rows = input.size(0);
  }
  auto sizes = input.sizes().vec();
  sizes[0] = rows;
  auto out = at::empty(sizes, input.options());
  auto in = input.contiguous();
  auto ss = send_splits;
  auto rs = recv_splits;
  wait(backend->alltoall_base(out, in, rs, ss), *this, "all_to_all");
  return out;
}

void Group::all_reduce_max(at::Tensor& t) const {
  auto d = on_device(*this, t);
  std::vector<at::Tensor> v = {d};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::MAX;
  wait(backend->allreduce(v, o), *this, "all_reduce(max)");
  write_back(t, d);
}

at::Tensor Group::all_gather(const at::Tensor& t, int64_t dim) const {
  if (t.device() != device) {
    return all_gather(t.to(device), dim).to(t.device());
  }
  const auto in = t.contiguous();
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < size(); ++i) {
    parts.push_back(at::empty_like(in));
  }
  std::vector<std::vector<at::Tensor>> out = {parts};
  std::vector<at::Tensor> inputs = {in};
  wait(backend->allgather(out, inputs), *this, "all_gather");
  return at::cat(out[0], dim);
}

void Group::barrier() const {
  wait(backend->barrier(), *this, "barrier");
}

void Group::barrier(std::chrono::milliseconds timeout) const {
  c10d::BarrierOptions o;
  o.timeout = timeout;
  wait(backend->barrier(o), *this, "barrier", timeout);
}

} // namespace moeyard::parallel
