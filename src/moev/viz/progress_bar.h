// A progress bar for long work: done/total, rate, ETA and a caller's status text.
// On a terminal it redraws one line at most 10 times a second; elsewhere (logs,
// CI) it prints a plain line every 10% so output stays readable.
#pragma once

#include <chrono>
#include <cstdint>
#include <ostream>
#include <string>

namespace moev::viz {

class ProgressBar {
 public:
  // out == nullptr disables the bar. unit names what is counted ("step", "img").
  ProgressBar(std::ostream* out, int64_t total, std::string label, std::string unit,
              bool interactive, int64_t start = 0);
  void update(int64_t done, const std::string& status = "");
  void set_total(int64_t total) {  // work whose size is re-estimated (a time budget)
    total_ = total;
    deadline_ = false;
  }
  // Work whose size is not known yet but whose end is (a time budget before its first plan): the total reads "?"
  // and the ETA counts down to the end, until set_total. The epoch cap's total gave a 1-minute budget an ETA of hours.
  void set_end_in(double seconds) {
    end_ = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                  std::chrono::duration<double>(seconds));
    deadline_ = true;
  }
  void finish(const std::string& status = "");

  static std::string format_duration(double seconds);  // "1:02:03" / "2:03"
  // "585.0 img/s"; below one unit a second, the time per unit ("80.0 s/run"),
  // which "0.0 run/s" hid.
  static std::string format_rate(double per_second, const std::string& unit);

 private:
  void draw(const std::string& status, bool final);
  std::ostream* out_;
  int64_t total_, start_, done_;
  std::string label_, unit_;
  bool interactive_;
  int last_decile_ = -1;
  bool deadline_ = false;
  std::chrono::steady_clock::time_point t0_, last_draw_, end_;
};

}  // namespace moev::viz
