// Checks that a call throws moev::Error and that the message names what it should.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "moev/core/error.h"

namespace moev::test {

template <typename F>
void expect_error(F f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected moev::Error";
  } catch (const moev::Error& e) {
    for (const auto& needle : needles) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
          << "message: " << e.what() << "\nmissing: " << needle;
    }
  }
}

}  // namespace moev::test
