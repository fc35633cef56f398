#include "moev/io/table.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>
#include <stb/stb_image_write.h>

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
  std::error_code ec;
  // A device or a pipe (--result /dev/stdout) is written into: renamed over, it
  // was replaced by a file (as root, /dev/full became one). A link is followed,
  // so the file it names is replaced, not the link.
  const auto kind = fs::status(path, ec).type();
  if (kind != fs::file_type::not_found && kind != fs::file_type::regular && kind != fs::file_type::directory &&
      kind != fs::file_type::none) {
    std::ofstream out(path, std::ios::binary);
    out << text;
    out.flush();
    MOEV_CHECK(out.good(), "cannot write ", path, " (", std::strerror(errno != 0 ? errno : EIO), ")");
    return;
  }
  const fs::path p = fs::is_symlink(path, ec) ? fs::weakly_canonical(path, ec) : fs::path(path);
  // A name of this process's own: two writers of one file (or a user's
  // "<path>.tmp") never meet in the temporary file, and a failed write leaves
  // nothing behind.
  if (p.has_parent_path()) fs::create_directories(p.parent_path(), ec);
  static std::atomic<uint64_t> serial{0};
  const std::string tmp = p.string() + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(serial++);
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

void write_png_atomic(const std::string& path, const unsigned char* pixels, int w, int h, int channels) {
  std::string bytes;
  auto append = [](void* to, void* data, int size) {
    static_cast<std::string*>(to)->append(static_cast<const char*>(data), static_cast<size_t>(size));
  };
  MOEV_CHECK(stbi_write_png_to_func(append, &bytes, w, h, channels, pixels, w * channels) != 0, "cannot encode PNG ",
             path, " (", w, "x", h, ", ", channels, " channels)");
  write_text_atomic(path, bytes);
}

std::string read_text(const std::string& path, const std::string& what) {
  // A directory opens and reads as empty (a config of defaults).
  std::error_code ec;
  MOEV_CHECK(!std::filesystem::is_directory(path, ec), what, " ", path, ": is a directory; expected a file");
  std::ifstream in(path, std::ios::binary);
  MOEV_CHECK(in.good(), what, " ", path, ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  MOEV_CHECK(!in.bad(), what, " ", path, ": read failed");
  return ss.str();
}

void trim_jsonl(const std::string& path, const std::function<bool(const nlohmann::json&)>& keep) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return;
  const std::string text = read_text(path, "log");
  std::istringstream in(text);
  std::string kept, line;
  bool cut = !text.empty() && text.back() != '\n';
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && keep(j)) kept += line + "\n";
    else cut = true;
  }
  if (cut) write_text_atomic(path, kept);
}

void JsonlLog::open(const std::string& path, bool append, const std::string& context) {
  path_ = path;
  out_.open(path, append ? std::ios::app : std::ios::trunc);
  MOEV_CHECK(out_.is_open(), "cannot write ", path, " (", std::strerror(errno), ")",
             context.empty() ? "" : "; " + context);
}

std::string output_json(const nlohmann::json& j, int indent) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

void JsonlLog::report_to(std::ostream* out, bool interactive, std::string goes_on) {
  report_ = out;
  interactive_ = interactive;
  goes_on_ = std::move(goes_on);
}

void JsonlLog::write(const nlohmann::json& line, int64_t step) {
  out_ << line.dump() << "\n" << std::flush;
  if (out_) return;
  const int err = errno;
  out_.clear();
  if (failed_) return;
  failed_ = true;
  if (report_)
    *report_ << (interactive_ ? "\r\033[K" : "") << "warning: cannot write " << path_ << " at step " << step << " ("
             << std::strerror(err != 0 ? err : EIO) << "); " << goes_on_ << " goes on, its log misses lines\n";
}

std::string last_line_where(const std::string& path, const std::function<bool(const std::string&)>& keep) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  in.seekg(0, std::ios::end);
  std::streamoff pos = in.tellg();
  constexpr std::streamoff kBlock = 1 << 16;
  std::string carry;  // the start of a line that began before the blocks read so far
  while (pos > 0) {
    const std::streamoff n = std::min(kBlock, pos);
    pos -= n;
    std::string block(static_cast<size_t>(n), '\0');
    in.seekg(pos);
    if (!in.read(block.data(), n)) return "";
    block += carry;
    // Whole lines start after the block's first newline (or at the file's start).
    const size_t first = pos == 0 ? 0 : block.find('\n');
    if (first == std::string::npos) {
      carry = std::move(block);
      continue;
    }
    const size_t from = pos == 0 ? 0 : first + 1;
    for (size_t end = block.size(); end > from;) {
      const size_t nl = block.rfind('\n', end - 1);
      const size_t begin = nl == std::string::npos || nl < from ? from : nl + 1;
      if (end > begin) {
        std::string line = block.substr(begin, end - begin);
        if (keep(line)) return line;
      }
      if (begin == from) break;
      end = begin - 1;  // before the newline that ends the previous line
    }
    carry = block.substr(0, from);
  }
  return "";
}

std::string fmt(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

}  // namespace moev::io
