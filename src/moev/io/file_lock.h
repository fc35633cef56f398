// An exclusive, non-blocking lock on a file (flock), held for the object's
// life: one process at a time writes a run directory. The kernel drops the
// lock when the process dies, so a killed run never leaves a stale lock.
#pragma once

#include <string>

namespace moev::io {

class FileLock {
 public:
  // Creates `path` if needed and locks it; held by another process: a
  // moev::Error "<who> is in use by another process (<path> is locked)". On a
  // file system without flock the object holds no lock.
  FileLock(const std::string& path, const std::string& who);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace moev::io
