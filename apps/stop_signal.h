// SIGINT, SIGTERM and SIGHUP as a request to stop training cleanly: a scheduler's
// SIGTERM comes with a grace period before its SIGKILL, and Ctrl-C should not
// cost the steps since the last checkpoint. Only commands that watch the flag
// (train, pretrain, sweep, hardmoe train-expert; hardmoe train-all and ablation,
// which pass it on to their runs) install it.
#pragma once

#include <atomic>

namespace moev::app {

// Installs the handlers (once) and returns the flag they set. The first signal
// asks the command to stop: it ends the step in progress, saves its checkpoint
// and exits with stop_exit_code(). A later SIGTERM changes nothing (a launcher
// or scheduler may send it again); a second SIGINT stops at once. SIGPIPE is
// ignored from then on (a write to a closed pipe fails instead).
const std::atomic<bool>* stop_on_signals();

// The exit status of a command that stopped on request: 128 + the signal
// that asked (130 SIGINT, 143 SIGTERM, 129 SIGHUP); 143 in a rank that stopped because
// another rank of its job was asked.
int stop_exit_code();

// Whether a child's wait status is such an exit (130 or 143, not a kill by a
// signal): it saved and the same command continues it.
bool stopped_on_request(int wait_status);

}  // namespace moev::app
