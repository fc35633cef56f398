// `moev pretrain`: self-supervised pre-training (MoCo v2) of a config's model on
// its own training images, Sun et al.'s initialisation step; the checkpoint
// starts a supervised run through train.init_from.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>

#include "commands.h"
#include "moev/core/error.h"
#include "moev/train/pretrain.h"

namespace moev::app {

Runner add_pretrain(CLI::App& app) {
  auto* cmd = app.add_subcommand("pretrain", "self-supervised pre-training (MoCo v2) on the training images");
  auto flags = std::make_shared<ConfigFlags>();
  auto o = std::make_shared<train::PretrainOptions>();
  flags->add_to(cmd);
  cmd->add_option("--pretrain-epochs", o->epochs, "passes over the training images")->capture_default_str();
  cmd->add_option("--pretrain-lr", o->lr, "peak learning rate (AdamW, warmup, cosine)")->capture_default_str();
  cmd->add_option("--temperature", o->temperature, "InfoNCE temperature")->capture_default_str();
  cmd->add_option("--momentum", o->momentum, "key encoder momentum")->capture_default_str();
  cmd->add_option("--queue", o->queue, "negative keys per branch")->capture_default_str();
  cmd->add_option("--proj-dim", o->proj_dim, "projection head output width")->capture_default_str();
  cmd->add_option("--min-scale", o->min_scale, "random resized crop: smallest area fraction")->capture_default_str();
  cmd->add_option("--jitter", o->jitter, "contrast and brightness jitter")->capture_default_str();
  cmd->add_option("--knn", o->knn_k, "neighbours of the kNN probe (0: none)")->capture_default_str();
  cmd->add_flag("--resume", o->resume, "continue from <out>/pretrain.pt");
  cmd->footer(
      "\nWrites <train.out_dir>/pretrain.pt, pretrain_log.jsonl, pretrain.json, pretrain.png.\n"
      "Example:\n"
      "  moev pretrain --config configs/multibranch_fmnist.toml --set model.branches=3 --out runs/ssl3\n"
      "  moev train --config configs/multibranch_fmnist.toml --set model.branches=3 \\\n"
      "      --set train.init_from=runs/ssl3/pretrain.pt --out runs/mb3_ssl");
  return [flags, o]() {
    // The shared shorthands that would set what pre-training does not read.
    for (const auto& a : flags->shorthand)
      for (const char* k : {"train.epochs=", "train.lr="})
        MOEV_CHECK(a.rfind(k, 0) != 0, "moev pretrain: ", a, " sets the supervised run's ", std::string(k, strlen(k) - 1),
                   ", which pre-training does not read; use --pretrain-epochs / --pretrain-lr");
    const auto resolved = flags->resolve_or_print();
    if (!resolved) return 0;
    const io::RunConfig cfg = *resolved;
    // One process: ranks of a job would each write the same files.
    const int world = dist_from_environment(cfg).world_size;
    MOEV_CHECK(world == 1, "moev pretrain runs as one process, not as a rank of a distributed job (WORLD_SIZE = ",
               world, "); run it without moev launch");
    o->progress = &std::cerr;
    o->interactive = stderr_is_terminal();
    const auto r = train::pretrain(cfg, cfg.train.out_dir, *o);
    std::printf("pre-trained %lld steps in %.0f s; InfoNCE %.4f", static_cast<long long>(r.steps), r.seconds,
                r.final_loss);
    if (r.knn_top1 >= 0) {
      std::printf("; test kNN top-1 %.4f", r.knn_top1);
      if (r.knn_top1_init >= 0) std::printf(" (at initialisation %.4f)", r.knn_top1_init);
    }
    std::printf("\ncheckpoint: %s (start a run from it with --set train.init_from=%s)\n", r.checkpoint.c_str(),
                r.checkpoint.c_str());
    return 0;
  };
}

}  // namespace moev::app
