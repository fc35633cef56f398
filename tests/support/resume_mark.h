// A mark in a cut run's log.jsonl that a resumed run keeps: a run started again
// from step 0 with the same seed ends with the same weights as a true resume, so
// equal weights alone cannot tell the two apart; the mark can (a new run
// truncates the log, a resumed one keeps the lines its checkpoint covers).
#pragma once

#include <filesystem>
#include <fstream>
#include <string>

namespace moev::test {

inline constexpr const char* kResumeMark = R"({"step": 0, "resume_mark": true})";

inline void mark_log(const std::string& out_dir) {
  std::ofstream(std::filesystem::path(out_dir) / "log.jsonl", std::ios::app) << kResumeMark << "\n";
}

inline bool log_has_mark(const std::string& out_dir) {
  std::ifstream in(std::filesystem::path(out_dir) / "log.jsonl");
  for (std::string line; std::getline(in, line);)
    if (line == kResumeMark) return true;
  return false;
}

}  // namespace moev::test
