// `moev train`: train a model from a config, with a progress bar, checkpoints and
// --resume.
#include <iostream>

#include "commands.h"
#include "moev/train/trainer.h"

namespace moev::app {

Runner add_train(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "train a model (V-MoE, ViT, ConvNeXt) on an image dataset");
  auto flags = std::make_shared<ConfigFlags>();
  auto resume = std::make_shared<bool>(false);
  flags->add_to(cmd);
  cmd->add_flag("--resume", *resume, "continue the run in --out from its last checkpoint");
  cmd->footer(
      "Examples:\n"
      "  moev train --config configs/vmoe_tiny_fmnist.toml\n"
      "  moev train --model vmoe-tiny --epochs 3 --out runs/quick\n"
      "  moev train --out runs/quick --resume");
  return [flags, resume]() {
    if (flags->help_config) {
      for (auto& [k, h] : io::config_keys()) std::cout << "  " << k << "  " << h << "\n";
      return 0;
    }
    io::RunConfig cfg = flags->resolve();
    if (flags->print_config) {
      std::cout << io::to_json_string(cfg) << "\n";
      return 0;
    }
    train::TrainRunOptions o;
    o.resume = *resume;
    o.progress = &std::cerr;
    o.interactive = stderr_is_terminal();
    auto r = train::train_model(cfg, o);
    std::cout << "trained " << r.steps << " steps (" << r.epochs_done << " epochs) at "
              << static_cast<int64_t>(r.train_images_per_s) << " img/s";
    if (r.eval.images > 0)
      std::cout << "; test top-1 " << r.eval.top1 << ", top-5 " << r.eval.top5;
    std::cout << "\ncheckpoint: " << train::checkpoint_path(cfg.train.out_dir) << "\n";
    return 0;
  };
}

}  // namespace moev::app
