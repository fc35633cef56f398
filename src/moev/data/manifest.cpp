#include "moev/data/manifest.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/core/utf8.h"
#include "moev/data/image_folder.h"
#include "moev/io/table.h"

namespace moev::data {

namespace fs = std::filesystem;

std::vector<ManifestEntry> parse_manifest(const std::string& path) {
  // An ifstream opens a directory and reads nothing from it: "no images" sent one looking inside the CSV.
  if (fs::is_directory(path)) {
    std::string csvs;
    for (const auto& e : fs::directory_iterator(path))
      if (e.path().extension() == ".csv") csvs += (csvs.empty() ? "" : ", ") + e.path().filename().string();
    fail("manifest ", path, " is a directory; expected the manifest CSV itself",
         csvs.empty() ? std::string() : " (it holds " + csvs + ")");
  }
  std::ifstream in(path);
  MOEV_CHECK(in.good(), "manifest ", path, ": cannot open");
  std::vector<ManifestEntry> out;
  std::string line;
  for (int64_t no = 1; std::getline(in, line); ++no) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (no == 1 && line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);  // a UTF-8 byte order mark
    MOEV_CHECK(no != 1 || (line.rfind("\xFF\xFE", 0) != 0 && line.rfind("\xFE\xFF", 0) != 0), "manifest ", path,
               ": UTF-16 text (its byte order mark); expected UTF-8 (save it as CSV UTF-8)");
    // A NUL ended the path where C file functions read it (`a.png\0junk` opened a.png).
    MOEV_CHECK(line.find('\0') == std::string::npos, "manifest ", path, ":", no, ": a NUL byte at column ",
               line.find('\0') + 1, "; expected text");
    MOEV_CHECK(line.find('\r') == std::string::npos, "manifest ", path, ":", no, ": a carriage return inside the ",
               "line (lines ended by CR alone?); expected lines ended by LF or CR LF");
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    ManifestEntry e;
    e.line = no;
    size_t i = 0;
    if (line[0] == '"') {  // quoted path: "" is a quote
      for (i = 1;; ++i) {
        MOEV_CHECK(i < line.size(), "manifest ", path, ":", no, ": unterminated quoted path");
        if (line[i] == '"') {
          if (i + 1 < line.size() && line[i + 1] == '"') {
            e.path += '"';
            ++i;
            continue;
          }
          ++i;
          break;
        }
        e.path += line[i];
      }
      MOEV_CHECK(i < line.size() && line[i] == ',', "manifest ", path, ":", no,
                 ": expected a comma after the quoted path");
    } else {
      i = line.find(',');
      MOEV_CHECK(i != std::string::npos, "manifest ", path, ":", no, ": expected `image path,tags`, got '",
                 line.size() > 80 ? line.substr(0, 80) + "..." : line, "'");
      e.path = line.substr(0, i);
    }
    std::string rest = line.substr(i + 1);
    rest.erase(rest.find_last_not_of(" \t") + 1);
    if (!rest.empty() && rest.front() == '"') {  // a quoted tags field, as spreadsheets write one
      MOEV_CHECK(rest.size() >= 2 && rest.back() == '"' && rest.find('"', 1) == rest.size() - 1, "manifest ", path,
                 ":", no, ": expected the quoted tags field to end the line with its quote, got ", rest);
      rest = rest.substr(1, rest.size() - 2);
    }
    // Tags are words: a comma here is a third field, which would otherwise become part of a tag.
    MOEV_CHECK(rest.find(',') == std::string::npos, "manifest ", path, ":", no, ": '", rest,
               "' holds a comma; expected two fields, `image path,tags`, with the tags separated by spaces");
    if (no == 1 && e.path == "path" && rest == "tags") continue;  // header
    MOEV_CHECK(!e.path.empty(), "manifest ", path, ":", no, ": empty image path");
    std::istringstream ts(rest);
    std::string tag;
    while (ts >> tag) {
      check_utf8(tag, "manifest " + path + ":" + std::to_string(no) + ": the tag");
      if (std::find(e.tags.begin(), e.tags.end(), tag) == e.tags.end()) e.tags.push_back(tag);
    }
    MOEV_CHECK(!e.tags.empty(), "manifest ", path, ":", no, ": image ", e.path, " has no tags");
    out.push_back(std::move(e));
  }
  MOEV_CHECK(!out.empty(), "manifest ", path, ": no images");
  return out;
}

MultiLabelSet read_manifest(const std::string& path, int64_t height, int64_t width, int64_t channels,
                            const std::vector<std::string>& vocabulary, const ReadOptions& options) {
  const std::atomic<bool>* stop = options.stop;
  const auto entries = parse_manifest(path);
  MultiLabelSet s;
  s.source = path;
  s.tags = vocabulary;
  if (s.tags.empty()) {
    std::set<std::string> all;
    for (const auto& e : entries) all.insert(e.tags.begin(), e.tags.end());
    s.tags.assign(all.begin(), all.end());
  }
  std::map<std::string, int64_t> column;
  for (size_t t = 0; t < s.tags.size(); ++t) column[s.tags[t]] = static_cast<int64_t>(t);
  const auto N = static_cast<int64_t>(entries.size()), T = static_cast<int64_t>(s.tags.size());
  check_decoded_fit("manifest " + path, N, channels, height, width, options.held_bytes);
  s.images = torch::empty({N, channels, height, width}, torch::kUInt8);
  s.targets = torch::zeros({N, T});
  const fs::path base = fs::path(path).parent_path();
  for (int64_t i = 0; i < N; ++i) {
    if (stop && stop->load(std::memory_order_relaxed))
      throw Stopped("stopped while reading manifest " + path + " (" + std::to_string(i) + " of " + std::to_string(N) +
                    " images decoded)");
    const auto& e = entries[i];
    const fs::path p = fs::path(e.path).is_absolute() ? fs::path(e.path) : base / e.path;
    // Quoted: a space around the comma is part of the path, and would not show otherwise.
    MOEV_CHECK(fs::exists(p), "manifest ", path, ":", e.line, ": image '", p.string(), "' does not exist",
               e.line == 1 ? " (a header? the one moev passes over is `path,tags`)" : "");
    MOEV_CHECK(fs::is_regular_file(p), "manifest ", path, ":", e.line, ": image '", p.string(),
               "' is not a file (a directory?)");
    for (const auto& tag : e.tags) {
      auto it = column.find(tag);
      MOEV_CHECK(it != column.end(), "manifest ", path, ":", e.line, ": tag '", tag,
                 "' is not one of the model's ", T, " tags");
      s.targets[i][it->second] = 1.0f;
    }
    SourceSize size;
    s.images[i].copy_(decode_image_file(p.string(), height, width, channels, options.fit, &size));
    s.colour_as_grey += channels == 1 && size.colour;
    s.paths.push_back(p.string());
  }
  return s;
}

std::string write_mosaics(const ImageSet& src, int64_t count, uint64_t seed, const std::string& dir,
                          const std::string& split) {
  MOEV_CHECK(count >= 1, "mosaics: count ", count, ": expected >= 1");
  MOEV_CHECK(src.size() >= 4 && src.images.size(1) == 1, "mosaics: need >= 4 grey images, got ", src.images.sizes());
  const int64_t H = src.images.size(2), W = src.images.size(3);
  const fs::path folder = fs::path(dir) / split;
  fs::create_directories(folder);
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + std::hash<std::string>{}(split));
  std::ostringstream csv;
  csv << "path,tags\n";
  std::vector<uint8_t> pix(static_cast<size_t>(4 * H * W));
  const auto images = src.images.contiguous();
  const uint8_t* data = images.data_ptr<uint8_t>();
  for (int64_t m = 0; m < count; ++m) {
    std::set<std::string> tags;
    for (int q = 0; q < 4; ++q) {
      const auto idx = static_cast<int64_t>(rng() % static_cast<uint64_t>(src.size()));
      tags.insert(src.class_names[src.labels[idx].item<int64_t>()]);
      const int64_t oy = (q / 2) * H, ox = (q % 2) * W;
      for (int64_t y = 0; y < H; ++y)
        std::copy(data + idx * H * W + y * W, data + idx * H * W + (y + 1) * W, pix.data() + (oy + y) * 2 * W + ox);
    }
    const std::string name = std::to_string(m) + ".png";
    const std::string file = (folder / name).string();
    io::write_png_atomic(file, pix.data(), int(2 * W), int(2 * H), 1);
    std::string line;
    for (const auto& t : tags) {
      // Tags are single words: class names with spaces or slashes get underscores.
      std::string w = t;
      for (auto& ch : w)
        if (ch == ' ' || ch == '/' || ch == ',') ch = '_';
      line += (line.empty() ? "" : " ") + w;
    }
    csv << split << "/" << name << "," << line << "\n";
  }
  const std::string manifest = (fs::path(dir) / (split + ".csv")).string();
  io::write_text_atomic(manifest, csv.str());
  return manifest;
}

}  // namespace moev::data
