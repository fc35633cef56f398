#include "moev/io/file_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

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

}  // namespace moev::io
