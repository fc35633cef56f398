// The handler only touches lock-free atomics and writes one line (all
// async-signal-safe); the training loop reads the flag between steps.
#include "stop_signal.h"

#include <csignal>
#include <cstring>

#include <sys/wait.h>
#include <unistd.h>

namespace moev::app {
namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};   // the first stop signal
std::atomic<int> g_sigints{0};  // SIGINTs so far: the second stops at once
static_assert(std::atomic<bool>::is_always_lock_free && std::atomic<int>::is_always_lock_free,
              "the handler needs lock-free atomics");

void say(const char* text) {
  // Nothing to do on a failed write inside a handler; the stop goes on.
  if (::write(STDERR_FILENO, text, std::strlen(text)) < 0) return;
}

void on_stop_signal(int sig) {
  // Only a second SIGINT: under `moev launch` one Ctrl-C brings each rank the
  // terminal's SIGINT and the launcher's SIGTERM, in either order.
  if (sig == SIGINT && g_sigints.fetch_add(1) >= 1) {  // impatience wins; the last checkpoint stays (atomic writes)
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
    return;
  }
  int none = 0;
  if (!g_signal.compare_exchange_strong(none, sig)) return;  // already stopping
  g_stop.store(true);
  // Said before knowing where the run is: while images are still read there is no step to save.
  say(sig == SIGINT   ? "\nmoev: interrupted: stopping; a run in training saves a checkpoint after its current step "
                        "(Ctrl-C again stops at once)\n"
      : sig == SIGHUP ? "\nmoev: SIGHUP (its terminal closed): stopping; a run in training saves a checkpoint after "
                        "its current step\n"
                      : "\nmoev: SIGTERM: stopping; a run in training saves a checkpoint after its current step\n");
}

}  // namespace

const std::atomic<bool>* stop_on_signals() {
  static const bool installed = [] {
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;  // reads and waits in progress go on rather than fail with EINTR
    ::sigaction(SIGINT, &sa, nullptr);
    ::sigaction(SIGTERM, &sa, nullptr);
    // A closed terminal (an ssh session that dropped) killed a run without saving: it stops as SIGTERM asks.
    // Unless started under nohup (SIGHUP ignored), which asks the run to go on.
    struct sigaction hup {};
    if (::sigaction(SIGHUP, nullptr, &hup) == 0 && hup.sa_handler != SIG_IGN) ::sigaction(SIGHUP, &sa, nullptr);
    // A rank whose launcher was killed writes into a pipe nobody reads: that
    // write must fail, not kill the rank before it saved.
    std::signal(SIGPIPE, SIG_IGN);
    return true;
  }();
  (void)installed;
  return &g_stop;
}

// A rank of a job stopped by another rank's signal got none itself: it stopped as a SIGTERM asked.
bool stopped_on_request(int wait_status) {
  return WIFEXITED(wait_status) &&
         (WEXITSTATUS(wait_status) == 128 + SIGINT || WEXITSTATUS(wait_status) == 128 + SIGTERM ||
          WEXITSTATUS(wait_status) == 128 + SIGHUP);
}

int stop_exit_code() { return 128 + (g_signal.load() ? g_signal.load() : SIGTERM); }

}  // namespace moev::app
