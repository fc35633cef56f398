// The `moev` command: train, eval and predict for Mixture-of-Experts image
// classifiers. Errors are printed on one line and exit with status 1.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>

#include <fcntl.h>
#include <unistd.h>

#include <c10/util/Exception.h>
#include <glog/logging.h>

#include "commands.h"
#include "stop_signal.h"
#include "moev/core/error.h"

namespace {

// A closed standard stream (`moev eval ... >&-`) would hand its descriptor to
// the next file opened (a checkpoint, a log), and printed lines would go into
// that file. Closed ones read and write /dev/null instead.
void keep_standard_streams_open() {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    const int n = ::open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
    if (n >= 0 && n != fd) {
      ::dup2(n, fd);
      ::close(n);
    }
  }
}

// Results printed to a full disk or device (`moev eval --json > res.json`)
// were lost at exit 0: what stdout still buffers is written and checked.
int flushed(int code) {
  std::cout.flush();
  errno = 0;
  if (std::fflush(stdout) == 0 && !std::ferror(stdout) && std::cout.good()) return code;
  std::cerr << "moev: error: writing to standard output failed (" << (errno ? std::strerror(errno) : "write error")
            << "); the results printed are incomplete\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  keep_standard_streams_open();
  // LibTorch logs (its warnings too) through glog, which, never initialised, began with "Logging before
  // InitGoogleLogging()". Every level still goes to stderr, as before (an initialised glog would otherwise write
  // files under /tmp); the rendezvous quiets its own socket lines (dist/communicator.cpp).
  FLAGS_logtostderr = true;
  google::InitGoogleLogging("moev");
  CLI::App app{"moev: Mixture-of-Experts image classification (V-MoE, ViT, ConvNeXt, multi-branch ResNeSt, hard MoE) on LibTorch"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moev 0.1.0");
  std::vector<std::pair<CLI::App*, moev::app::Runner>> runners;
  auto add = [&](moev::app::Runner r) { runners.emplace_back(app.get_subcommands({}).back(), r); };
  add(moev::app::add_train(app));
  add(moev::app::add_eval(app));
  add(moev::app::add_predict(app));
  add(moev::app::add_analyze(app));
  add(moev::app::add_sweep(app));
  add(moev::app::add_launch(app));
  add(moev::app::add_checkpoint(app));
  add(moev::app::add_pretrain(app));
  add(moev::app::add_fuse(app));
  add(moev::app::add_ablation(app));
  add(moev::app::add_ensemble(app));
  add(moev::app::add_data(app));
  add(moev::app::add_hardmoe(app));
  // The (sub)command being parsed when a usage error came, and how to name it.
  auto deepest = [&app] {
    CLI::App* at = &app;
    while (!at->get_subcommands().empty()) at = at->get_subcommands().front();
    return at;
  };
  auto name_of = [&app](const CLI::App* at) {
    std::string name = at->get_name();
    for (const CLI::App* p = at->get_parent(); p && p != &app; p = p->get_parent()) name = p->get_name() + " " + name;
    return at == &app ? std::string("moev") : "moev " + name;
  };
  // A command that needs a subcommand and got none, or a word that is not one: CLI11's "A subcommand is
  // required" did not say which word was not one. Returns false when that is not the case.
  auto missing_subcommand = [&](CLI::App* at) {
    if (at->get_require_subcommand_min() == 0 || !at->get_subcommands().empty()) return false;
    const std::string where = name_of(at);
    std::string names;
    for (const auto* sub : at->get_subcommands({})) names += (names.empty() ? "" : ", ") + sub->get_name();
    const auto rest = at->remaining();
    std::cerr << "moev: error: " << (at == &app ? "" : where + ": ")
              << (rest.empty()                ? "a subcommand is required"
                  : rest.front().rfind('-', 0) == 0 ? "'" + rest.front() + "' is not an option here"
                                                    : "'" + rest.front() + "' is not a subcommand")
              << "; expected one of: " << names << " (" << where << " --help)\n";
    return true;
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::RequiredError& e) {
    if (missing_subcommand(deepest())) return 1;
    std::cerr << "moev: error: " << e.what() << " (" << name_of(deepest()) << " --help)\n";
    return 1;
  } catch (const CLI::ParseError& e) {
    // `moev hardmoe eval --help` printed hardmoe's help at status 0, as if `hardmoe eval` were a command.
    if (e.get_exit_code() == 0 && !deepest()->remaining().empty() && missing_subcommand(deepest())) return 1;
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    // Usage errors as every other error reads: one line, moev's prefix, status 1 (CLI11's own were 105-114).
    const std::string where = name_of(deepest());
    // `moev launch --nproc 2 train --epochs 1` read train's flags as launch's.
    const bool launch_flags = where == "moev launch" && dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr;
    std::cerr << "moev: error: " << e.what()
              << (launch_flags ? "; the command's own flags go after --: moev launch --nproc 2 -- train --out ..."
                               : "")
              << " (" << where << " --help)\n";
    return 1;
  }
  try {
    for (auto& [cmd, run] : runners)
      if (cmd->parsed()) return flushed(run());
  } catch (const moev::Stopped& e) {  // asked to stop, and saved: not an error of the input
    std::cerr << "moev: " << e.what() << "\n";
    return flushed(moev::app::stop_exit_code());
  } catch (const moev::Error& e) {
    std::cerr << "moev: error: " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::cerr << "moev: error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "moev: error: " << e.what() << "\n";
    return 1;
  }
  return 1;
}
