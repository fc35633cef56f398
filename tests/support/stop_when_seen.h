// A progress stream that raises a stop request once a given text has been
// written to it: a stop (as a signal handler would set it) at a known point of
// a run, e.g. after a step's own check of the flag, or during an evaluation.
#pragma once

#include <atomic>
#include <ostream>
#include <streambuf>
#include <string>

namespace moev::test {

class StopWhenSeen : public std::ostream {
 public:
  // An empty trigger raises the stop from the start.
  explicit StopWhenSeen(std::string trigger)
      : std::ostream(&buf_), stop_(trigger.empty()), buf_(std::move(trigger), stop_) {}
  const std::atomic<bool>* flag() const { return &stop_; }
  bool raised() const { return stop_.load(); }
  const std::string& text() const { return buf_.text; }

 private:
  struct Buf : std::streambuf {
    Buf(std::string t, std::atomic<bool>& s) : trigger(std::move(t)), stop(s) {}
    int overflow(int c) override {
      if (c == traits_type::eof()) return traits_type::not_eof(c);
      text += static_cast<char>(c);
      if (!stop && text.find(trigger) != std::string::npos) stop = true;
      return c;
    }
    std::string trigger, text;
    std::atomic<bool>& stop;
  };
  std::atomic<bool> stop_;
  Buf buf_;
};

}  // namespace moev::test
