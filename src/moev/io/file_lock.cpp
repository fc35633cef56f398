#include "moev/io/file_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iterator>

#include "moev/core/error.h"

namespace moev::io {

FileLock::FileLock(const std::string& path, const std::string& who) {
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  MOEV_CHECK(fd_ >= 0, who, ": cannot open ", path, ": ", std::strerror(errno));
  int rc;
  while ((rc = ::flock(fd_, LOCK_EX | LOCK_NB)) != 0 && errno == EINTR) {
  }
  if (rc == 0) return;
  const int err = errno;
  // A file system without flock (some network and FUSE mounts) cannot be
  // guarded this way; the run goes on unguarded rather than not at all.
  if (err == ENOLCK || err == ENOSYS || err == EOPNOTSUPP) return;
  ::close(fd_);
  fd_ = -1;
  MOEV_CHECK(err != EWOULDBLOCK, who, " is in use by another process (", path, " is locked)");
  fail(who, ": cannot lock ", path, ": ", std::strerror(err));
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the lock
}

RunDirectoryLock::RunDirectoryLock(const std::string& dir, const std::string& lock_name, const std::string& who)
    : dir_(dir), lock_file_((std::filesystem::path(dir) / lock_name).string()) {
  namespace fs = std::filesystem;
  std::error_code ec;
  created_ = !fs::exists(dir, ec);
  fs::create_directories(dir, ec);
  MOEV_CHECK(!ec && fs::is_directory(dir), who, ": cannot make the run directory (",
             ec ? ec.message() : "a file is in the way", "); expected a directory to write into (--out DIR)");
  if (!created_ && !fs::exists(lock_file_, ec)) entries_before_ = entries(dir_);
  lock_ = std::make_unique<FileLock>(lock_file_, who);
}

int64_t RunDirectoryLock::entries(const std::string& dir) {
  std::error_code ec;
  return std::distance(std::filesystem::directory_iterator(dir, ec), std::filesystem::directory_iterator());
}

void RunDirectoryLock::abandon() {
  namespace fs = std::filesystem;
  lock_.reset();
  std::error_code ec;
  if (created_ && fs::is_directory(dir_, ec) && entries(dir_) == 1 && fs::exists(lock_file_, ec)) {
    fs::remove(lock_file_, ec);
    fs::remove(dir_, ec);
  } else if (entries_before_ >= 0 && entries(dir_) == entries_before_ + 1) {
    // A directory that was there: the lock file this run added alone goes (it marks a directory as a run's, or
    // a sweep's, which the run refused before writing has not made it).
    fs::remove(lock_file_, ec);
  }
}

void refuse_other_kinds(const std::string& dir, const std::vector<std::string>& own, const std::string& who) {
  struct Kind {
    const char* lock;
    const char* other_mark;  // a file that marks it too (runs from before the lock files), or nullptr
    const char* name;
  };
  static const Kind kKinds[] = {{".train.lock", "checkpoint.pt", "a training run's"},
                                {".pretrain.lock", "pretrain.pt", "a pre-training run's"},
                                {".sweep.lock", nullptr, "a sweep's"},
                                {".ablation.lock", nullptr, "an ablation's"},
                                // No lock: moev hardmoe cluster writes its files atomically, and no command owns it.
                                {"partition.json", "hardmoe.json", "a hard MoE's"}};
  namespace fs = std::filesystem;
  std::error_code ec;
  for (const auto& k : kKinds) {
    if (std::find(own.begin(), own.end(), k.lock) != own.end()) continue;
    for (const char* mark : {k.lock, k.other_mark})
      MOEV_CHECK(!mark || !fs::exists(fs::path(dir) / mark, ec), who, ": ", dir, " is ", k.name, " directory (",
                 mark, "); its files and this command's would mix there: give another directory");
  }
}

}  // namespace moev::io
