// Child processes of the `moev` command itself (ablation runs, hard MoE
// experts): each is this binary started again with other arguments, its
// stdout and stderr appended to a log file, so a run's output survives the
// scheduler and a rerun can resume it.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moev::app {

// Starts /proc/self/exe with args (args[0] is its name), output appended to
// log_path; `what` names the scheduler in errors. Returns the child's pid.
pid_t spawn_self(const std::vector<std::string>& args, const std::string& log_path, const std::string& what);

// Children still running when the scheduler leaves early (an error) are
// stopped and reaped, so none goes on writing a directory a rerun would resume.
struct Children {
  std::map<pid_t, size_t> running;  // pid -> the scheduler's task index
  ~Children();
  // Once `stop` (stop_on_signals) is set: asks every running child to stop with
  // SIGTERM, once; they save and exit 143. A scheduler stopped with SIGTERM alone
  // reached no child (Ctrl-C reaches the whole process group; a scheduler's
  // SIGTERM only this process).
  void pass_on_stop(const std::atomic<bool>* stop);

 private:
  bool passed_ = false;
};

// Whether a child ended as a stop asked: it saved and exited 130/143, or, once
// `stop` is set, the SIGTERM or SIGINT passed on ended it where it had nothing to
// save (fuse, ensemble, a train not yet past its start).
// A child's wait status for people: "exit 1", or "signal 9, Killed" for a child killed by one (its own
// log cannot say so).
std::string wait_status_text(int wait_status);

bool ended_by_stop(int wait_status, const std::atomic<bool>* stop);

// The last line of <run_dir>/log.jsonl that has `key` (null if none): how a
// scheduler follows, or reads the result of, a child's training run.
nlohmann::json last_log_line(const std::string& run_dir, const std::string& key);

}  // namespace moev::app
