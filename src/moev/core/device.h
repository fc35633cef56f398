// Turns a user's device string ("cpu", "cuda", "cuda:1") into a torch::Device,
// failing clearly when this LibTorch build cannot run on it.
#pragma once

#include <string>

#include <c10/core/Device.h>

namespace moev {

c10::Device parse_device(const std::string& name);

}  // namespace moev
