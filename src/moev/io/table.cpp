#include "moev/io/table.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "moev/core/error.h"

namespace moev::io {

void Table::add(std::vector<std::string> row) {
  MOEV_CHECK(row.size() == header.size(), "table row has ", row.size(), " cells, header has ",
             header.size());
  rows.push_back(std::move(row));
}

namespace {
std::string csv_cell(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}
}  // namespace

std::string Table::csv() const {
  std::ostringstream out;
  auto line = [&](const std::vector<std::string>& r) {
    for (size_t i = 0; i < r.size(); ++i) out << (i ? "," : "") << csv_cell(r[i]);
    out << "\n";
  };
  line(header);
  for (const auto& r : rows) line(r);
  return out.str();
}

std::string Table::markdown() const {
  std::ostringstream out;
  auto line = [&](const std::vector<std::string>& r) {
    out << "|";
    for (const auto& c : r) out << " " << c << " |";
    out << "\n";
  };
  line(header);
  out << "|";
  for (size_t i = 0; i < header.size(); ++i) out << "---|";
  out << "\n";
  for (const auto& r : rows) line(r);
  return out.str();
}

void write_text_atomic(const std::string& path, const std::string& text) {
  namespace fs = std::filesystem;
  const fs::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) fs::create_directories(p.parent_path(), ec);
  // A name of this process's own: two writers of one file (or a user's
  // "<path>.tmp") never meet in the temporary file, and a failed write leaves
  // nothing behind.
  static std::atomic<uint64_t> serial{0};
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(serial++);
  auto failed = [&](const std::string& why) {
    fs::remove(tmp, ec);
    fail("cannot write ", path, why);
  };
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out.good()) failed(" (is its directory writable?)");
    out << text;
    out.flush();
    if (!out.good()) failed(": write failed (disk full?)");
  }
  fs::rename(tmp, p, ec);
  if (ec) failed(": " + ec.message());
}

std::string read_text(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  MOEV_CHECK(in.good(), what, " ", path, ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  MOEV_CHECK(!in.bad(), what, " ", path, ": read failed");
  return ss.str();
}

std::string fmt(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

}  // namespace moev::io
