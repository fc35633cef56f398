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
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd_);
    fail(who, " is in use by another process (", path, " is locked)");
  }
}

FileLock::~FileLock() { ::close(fd_); }  // closing releases the lock

}  // namespace moev::io
