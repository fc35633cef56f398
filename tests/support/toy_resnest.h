// The smallest multi-branch ResNeSt run that still trains on real data: 50
// Fashion-MNIST images (5 per class), 2 epochs of batch 10, one thread. Shared
// by the tests of distillation, fusion and ensembles.
#pragma once

#include <string>

#include "moev/io/run_config.h"

namespace moev::test {

inline io::RunConfig toy_resnest_run(const std::string& out, int64_t branches, uint64_t seed = 0) {
  io::RunConfig c;
  c.model = models::preset("resnest-tiny");
  c.model.dims = {16, 32, 64};
  c.model.stem_channels = 16;
  c.model.branches = branches;
  c.data.per_class = 5;
  c.data.test_limit = 200;
  c.train.epochs = 2;
  c.train.batch_size = 10;
  c.train.warmup_steps = 2;
  c.train.threads = 1;
  c.train.replicas = 1;
  c.train.seed = seed;
  c.train.eval_each_epoch = false;
  c.train.progress = false;
  c.train.out_dir = out;
  return c;
}

}  // namespace moev::test
