#include "moev/viz/progress_bar.h"

#include <algorithm>
#include <cstdio>

namespace moev::viz {

ProgressBar::ProgressBar(std::ostream* out, int64_t total, std::string label, std::string unit,
                         bool interactive, int64_t start)
    : out_(out), total_(total), start_(start), done_(start), label_(std::move(label)),
      unit_(std::move(unit)), interactive_(interactive), t0_(std::chrono::steady_clock::now()),
      last_draw_(t0_) {}

std::string ProgressBar::format_duration(double s) {
  if (!(s >= 0) || s > 1e7) return "--:--";
  const auto total = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (total >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(total / 3600),
                  (long long)(total / 60 % 60), (long long)(total % 60));
  else
    std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(total / 60), (long long)(total % 60));
  return buf;
}

void ProgressBar::update(int64_t done, const std::string& status) {
  done_ = done;
  if (!out_) return;
  const auto now = std::chrono::steady_clock::now();
  if (interactive_) {
    if (now - last_draw_ < std::chrono::milliseconds(100) && done_ < total_) return;
    last_draw_ = now;
    draw(status, false);
  } else {
    const int decile = total_ > 0 ? static_cast<int>(10 * done_ / total_) : 0;
    // Only forward: a time budget re-estimates the total, and its share of the way then fell back across a
    // tenth and printed the same tenth again (32 lines instead of about 11, the bar going backwards).
    if (decile <= last_decile_) return;
    last_decile_ = decile;
    draw(status, false);
  }
}

std::string ProgressBar::format_rate(double per_second, const std::string& unit) {
  char buf[64];
  if (per_second > 0 && per_second < 1)
    std::snprintf(buf, sizeof buf, "%.1f s/%s", 1.0 / per_second, unit.c_str());
  else
    std::snprintf(buf, sizeof buf, "%.1f %s/s", per_second, unit.c_str());
  return buf;
}

void ProgressBar::finish(const std::string& status) {
  if (!out_) return;
  if (deadline_) set_total(done_);  // ended before a total came: what was done is the whole
  draw(status, true);
}

void ProgressBar::draw(const std::string& status, bool final) {
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  const double rate = elapsed > 0 ? static_cast<double>(done_ - start_) / elapsed : 0;
  const double eta =
      deadline_ ? std::max(0.0, std::chrono::duration<double>(end_ - std::chrono::steady_clock::now()).count())
      : rate > 0 ? static_cast<double>(total_ - done_) / rate
                 : -1;
  const int width = 24;
  const int filled =
      total_ > 0 && !deadline_ ? static_cast<int>(width * std::min<int64_t>(done_, total_) / total_) : 0;
  std::string bar(filled, '#');
  bar.resize(width, '.');
  const std::string total = deadline_ ? "?" : std::to_string(total_);
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s [%s] %lld/%s %s %s %s", label_.c_str(), bar.c_str(), (long long)done_,
                total.c_str(), format_rate(rate, unit_).c_str(), final ? "in" : "ETA",
                format_duration(final ? elapsed : eta).c_str());
  if (interactive_)
    *out_ << "\r\033[K" << buf << (status.empty() ? "" : "  ") << status << (final ? "\n" : "");
  else
    *out_ << buf << (status.empty() ? "" : "  ") << status << "\n";
  out_->flush();
}

}  // namespace moev::viz
