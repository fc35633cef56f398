// Turns a user's device string ("cpu", "cuda", "cuda:1") into a torch::Device,
// failing clearly when this LibTorch build cannot run on it.
#pragma once

#include <string>

#include <c10/core/Device.h>

namespace moev {

// `what` names where the string came from in messages ("--device", or a run's "train.device").
c10::Device parse_device(const std::string& name, const std::string& what = "--device");

}  // namespace moev
