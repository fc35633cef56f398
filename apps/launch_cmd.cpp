// `moev launch --nproc N -- train ...`: starts N local ranks of a distributed job
// with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT) and forwards their output line by line with a rank
// prefix. Any other launcher (torchrun, Slurm, mpirun, Kubernetes) that sets the
// same variables starts the same job; dist_from_environment reads them.
#include <algorithm>
#include <numeric>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "commands.h"
#include "stop_signal.h"
#include "moev/core/error.h"

namespace moev::app {

namespace {

// An integer environment variable, or fallback when unset; a malformed value is
// an error naming the variable.
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  errno = 0;
  const long n = std::strtol(v, &end, 10);
  MOEV_CHECK(errno == 0 && end && *end == '\0', "environment ", name, " = '", v, "': expected an integer");
  return static_cast<int>(n);
}

std::string env_str(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

// The ranks' pids, for the signal handler (-1: not started).
std::vector<pid_t> g_children;

void stop_children(int sig) {
  for (pid_t p : g_children)
    if (p > 0) ::kill(p, sig);
}

// Always as SIGTERM: a terminal's Ctrl-C reaches the ranks already (one process
// group), and a second SIGINT would stop them at once, before they saved.
// The launcher's own exit then says which signal asked (130 for Ctrl-C), not the one
// each rank happened to see first.
volatile std::sig_atomic_t g_asked_by = 0;
void forward_signal(int sig) {
  if (!g_asked_by) g_asked_by = sig;
  stop_children(SIGTERM);
}

struct Child {
  pid_t pid = -1;
  int fd = -1;          // read end of the child's stdout + stderr
  std::string pending;  // a partial line not yet printed
  int status = -1;      // exit code once it ended (128 + signal when killed)
  int wait_status = 0;  // as waitpid gave it
  int ended = -1;       // the order in which it was seen to end (0: first)
};

void forward(Child& c, int rank, const char* data, size_t n) {
  c.pending.append(data, n);
  size_t start = 0, nl;
  while ((nl = c.pending.find('\n', start)) != std::string::npos) {
    std::cout << "[rank " << rank << "] " << c.pending.substr(start, nl - start) << "\n";
    start = nl + 1;
  }
  c.pending.erase(0, start);
  std::cout.flush();
}

}  // namespace

dist::DistConfig dist_from_environment(const io::RunConfig& cfg) {
  dist::DistConfig d;
  d.timeout_s = cfg.train.dist_timeout;
  d.world_size = env_int("WORLD_SIZE", 1);
  if (d.world_size == 1) return d;  // not a distributed job, whatever else the environment says
  d.rank = env_int("RANK", 0);
  d.local_rank = env_int("LOCAL_RANK", d.rank);
  d.master_addr = env_str("MASTER_ADDR", d.master_addr);
  d.master_port = env_int("MASTER_PORT", d.master_port);
  d.interface = env_str("GLOO_SOCKET_IFNAME", "");
  dist::validate(d);
  // A partial environment (WORLD_SIZE and RANK by hand) waited out the whole timeout without a word.
  if (!std::getenv("MASTER_ADDR") || !std::getenv("MASTER_PORT"))
    std::cerr << "moev: note: rank " << d.rank << " of " << d.world_size << ": MASTER_ADDR or MASTER_PORT is not "
              << "set; meeting the other ranks at " << d.master_addr << ":" << d.master_port << ", waiting up to "
              << d.timeout_s << " s (train.dist_timeout)\n";
  return d;
}

int local_world_size() { return std::max(1, env_int("LOCAL_WORLD_SIZE", 1)); }

Runner add_launch(CLI::App& app) {
  struct Flags {
    int nproc = 2, nnodes = 1, node_rank = 0, master_port = 29500;
    std::string master_addr = "127.0.0.1";
    std::vector<std::string> command;
  };
  auto f = std::make_shared<Flags>();
  auto* cmd = app.add_subcommand("launch", "start N local ranks of a distributed job (torchrun's environment)");
  cmd->add_option("--nproc", f->nproc, "ranks on this machine")->capture_default_str();
  cmd->add_option("--nnodes", f->nnodes, "machines in the job")->capture_default_str();
  cmd->add_option("--node-rank", f->node_rank, "this machine's index, 0 .. nnodes-1")->capture_default_str();
  cmd->add_option("--master-addr", f->master_addr, "host of rank 0")->capture_default_str();
  cmd->add_option("--master-port", f->master_port, "TCP port of rank 0's store")->capture_default_str();
  cmd->add_option("command", f->command, "the moev subcommand and its arguments, after --")->required();
  cmd->footer(
      "Examples:\n"
      "  moev launch --nproc 2 -- train --config configs/vmoe_tiny_fmnist.toml --out runs/dp2\n"
      "  # two machines, run on each with its --node-rank:\n"
      "  moev launch --nnodes 2 --node-rank 0 --nproc 2 --master-addr 10.0.0.1 -- train ...");
  return [f]() {
    // Each rank is a LibTorch process; far past the cores they only contend.
    constexpr int kMaxRanks = 1024;
    MOEV_CHECK(f->nproc >= 1 && f->nproc <= kMaxRanks, "--nproc ", f->nproc, ": expected 1..", kMaxRanks,
               " ranks on this machine");
    // 1000 ranks on 2 cores ran into the rendezvous timeout, each rank flooding LibTorch's log lines.
    // The cores this process may run on (taskset, a cgroup's cpuset), not all the machine has.
    cpu_set_t allowed;
    const int cores = ::sched_getaffinity(0, sizeof allowed, &allowed) == 0
                          ? std::max(1, CPU_COUNT(&allowed))
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    MOEV_CHECK(f->nproc <= 16 * cores, "--nproc ", f->nproc, ": this machine has ", cores, " cores, so each rank ",
               "would get less than 1/16 of one; expected at most ", 16 * cores, " (one rank per core is the ",
               "usual choice)");
    if (f->nproc > cores)
      std::cerr << "moev launch: note: " << f->nproc << " ranks on " << cores << " cores share them (one thread "
                << "each): steps run slower than with " << cores << " ranks\n";
    MOEV_CHECK(f->nnodes >= 1 && f->nnodes <= kMaxRanks, "--nnodes ", f->nnodes, ": expected 1..", kMaxRanks);
    MOEV_CHECK(f->node_rank >= 0 && f->node_rank < f->nnodes, "--node-rank ", f->node_rank,
               ": expected 0 .. --nnodes - 1 = ", f->nnodes - 1);
    MOEV_CHECK(f->master_port >= 1 && f->master_port <= 65535, "--master-port ", f->master_port,
               ": expected a TCP port, 1..65535");
    // Only train joins a job; any other command would run N times over one output directory.
    MOEV_CHECK(f->command[0] == "train", "'", f->command[0], "' does not run as ranks of a distributed job ",
               "(moev launch starts train); run it without moev launch");
    for (size_t i = 1; i < f->command.size(); ++i) {
      const std::string& a = f->command[i];
      if ((a == "--config" || a == "-c") && i + 1 < f->command.size())
        check_rereadable_config(f->command[i + 1], "rank");
      else if (a.rfind("--config=", 0) == 0) check_rereadable_config(a.substr(9), "rank");
      else if (a.size() > 2 && a.rfind("-c", 0) == 0) check_rereadable_config(a.substr(a[2] == '=' ? 3 : 2), "rank");
    }
    const int world = f->nproc * f->nnodes;
    std::vector<Child> kids(f->nproc);
    g_children.assign(f->nproc, -1);
    // Ctrl-C or a scheduler's SIGTERM to the launcher reaches every rank.
    std::signal(SIGINT, forward_signal);
    std::signal(SIGTERM, forward_signal);
    const pid_t launcher = ::getpid();
    for (int i = 0; i < f->nproc; ++i) {
      int fds[2];
      // Close-on-exec: a rank must not inherit the other ranks' pipes.
      if (::pipe2(fds, O_CLOEXEC) != 0 || (g_children[i] = ::fork()) < 0) {
        stop_children(SIGTERM);
        fail("moev launch: starting rank ", i, ": ", std::strerror(errno));
      }
      const pid_t pid = g_children[i];
      if (pid == 0) {
        // A launcher killed outright (SIGKILL: a scheduler, the OOM killer) cannot stop its ranks: the kernel
        // does, so none goes on training into the run directory and holding its lock. A launcher gone before
        // this line is seen as a new parent.
        ::prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (::getppid() != launcher) ::_exit(143);
        ::dup2(fds[1], STDOUT_FILENO);
        ::dup2(fds[1], STDERR_FILENO);
        ::close(fds[0]);
        ::close(fds[1]);
        const std::map<std::string, std::string> env = {
            {"RANK", std::to_string(f->node_rank * f->nproc + i)},
            {"WORLD_SIZE", std::to_string(world)},
            {"LOCAL_RANK", std::to_string(i)},
            {"LOCAL_WORLD_SIZE", std::to_string(f->nproc)},
            {"MASTER_ADDR", f->master_addr},
            {"MASTER_PORT", std::to_string(f->master_port)}};
        for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
        std::vector<char*> argv{const_cast<char*>("moev")};
        for (auto& a : f->command) argv.push_back(const_cast<char*>(a.c_str()));
        argv.push_back(nullptr);
        ::execv("/proc/self/exe", argv.data());
        std::fprintf(stderr, "moev launch: exec failed: %s\n", std::strerror(errno));
        ::_exit(127);
      }
      ::close(fds[1]);
      kids[i].pid = pid;
      kids[i].fd = fds[0];
    }
    // Forward output until every child closed its pipe; then collect exit codes.
    // After the first failure the others get a few seconds to fail on their
    // own (with their own message), then they are stopped: a job with a dead
    // rank cannot finish, and its peers would wait out train.dist_timeout.
    int open_fds = f->nproc;
    std::chrono::steady_clock::time_point first_failure{};
    bool failed = false;
    int ended = 0;  // ranks seen to end so far
    // A rank that stopped on request (130, 143) saves on its way out, and so do
    // its peers: they are asked, not killed. After any other failure a rank that
    // takes a SIGTERM as a request to stop may be waiting on the dead one.
    bool asked_to_stop = false;
    char buf[4096];
    while (open_fds > 0) {
      std::vector<pollfd> pf;
      std::vector<int> who;
      for (int i = 0; i < f->nproc; ++i)
        if (kids[i].fd >= 0) {
          pf.push_back({kids[i].fd, POLLIN, 0});
          who.push_back(i);
        }
      const int ready = ::poll(pf.data(), pf.size(), 1000);
      if (ready < 0 && errno != EINTR) break;
      for (size_t j = 0; j < pf.size(); ++j) {
        if (!(pf[j].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        Child& c = kids[who[j]];
        const ssize_t n = ::read(c.fd, buf, sizeof buf);
        if (n > 0) {
          forward(c, f->node_rank * f->nproc + who[j], buf, static_cast<size_t>(n));
        } else {
          if (!c.pending.empty()) forward(c, f->node_rank * f->nproc + who[j], "\n", 1);
          ::close(c.fd);
          c.fd = -1;
          --open_fds;
        }
      }
      for (auto& c : kids) {
        int st = 0;
        if (c.status < 0 && c.pid > 0 && ::waitpid(c.pid, &st, WNOHANG) == c.pid) {
          c.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
          c.wait_status = st;
          c.ended = ended++;
          if (c.status != 0 && !failed) {
            failed = true;
            asked_to_stop = stopped_on_request(st);
            first_failure = std::chrono::steady_clock::now();
          }
        }
      }
      const auto since = std::chrono::steady_clock::now() - first_failure;
      if (failed && since > std::chrono::seconds(5))
        for (auto& c : kids)
          if (c.status < 0) ::kill(c.pid, !asked_to_stop && since > std::chrono::seconds(15) ? SIGKILL : SIGTERM);
    }
    int code = 0;
    for (auto& c : kids)
      if (c.status < 0) {
        int st = 0;
        ::waitpid(c.pid, &st, 0);
        c.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        c.wait_status = st;
        c.ended = ended++;
      }
    // In the order they ended: the first failure is the cause (a killed rank), the others' errors its effect.
    std::vector<int> order(kids.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return kids[a].ended < kids[b].ended; });
    for (const int i : order) {
      auto& c = kids[i];
      if (c.status != 0) {
        std::cerr << "moev launch: rank " << f->node_rank * f->nproc + i;
        if (WIFSIGNALED(c.wait_status))
          std::cerr << " was ended by signal " << c.status - 128 << " (status " << c.status << ")\n";
        else
          std::cerr << (stopped_on_request(c.wait_status) ? " stopped on request" : " exited") << " with status "
                    << c.status << "\n";
        if (code == 0) code = c.status;
      }
    }
    // Asked to stop, and every rank that ended early stopped as asked: the status of the launcher's signal.
    bool all_as_asked = true;
    for (const auto& c : kids) all_as_asked = all_as_asked && (c.status == 0 || stopped_on_request(c.wait_status));
    if (g_asked_by && code != 0 && all_as_asked) code = 128 + g_asked_by;
    return code;
  };
}

}  // namespace moev::app
