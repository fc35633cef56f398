// The learning-rate schedule and the time budget's step planner, as pure
// functions: known answers at the warmup, the cosine's ends and middle, and
// every case of the budget (time left, spent, capped).
#include <gtest/gtest.h>

#include "moev/train/schedule.h"

using moev::train::learning_rate;
using moev::train::steps_in_budget;

TEST(Schedule, WarmupThenCosineToTheFloor) {
  EXPECT_DOUBLE_EQ(learning_rate(0, 110, 10, 1.0, 0.0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(9, 110, 10, 1.0, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(10, 110, 10, 1.0, 0.0), 1.0);
  EXPECT_NEAR(learning_rate(60, 110, 10, 1.0, 0.0), 0.5, 1e-12);
  EXPECT_NEAR(learning_rate(110, 110, 10, 1.0, 0.01), 0.01, 1e-12);
  EXPECT_NEAR(learning_rate(500, 110, 10, 1.0, 0.01), 0.01, 1e-12);  // past the end: the floor
}

TEST(Schedule, BudgetPlansTheStepsTheSecondsLeftHold) {
  // 100 s left at 0.5 s a step: 200 more steps.
  EXPECT_EQ(steps_in_budget(40, 20.0, 120.0, 0.5, 100000), 240);
  // Capped by the epoch limit.
  EXPECT_EQ(steps_in_budget(40, 20.0, 120.0, 0.5, 100), 100);
  // Less than a step left: still one step, so the plan never ends behind the run.
  EXPECT_EQ(steps_in_budget(40, 119.9, 120.0, 0.5, 100000), 41);
  // Spent (a slow phase overran): stop now.
  EXPECT_EQ(steps_in_budget(40, 121.0, 120.0, 0.5, 100000), 40);
  // A slower machine shortens the plan instead of overrunning.
  EXPECT_LT(steps_in_budget(40, 20.0, 120.0, 1.0, 100000), steps_in_budget(40, 20.0, 120.0, 0.5, 100000));
}
