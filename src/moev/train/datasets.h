// Opens the training and test sets a DataConfig names, checks them against the
// model (image size, channels, classes) and settles the normalisation.
#pragma once

#include <vector>

#include "moev/data/image_set.h"
#include "moev/models/model_config.h"
#include "moev/train/train_config.h"

namespace moev::train {

struct Datasets {
  data::ImageSet train, test;
  std::vector<float> mean, std;  // per channel, as used for training
};

// Test set only when train == false (eval/predict).
Datasets open_datasets(const DataConfig& data, const models::ModelConfig& model, bool load_train);

}  // namespace moev::train
