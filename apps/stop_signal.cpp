// The handler only sets a flag and writes one line (both async-signal-safe);
// the training loop reads the flag between steps.
#include "stop_signal.h"

#include <csignal>
#include <cstring>

#include <unistd.h>

namespace moev::app {
namespace {

std::atomic<bool> g_stop{false};
volatile std::sig_atomic_t g_signal = 0;
static_assert(std::atomic<bool>::is_always_lock_free, "the handler needs a lock-free flag");

void say(const char* text) {
  // Nothing to do on a failed write inside a handler; the stop goes on.
  if (::write(STDERR_FILENO, text, std::strlen(text)) < 0) return;
}

void on_stop_signal(int sig) {
  if (g_signal == 0) {
    g_signal = sig;
    g_stop.store(true);
    say(sig == SIGINT ? "\nmoev: interrupted: saving a checkpoint after this step (Ctrl-C again stops at once)\n"
                      : "\nmoev: SIGTERM: saving a checkpoint after this step, then stopping\n");
    return;
  }
  if (sig == SIGINT) {  // impatience wins: the last checkpoint stays as it was (writes are atomic)
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
  }
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
    return true;
  }();
  (void)installed;
  return &g_stop;
}

int stop_exit_code() { return g_signal ? 128 + static_cast<int>(g_signal) : 1; }

}  // namespace moev::app
