// moev's one error type and the check macro used at every edge (files, configs,
// CLI values). Messages name the file, field or value and say what was expected;
// the CLI prints e.what() on one line and exits non-zero.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moev {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A run that stopped because it was asked to (a stop signal), after saving what
// it had: not a fault of its input. The CLI exits with the signal's status.
class Stopped : public Error {
 public:
  using Error::Error;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
}  // namespace detail

// Builds a message from any streamable parts: fail("file ", path, ": bad magic").
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  detail::append(os, parts...);
  throw Error(os.str());
}

}  // namespace moev

#define MOEV_CHECK(cond, ...)            \
  do {                                   \
    if (!(cond)) ::moev::fail(__VA_ARGS__); \
  } while (0)
