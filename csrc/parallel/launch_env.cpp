// Where a process sits in a launch (LaunchEnv from torchrun's or Slurm's
// variables) and the rendezvous store rank 0 serves on MASTER_ADDR; the
// groups and their collectives are in process_group.cpp.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>

#include "parallel/process_group.h"
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

} // namespace moeyard::parallel
