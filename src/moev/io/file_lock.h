// An exclusive, non-blocking lock on a file (flock), held for the object's
// life: one process at a time writes a run directory. The kernel drops the
// lock when the process dies, so a killed run never leaves a stale lock.
// RunDirectoryLock makes and locks a run directory with it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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

// A run directory held by one process: made if missing, then locked through
// the file `lock_name` in it. A run refused before it wrote anything calls
// abandon(), which leaves no directory behind that this object made.
class RunDirectoryLock {
 public:
  // `who` names the setting the directory came from ("train.out_dir = runs/a").
  RunDirectoryLock(const std::string& dir, const std::string& lock_name, const std::string& who);
  void abandon();

 private:
  static int64_t entries(const std::string& dir);
  std::string dir_, lock_file_;
  bool created_ = false;
  int64_t entries_before_ = -1;  // a directory that was there without the lock file: its entries then
  std::unique_ptr<FileLock> lock_;
};

// A directory a moev command owns is marked by that command's lock file (a
// training run's also by its checkpoint.pt): .train.lock, .pretrain.lock,
// .sweep.lock, .ablation.lock; a hard MoE's by its partition.json. Refuses `dir` when it is marked as a kind whose
// lock file is not in `own` (the kinds this command may write into): results
// of two kinds mixed in one directory. `who` names the setting ("sweep --out x").
void refuse_other_kinds(const std::string& dir, const std::vector<std::string>& own, const std::string& who);

// Runs `run` (returning its result) in `dir` held by a RunDirectoryLock; a run
// that throws leaves no directory behind that it made before writing anything.
template <class Run>
auto in_run_directory(const std::string& dir, const std::string& lock_name, const std::string& who, Run run) {
  RunDirectoryLock lock(dir, lock_name, who);
  try {
    return run();
  } catch (...) {
    lock.abandon();
    throw;
  }
}

}  // namespace moev::io
