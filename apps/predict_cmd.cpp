// `moev predict`: classify PNG/JPEG files with a checkpoint (or tag them with a
// multi-label one, hard MoEs included); top-k classes with probabilities, as
// text or JSON.
#include <algorithm>
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "commands.h"
#include "moev/core/device.h"
#include "moev/core/error.h"
#include "moev/data/batch_loader.h"
#include "moev/data/image_folder.h"
#include "moev/io/table.h"
#include "moev/train/evaluate.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"

namespace moev::app {

namespace {
struct PredictFlags {
  std::string checkpoint, device = "cpu", precision;
  std::vector<std::string> images;
  int64_t top = 3;
  int threads = 0;
  bool json = false;
};
}  // namespace

Runner add_predict(CLI::App& app) {
  auto* cmd = app.add_subcommand("predict", "classify image files (PNG, JPEG, BMP, GIF, PBM/PGM/PPM or TGA)");
  auto f = std::make_shared<PredictFlags>();
  cmd->add_option("--checkpoint", f->checkpoint, "checkpoint file")->required();
  cmd->add_option("images", f->images, "image files")->required();
  cmd->add_option("--top", f->top, "classes to print per image (default 3)");
  cmd->add_option("--threads", f->threads, "threads, 0 = all cores");
  cmd->add_option("--device", f->device, "cpu or cuda[:N]");
  cmd->add_option("--precision", f->precision, "GEMM precision fp32 or bf16 (default: as trained)");
  cmd->add_flag("--json", f->json, "print JSON");
  return [f]() {
    train::set_threads(f->threads);
    const auto device = parse_device(f->device);
    auto t = train::load_trained(f->checkpoint, device, f->precision);
    note_trained(t);
    const auto& m = t.cfg.model;
    MOEV_CHECK(f->top >= 1, "--top ", f->top, ": expected >= 1");
    const int64_t k = std::min(f->top, m.num_classes);
    // Each image is classified on its own: its answer does not depend on the other files given, or their order.
    train::route_each_image_alone(*t.model);
    const bool per_tag = t.cfg.data.format == "manifest" && t.cfg.train.multilabel_loss == "sigmoid";
    // Each file's entry is printed with its chunk, not held to the end: a result per file grew memory by ~1.4 KB
    // a file (60,000 files: +90 MB), with or without --json.
    size_t printed = 0;
    auto emit = [&](const nlohmann::json& entry) {
      if (!f->json) return;
      std::string text = io::output_json(entry);
      for (size_t at = text.find('\n'); at != std::string::npos; at = text.find('\n', at + 3)) text.insert(at + 1, "  ");
      std::cout << (printed++ ? ",\n  " : "[\n  ") << text;
    };
    // In chunks: 60,000 files at once held every decoded image and activation (~19 GB).
    constexpr size_t kChunk = 64;
    const auto fit = data::parse_fit(t.cfg.data.resize, "data.resize");
    // A file that cannot be read is said and passed over: one damaged file of a thousand gave no answer for any.
    // The exit is non-zero then.
    std::vector<std::string> unread(f->images.size());  // why file i could not be read
    std::vector<bool> failed_at(f->images.size(), false);
    size_t failed = 0;
    // A failure halfway (the model's forward) still leaves well-formed JSON: the entries so far, closed.
    try {
      for (size_t from = 0; from < f->images.size(); from += kChunk) {
        const size_t to = std::min(f->images.size(), from + kChunk);
        std::vector<torch::Tensor> imgs;
        for (size_t i = from; i < to; ++i) {
          const auto& path = f->images[i];
          data::SourceSize size;
          try {
            imgs.push_back(data::decode_image_file(path, m.image_size, m.image_size, m.channels, fit, &size,
                                                   /*look_for_alpha=*/true));
          } catch (const Stopped&) {
            throw;
          } catch (const Error& e) {
            // One file: its own message is the whole story, unless a script reads the JSON for it.
            if (f->images.size() == 1 && !f->json) throw;
            unread[i] = e.what();
            failed_at[i] = true;
            ++failed;
            std::fprintf(stderr, "error: %s\n", e.what());
            continue;
          }
          if (size.colour && m.channels == 1)
            std::fprintf(stderr, "note: %s is stored in colour; the model reads it as grey (it was trained with "
                         "model.channels = 1)\n", path.c_str());
          // Classified all the same, but a thumbnail blown up past 2x holds little
          // of the detail the model learned from.
          if (2 * size.height < m.image_size || 2 * size.width < m.image_size)
            std::fprintf(stderr, "note: %s is %lldx%lld, stretched more than 2x to the model's %lldx%lld\n",
                         path.c_str(), (long long)size.width, (long long)size.height, (long long)m.image_size,
                         (long long)m.image_size);
          if (size.alpha)
            std::fprintf(stderr, "note: %s has an alpha channel, which is dropped: transparent pixels are read as "
                         "the colours stored under them\n", path.c_str());
          // Shapes squashed by more than a quarter look unlike what a run trained on square images saw.
          const int64_t longer = std::max(size.width, size.height), shorter = std::min(size.width, size.height);
          if (t.cfg.data.resize == "stretch" && 4 * longer > 5 * shorter)
            std::fprintf(stderr, "note: %s is %lldx%lld, squashed to the model's square (the run has data.resize = "
                         "stretch%s)\n", path.c_str(), (long long)size.width, (long long)size.height,
                         t.cfg.data.format == "folder" || t.cfg.data.format == "manifest"
                             ? "; a run trained with center_crop crops it" : "");
        }
        torch::Tensor probs;
        if (!imgs.empty()) {
          auto x = data::normalize_images(torch::stack(imgs), t.cfg.data.mean, t.cfg.data.std).to(device);
          c10::InferenceMode guard;
          // A tagger trained with per-tag sigmoids answers each tag on its own;
          // otherwise the scores are one distribution over the classes (or tags).
          auto logits = t.model->forward(x);
          probs = (per_tag ? torch::sigmoid(logits) : torch::softmax(logits, -1)).to(torch::kCPU);
        }
        const auto [p, idx] = imgs.empty() ? std::tuple<torch::Tensor, torch::Tensor>() : probs.topk(k, -1);
        int64_t r = 0;  // the row of the next file read
        for (size_t i = from; i < to; ++i) {
          if (failed_at[i]) {
            emit({{"image", f->images[i]}, {"error", unread[i]}});
            continue;
          }
          nlohmann::json preds = nlohmann::json::array();
          if (!f->json) std::printf("%s\n", f->images[i].c_str());
          for (int64_t j = 0; j < k; ++j) {
            const int64_t c = idx[r][j].item<int64_t>();
            const double pr = p[r][j].item<double>();
            preds.push_back({{"class", t.class_names[c]}, {"label", c}, {"probability", pr}});
            if (!f->json) std::printf("  %-14s %.4f\n", t.class_names[c].c_str(), pr);
          }
          emit({{"image", f->images[i]}, {"top", preds}});
          ++r;
        }
        std::cout.flush();
        std::fflush(stdout);
      }
    } catch (...) {
      if (f->json && printed) std::cout << "\n]\n" << std::flush;
      throw;
    }
    if (f->json) std::cout << (printed ? "\n]" : "[]") << "\n";
    MOEV_CHECK(failed == 0, failed, " of the ", f->images.size(), " files could not be read (said above",
               f->json ? "; their entries hold \"error\"" : "",
               failed < f->images.size() ? "); the others are classified" : ")");
    return 0;
  };
}

}  // namespace moev::app
