// Runs the real `moev` binary with arguments (and optional environment
// assignments before it), capturing stdout and stderr together; or starts it in
// the background, to be signalled while it trains.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

namespace moev::test {

struct CliResult {
  int code;         // exit status (128 + signal when killed)
  std::string out;  // stdout and stderr, interleaved
};

inline CliResult run_cli(const std::string& args, const std::string& env = "") {
  const std::string cmd = env + (env.empty() ? "" : " ") + std::string(MOEV_CLI_PATH) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

// `moev args` in the background, its stdout and stderr into `output`; its pid.
inline pid_t start_cli(const std::string& args, const std::string& output) {
  // Built before the fork: the child of a threaded process may only make async-signal-safe calls.
  const std::string cmd = "exec " + std::string(MOEV_CLI_PATH) + " " + args + " > '" + output + "' 2>&1";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// The exit status of a process start_cli started (128 + signal when killed).
inline int wait_cli(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Whether process `pid` has ended (a zombie not yet waited for counts as ended).
inline bool has_ended(pid_t pid) {
  std::string stat;
  if (FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r")) {
    for (int c; (c = std::fgetc(f)) != EOF;) stat += static_cast<char>(c);
    std::fclose(f);
  }
  const auto close = stat.rfind(')');
  return close == std::string::npos || close + 2 >= stat.size() || stat[close + 2] == 'Z';
}

// Waits up to `seconds` for `path` to hold at least `lines` lines; whether it
// did. With `pid`: gives up as soon as that process has ended (an error at start).
inline bool wait_for_lines(const std::string& path, int lines, double seconds = 60, pid_t pid = -1) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < until) {
    int n = 0;
    if (FILE* f = std::fopen(path.c_str(), "r")) {
      for (int c; (c = std::fgetc(f)) != EOF;) n += c == '\n';
      std::fclose(f);
    }
    if (n >= lines) return true;
    if (pid > 0 && has_ended(pid)) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace moev::test
