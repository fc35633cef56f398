// A progress stream that raises a stop request once a line written to it
// matches a regular expression: a stop (as a signal handler would set it) at a
// known point of a run, e.g. after a step's own check of the flag, or during
// an evaluation.
#pragma once

#include <atomic>
#include <regex>
#include <ostream>
#include <streambuf>
#include <string>

namespace moev::test {

class StopWhenSeen : public std::ostream {
 public:
  // An empty trigger raises the stop from the start.
  explicit StopWhenSeen(const std::string& trigger)
      : std::ostream(&buf_), stop_(trigger.empty()), buf_(std::regex(trigger), stop_) {}
  const std::atomic<bool>* flag() const { return &stop_; }
  bool raised() const { return stop_.load(); }
  const std::string& text() const { return buf_.text; }

 private:
  struct Buf : std::streambuf {
    Buf(std::regex t, std::atomic<bool>& s) : trigger(std::move(t)), stop(s) {}
    int overflow(int c) override {
      if (c == traits_type::eof()) return traits_type::not_eof(c);
      text += static_cast<char>(c);
      if (c == '\n') {
        const auto from = text.rfind('\n', text.size() - 2);
        const std::string line = text.substr(from == std::string::npos ? 0 : from + 1);
        if (std::regex_search(line, trigger)) stop = true;
      }
      return c;
    }
    std::regex trigger;
    std::string text;
    std::atomic<bool>& stop;
  };
  std::atomic<bool> stop_;
  Buf buf_;
};

}  // namespace moev::test
