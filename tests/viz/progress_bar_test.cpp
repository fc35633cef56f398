// The progress bar's rate: units per second, or seconds per unit when a unit
// takes longer than a second (a sweep's runs read "0.0 run/s").
#include <gtest/gtest.h>

#include <sstream>

#include "moev/viz/progress_bar.h"

using moev::viz::ProgressBar;

TEST(ProgressBar, RateReadsPerSecondOrPerUnit) {
  EXPECT_EQ(ProgressBar::format_rate(585, "img"), "585.0 img/s");
  EXPECT_EQ(ProgressBar::format_rate(1, "step"), "1.0 step/s");
  EXPECT_EQ(ProgressBar::format_rate(0.0125, "run"), "80.0 s/run");
  EXPECT_EQ(ProgressBar::format_rate(0, "run"), "0.0 run/s");  // nothing done yet
  EXPECT_EQ(ProgressBar::format_duration(3723), "1:02:03");
  EXPECT_EQ(ProgressBar::format_duration(123), "2:03");
}

TEST(ProgressBar, ALineCarriesCountsAndStatus) {
  std::ostringstream out;
  ProgressBar bar(&out, 4, "sweep", "run", /*interactive=*/false);
  bar.update(4, "last run 0.86");
  bar.finish();
  EXPECT_NE(out.str().find("sweep [########################] 4/4 "), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("last run 0.86"), std::string::npos) << out.str();
}

// Without a terminal, a line per tenth of the way, forward only: a time budget's re-estimated total moved the share
// back across a tenth, and the same tenth was printed again with a smaller count.
TEST(ProgressBar, ALogGetsEachTenthOnceWhenTheTotalIsReestimated) {
  std::ostringstream out;
  ProgressBar bar(&out, 100, "train", "step", /*interactive=*/false);
  bar.update(40);
  bar.set_total(110);
  bar.update(41);  // 37%: back in the fourth tenth
  bar.set_total(100);
  bar.update(42);  // the fifth tenth's 40% again
  bar.update(50);
  const std::string log = out.str();
  size_t lines = 0;
  for (char c : log) lines += c == '\n';
  EXPECT_EQ(lines, 2u) << log;
  EXPECT_NE(log.find(" 40/100 "), std::string::npos) << log;
  EXPECT_NE(log.find(" 50/100 "), std::string::npos) << log;
}

// A time budget before its first plan: the total is unknown ("?") and the ETA is the time left of the budget, not
// that of the epoch cap (a 1-minute budget's first line read an ETA of hours); a plan makes it a count again.
TEST(ProgressBar, AnEndWithoutATotalCountsDownToTheEnd) {
  std::ostringstream out;
  ProgressBar bar(&out, 100000, "train", "step", /*interactive=*/false);
  bar.set_end_in(90);
  bar.update(1);
  EXPECT_NE(out.str().find(" 1/? "), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("ETA 1:30"), std::string::npos) << out.str();  // 89.99... s rounds to 1:30
  bar.set_total(20);
  bar.update(10);
  EXPECT_NE(out.str().find("[############............] 10/20 "), std::string::npos) << out.str();
}
