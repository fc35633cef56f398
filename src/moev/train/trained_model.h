// A trained model back from its checkpoint, ready for eval and predict: config,
// weights, class names and the normalisation it was trained with.
#pragma once

#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "moev/io/run_config.h"
#include "moev/models/classifier.h"
#include "moev/train/datasets.h"

namespace moev::train {

struct TrainedModel {
  io::RunConfig cfg;                     // as trained (data.mean / data.std filled)
  models::ClassifierPtr model;           // in eval mode, on the requested device
  std::vector<std::string> class_names;  // index = label
  bool class_names_stored = false;       // class_names are the training set's, not "class i" stand-ins
  int64_t step = 0;                      // training steps behind these weights
  bool replicable = true;                // Replicas can rebuild it from cfg.model (a hard MoE cannot)
  bool averaged = false;                 // the weights are the run's average (train.ema_decay)
  std::string unfinished;                // a note when its run stopped before its end (unfinished_training)
};

// Empty when the run that wrote a checkpoint ended its schedule (its epochs and
// cool-down, or its time budget); otherwise a note naming `checkpoint`, where the
// run stopped and how to finish it. A paused or killed run's weights were taught
// from, fused and scored as a trained model's without a word.
std::string unfinished_training(const io::RunConfig& cfg, const std::string& state_json,
                                const std::string& checkpoint);

// The command that continues the run of `checkpoint`, whose state is `state_json` (a fused model's: its source
// run): moev train --out DIR --resume (moev pretrain for a pre-training), or for a hard MoE's expert (its state records the partition's rows) moev
// hardmoe train-expert, which gives the run its rows (train --resume had none to give, and failed as if the
// partition had changed).
std::string resume_command(const std::string& checkpoint, const std::string& state_json);

// checkpoint: a checkpoint.pt, or a hard MoE's hardmoe.json.
// precision: "" keeps the model.precision it was trained with; "fp32" or "bf16"
// runs it the other way (the weights are fp32 either way).
// raw_weights: the last training weights even where the run kept an average.
TrainedModel load_trained(const std::string& checkpoint, const c10::Device& device,
                          const std::string& precision = "", bool raw_weights = false);

// The run config of a checkpoint or a hard MoE's hardmoe.json, read without
// building its model where the file allows (a checkpoint's weights are not read).
io::RunConfig trained_config(const std::string& checkpoint);

// The test set `data` names, scored by `t` (trained from `checkpoint`): as
// open_datasets opens it, its classes matched to those t learnt by name
// (align_classes) when the checkpoint stores them; without them the labels
// are taken as they come.
Datasets open_test_set(const TrainedModel& t, const DataConfig& data, const std::string& checkpoint);

}  // namespace moev::train
