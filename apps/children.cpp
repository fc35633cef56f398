#include "children.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "moev/core/error.h"
#include "stop_signal.h"
#include "moev/io/table.h"

namespace moev::app {

pid_t spawn_self(const std::vector<std::string>& args, const std::string& log_path, const std::string& what) {
  // Everything the child needs is built before fork: it only redirects and execs.
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  MOEV_CHECK(fd >= 0, what, ": cannot open ", log_path, ": ", std::strerror(errno));
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fd);
    fail(what, ": fork failed: ", std::strerror(errno));
  }
  if (pid == 0) {
    // A scheduler killed outright (SIGKILL) cannot stop its children: the
    // kernel does, so no orphan goes on writing a directory a rerun resumes.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(143);  // the scheduler died before the line above
    ::dup2(fd, 1);  // dup2's copies do not inherit close-on-exec
    ::dup2(fd, 2);
    ::execv("/proc/self/exe", argv.data());
    std::fprintf(stderr, "moev %s: exec failed: %s\n", what.c_str(), std::strerror(errno));
    ::_exit(127);
  }
  ::close(fd);
  return pid;
}

std::string wait_status_text(int wait_status) {
  if (WIFEXITED(wait_status)) return "exit " + std::to_string(WEXITSTATUS(wait_status));
  const int sig = WTERMSIG(wait_status);
  return "signal " + std::to_string(sig) + ", " + ::strsignal(sig);
}

bool ended_by_stop(int wait_status, const std::atomic<bool>* stop) {
  if (stopped_on_request(wait_status)) return true;
  return stop && stop->load() && WIFSIGNALED(wait_status) &&
         (WTERMSIG(wait_status) == SIGTERM || WTERMSIG(wait_status) == SIGINT || WTERMSIG(wait_status) == SIGHUP);
}

void Children::pass_on_stop(const std::atomic<bool>* stop) {
  if (!stop || !stop->load() || passed_) return;
  for (const auto& [pid, task] : running) ::kill(pid, SIGTERM);
  passed_ = true;
}

Children::~Children() {
  for (const auto& [pid, task] : running) ::kill(pid, SIGTERM);
  for (const auto& [pid, task] : running) ::waitpid(pid, nullptr, 0);
}

nlohmann::json last_log_line(const std::string& run_dir, const std::string& key) {
  nlohmann::json last;
  io::last_line_where((std::filesystem::path(run_dir) / "log.jsonl").string(), [&](const std::string& line) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains(key)) return false;
    last = std::move(j);
    return true;
  });
  return last;
}

}  // namespace moev::app
