// Run directories held by one process: a second holder is refused naming the
// lock, and a run refused before it wrote anything leaves the directory as it
// found it (made by it: gone; there before: without the lock file it added).
#include "moev/io/file_lock.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "support/expect_error.h"
#include "support/temp_dir.h"

namespace fs = std::filesystem;
using namespace moev;

TEST(RunDirectoryLock, ASecondHolderIsRefused) {
  test::TempDir dir;
  io::RunDirectoryLock held(dir.file("run"), ".train.lock", "train.out_dir = run");
  test::expect_error([&] { io::RunDirectoryLock again(dir.file("run"), ".train.lock", "train.out_dir = run"); },
                     {"train.out_dir = run", "in use by another process", ".train.lock"});
}

TEST(RunDirectoryLock, AbandonLeavesTheDirectoryAsItWas) {
  test::TempDir dir;
  {  // made by the lock: removed
    io::RunDirectoryLock lock(dir.file("new"), ".sweep.lock", "sweep --out new");
    lock.abandon();
  }
  EXPECT_FALSE(fs::exists(dir.file("new")));
  // There before, with the user's file: the lock file goes, the file stays (a stray .sweep.lock made the
  // directory read as a sweep's).
  fs::create_directories(dir.file("old"));
  std::ofstream(dir.file("old/notes.txt")) << "mine";
  {
    io::RunDirectoryLock lock(dir.file("old"), ".sweep.lock", "sweep --out old");
    lock.abandon();
  }
  EXPECT_TRUE(fs::exists(dir.file("old/notes.txt")));
  EXPECT_FALSE(fs::exists(dir.file("old/.sweep.lock")));
  // A run that wrote before it failed keeps its lock file: it marks what it wrote as a run's.
  {
    io::RunDirectoryLock lock(dir.file("old"), ".train.lock", "train.out_dir = old");
    std::ofstream(dir.file("old/config.json")) << "{}";
    lock.abandon();
  }
  EXPECT_TRUE(fs::exists(dir.file("old/.train.lock")));
  // A lock file there before (an earlier run's) stays.
  {
    io::RunDirectoryLock lock(dir.file("old"), ".train.lock", "train.out_dir = old");
    lock.abandon();
  }
  EXPECT_TRUE(fs::exists(dir.file("old/.train.lock")));
}
