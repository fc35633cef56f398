#include "moev/core/device.h"

#include <torch/cuda.h>

#include "moev/core/error.h"

namespace moev {

c10::Device parse_device(const std::string& name, const std::string& what) {
  c10::Device dev(c10::kCPU);
  try {
    dev = c10::Device(name);
  } catch (const std::exception&) {
    fail(what, " ", name, ": unknown device (expected cpu, cuda or cuda:N)");
  }
  if (dev.is_cuda()) {
    MOEV_CHECK(torch::cuda::is_available(), what, " ", name,
               ": this LibTorch build has no CUDA support or no GPU is visible; use --device cpu");
    MOEV_CHECK(!dev.has_index() || dev.index() < static_cast<int>(torch::cuda::device_count()),
               what, " ", name, ": only ", torch::cuda::device_count(), " CUDA device(s) visible");
  } else {
    MOEV_CHECK(dev.is_cpu(), what, " ", name, ": only cpu and cuda are supported");
    // LibTorch has one CPU device: cpu:1 ran on it, as if the index chose cores or a socket.
    MOEV_CHECK(!dev.has_index() || dev.index() == 0, what, " ", name, ": there is one CPU device (cpu or cpu:0); ",
               "--threads sets how many cores it uses");
  }
  return dev;
}

}  // namespace moev
