// Opens the training and test sets a DataConfig names, checks them against the
// model (image size, channels, classes) and settles the normalisation.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "moev/data/batch_loader.h"
#include "moev/data/image_set.h"
#include "moev/models/model_config.h"
#include "moev/train/train_config.h"

namespace moev::train {

struct Datasets {
  data::ImageSet train, test;
  std::vector<float> mean, std;  // per channel, as used for training
  std::vector<std::string> notes;  // for the user, one line each: what reading changed (colour read as grey)
};

// The data keys a training run reads (format, per_class, crop_padding against
// the model's side, random_erase, auto_augment), each out of range an error
// naming it, before any image is read; open_datasets with load_train and
// `train --print-config` run it.
void validate_training_data(const DataConfig& data, const models::ModelConfig& model);

// The training set when load_train (eval/predict: the test set alone); the
// test set unless load_test = false (then an empty one), for commands that
// score none (pretraining without its kNN probe, clustering, an unevaluated fusion).
// `stop` set while a folder or manifest is decoded ends the reading with moev::Stopped.
Datasets open_datasets(const DataConfig& data, const models::ModelConfig& model, bool load_train,
                       bool load_test = true, const std::atomic<bool>* stop = nullptr);

// A short digest (CRC-32) of a set's images, labels, tags and class names, in
// order: a run resumed, or a hard MoE expert trained, on data that changed
// since (images added, removed, edited or read in another order) is caught.
std::string data_fingerprint(const data::ImageSet& set);

// The same digest of a list of integers: the rows a hard MoE expert trains on,
// a partition's expert per row. An expert resumed, reported done or loaded
// against another partition than it trained on is caught by it.
std::string index_fingerprint(const std::vector<int64_t>& values);

// For --resume of a run whose checkpoint `checkpoint` kept `saved` (data_fingerprint; "" in checkpoints from
// before it was kept): an error unless `now` (the fingerprint of the training set read from `source`) is that,
// or the checkpoint is too old to tell (folder images then came in another order, so a folder run is refused,
// an IDX or manifest run goes on). `command` begins the message ("--resume", "pretrain --resume").
void check_resume_data(const std::string& command, const std::string& checkpoint, const std::string& saved,
                       const std::string& now, const std::string& source, const std::string& format);

// A set's labels index its own class list, so a model scored on a test set
// whose classes are not the ones it learnt (`classes`, from `learnt_from`) in
// the same order would be compared with the wrong labels. Hence the test set
// relabelled in the model's class indices, classes matched by
// name: a folder lists its classes alphabetically, and may hold some of them
// only. A folder name may write '_' for a '/', ' ' or ',' of the class name
// (T-shirt_top for T-shirt/top). A class the model does not have, or two that
// stand for one, is an error naming them. Multi-label sets are left as they are.
// Returns the model's classes the test set has no folder of (none: empty).
std::vector<std::string> align_classes(data::ImageSet& test, const std::vector<std::string>& classes,
                                       const std::string& learnt_from);

// Where `name` is in `classes`: the equal name, else the one equal with '_'
// for each '/', ' ' and ',' on either side (a folder-trained run's T-shirt_top
// is the IDX T-shirt/top; two such: an error naming both, `source` and
// `learnt_from`); end() when none is.
std::vector<std::string>::const_iterator find_class(const std::vector<std::string>& classes, const std::string& name,
                                                    const std::string& source, const std::string& learnt_from);

// How training batches of `ds` are made as `data` asks (crop, flip, erasing,
// AutoAugment, normalisation); a bad data.auto_augment is an error naming it.
data::LoaderOptions training_loader_options(const DataConfig& data, const Datasets& ds, int64_t batch_size,
                                            uint64_t seed);

}  // namespace moev::train
