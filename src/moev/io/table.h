// Result tables (sweeps, robustness, capacity curves) written as CSV for tools
// and as Markdown for people, each file replaced atomically.
#pragma once

#include <cstdint>
#include <fstream>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moev::io {

struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;  // each as long as header

  void add(std::vector<std::string> row);  // throws moev::Error on a length mismatch
  std::string csv() const;
  std::string markdown() const;
};

// Writes text to path through a temporary file and a rename; creates the parent
// directory. Throws moev::Error naming the path on failure.
void write_text_atomic(const std::string& path, const std::string& text);

// An 8-bit PNG of h rows of w pixels, `channels` interleaved bytes each, written as write_text_atomic writes
// (stb's own file writer leaves a short write unchecked: a full disk left a cut PNG at exit 0).
void write_png_atomic(const std::string& path, const unsigned char* pixels, int w, int h, int channels);

// JSON for people and tools to read (stdout, reports): a string that is not
// UTF-8 (a file name in Latin-1) has its bad bytes replaced by U+FFFD rather
// than stopping the command after its work. Inputs that moev reads back
// (configs, checkpoints) are checked for UTF-8 where they are read instead.
std::string output_json(const nlohmann::json& j, int indent = 2);

// The whole file as text; moev::Error naming `what` and the path when it cannot be read.
std::string read_text(const std::string& path, const std::string& what = "file");

// Keeps the lines of a JSON-lines log whose object passes keep(j), dropping the
// rest and any line that does not parse (a write a kill cut short); rewritten
// atomically, and only if something went or the last line lacks its newline
// (the next append would join onto it). No file: nothing to do. A resumed run
// uses it to drop what it logged past its checkpoint, which it logs again.
void trim_jsonl(const std::string& path, const std::function<bool(const nlohmann::json&)>& keep);

// A run's JSON-lines log, one flushed line per write. A line that cannot be
// written (a full disk) must not stop a days-long run, whose checkpoint is what
// resumes it: the first such line is reported, once, and later lines are tried
// again.
class JsonlLog {
 public:
  // Truncates, or appends to a resumed run's log; moev::Error naming path (and
  // `context`, e.g. the config field it came from) if it cannot be opened.
  void open(const std::string& path, bool append, const std::string& context = "");
  bool is_open() const { return out_.is_open(); }
  // Where the report goes (nullptr: nowhere): "warning: cannot write <path> at
  // step <step> (<strerror>); <goes_on> goes on, its log misses lines", on a
  // line of its own (a progress bar's cleared first when interactive).
  void report_to(std::ostream* out, bool interactive, std::string goes_on);
  void write(const nlohmann::json& line, int64_t step);

 private:
  std::string path_, goes_on_;
  std::ofstream out_;
  std::ostream* report_ = nullptr;
  bool interactive_ = false, failed_ = false;
};

// The last line of a text file for which keep(line) holds ("" when none, or
// no such file), read backwards from the end in blocks: a scheduler follows a
// days-long run's log (tens of MB) twice a second, and needs only its end.
std::string last_line_where(const std::string& path, const std::function<bool(const std::string&)>& keep);

// A number as table text: fixed decimals.
std::string fmt(double v, int decimals = 4);

}  // namespace moev::io
