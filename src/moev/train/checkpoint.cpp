#include "moev/train/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::train {

namespace {

c10::Dict<std::string, at::Tensor> to_dict(const std::map<std::string, at::Tensor>& m) {
  c10::Dict<std::string, at::Tensor> d;
  for (const auto& [k, v] : m) d.insert(k, v.detach().to(torch::kCPU));
  return d;
}

std::map<std::string, at::Tensor> from_dict(const c10::IValue& v, const std::string& what,
                                            const std::string& path) {
  MOEV_CHECK(v.isGenericDict(), "checkpoint ", path, ": '", what, "' is not a dict of tensors");
  std::map<std::string, at::Tensor> out;
  for (const auto& kv : v.toGenericDict()) out[kv.key().toStringRef()] = kv.value().toTensor();
  return out;
}

}  // namespace

void save_checkpoint(const std::string& path, const Checkpoint& ckpt) {
  c10::impl::GenericDict top(c10::StringType::get(), c10::AnyType::get());
  top.insert(std::string("format"), std::string(kCheckpointFormat));
  top.insert(std::string("config"), ckpt.config_json);
  top.insert(std::string("state"), ckpt.state_json);
  top.insert(std::string("model"), to_dict(ckpt.model));
  top.insert(std::string("optimizer"), to_dict(ckpt.optimizer));
  top.insert(std::string("rng"), ckpt.rng.defined() ? ckpt.rng : torch::zeros({0}, torch::kByte));
  if (!ckpt.ema.empty()) top.insert(std::string("ema"), to_dict(ckpt.ema));
  const std::vector<char> bytes = torch::pickle_save(c10::IValue(top));

  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  MOEV_CHECK(fd >= 0, "checkpoint ", tmp, ": cannot open for writing");
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) {
      ::close(fd);
      fail("checkpoint ", tmp, ": write failed (disk full?)");
    }
    done += static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  MOEV_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "checkpoint ", path,
             ": cannot rename from ", tmp);
}

Checkpoint load_checkpoint(const std::string& path) {
  MOEV_CHECK(!path.empty(), "checkpoint path is empty: expected a checkpoint file");
  MOEV_CHECK(!std::filesystem::is_directory(path), "checkpoint ", path, ": is a directory; expected a checkpoint ",
             "file (", path, "/checkpoint.pt?)");
  std::ifstream in(path, std::ios::binary);
  MOEV_CHECK(in.good(), "checkpoint ", path, ": cannot open (no such file?)");
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  c10::IValue v;
  try {
    v = torch::pickle_load(bytes);
  } catch (const std::exception&) {
    fail("checkpoint ", path, ": not a moev checkpoint (unreadable torch pickle)");
  }
  MOEV_CHECK(v.isGenericDict(), "checkpoint ", path, ": not a moev checkpoint");
  auto d = v.toGenericDict();
  for (const char* key : {"format", "config", "state", "model", "optimizer", "rng"})
    MOEV_CHECK(d.contains(std::string(key)), "checkpoint ", path, ": missing entry '", key, "'");
  MOEV_CHECK(d.at(std::string("format")).isString() && d.at(std::string("format")).toStringRef() == kCheckpointFormat,
             "checkpoint ", path, ": format is not ", kCheckpointFormat);
  Checkpoint c;
  c.config_json = d.at(std::string("config")).toStringRef();
  c.state_json = d.at(std::string("state")).toStringRef();
  c.model = from_dict(d.at(std::string("model")), "model", path);
  c.optimizer = from_dict(d.at(std::string("optimizer")), "optimizer", path);
  c.rng = d.at(std::string("rng")).toTensor();
  if (d.contains(std::string("ema"))) c.ema = from_dict(d.at(std::string("ema")), "ema", path);
  // A model with NaN weights would evaluate, fuse and teach at exit 0 with
  // chance-level figures; no moev model stores a non-finite weight or buffer.
  for (const auto* weights : {&c.model, &c.ema})
    for (const auto& [name, t] : *weights)
      MOEV_CHECK(!t.is_floating_point() || torch::isfinite(t).all().item<bool>(), "checkpoint ", path,
                 ": tensor '", name, "' holds NaN or infinite values (saved from a diverged run?)");
  return c;
}

std::string weights_fingerprint(const std::map<std::string, at::Tensor>& tensors) {
  uLong crc = crc32(0L, Z_NULL, 0);
  auto add = [&](const void* p, size_t n) {
    const auto* b = static_cast<const Bytef*>(p);
    for (size_t done = 0; done < n;) {  // crc32 takes at most 4 GiB at a time
      const auto chunk = static_cast<uInt>(std::min<size_t>(n - done, 1u << 30));
      crc = crc32(crc, b + done, chunk);
      done += chunk;
    }
  };
  for (const auto& [name, t] : tensors) {
    add(name.data(), name.size() + 1);
    for (auto d : t.sizes()) add(&d, sizeof d);
    const auto c = t.cpu().contiguous();
    add(c.data_ptr(), c.numel() * c.element_size());
  }
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08lx", static_cast<unsigned long>(crc & 0xffffffffUL));
  return hex;
}

const std::map<std::string, at::Tensor>& inference_weights(const Checkpoint& ckpt) {
  return ckpt.ema.empty() ? ckpt.model : ckpt.ema;
}

std::map<std::string, at::Tensor> module_tensors(const torch::nn::Module& module) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : module.named_parameters()) out[p.key()] = p.value();
  for (const auto& b : module.named_buffers()) out[b.key()] = b.value();
  return out;
}

void load_module_tensors(torch::nn::Module& module, const std::map<std::string, at::Tensor>& t,
                         const std::string& source) {
  torch::NoGradGuard no_grad;
  auto mine = module_tensors(module);
  for (auto& [name, dst] : mine) {
    auto it = t.find(name);
    MOEV_CHECK(it != t.end(), source, ": tensor '", name,
               "' of this model is missing from the checkpoint (another architecture?)");
    MOEV_CHECK(it->second.sizes() == dst.sizes(), source, ": tensor '", name, "' has shape ",
               it->second.sizes(), " in the checkpoint but ", dst.sizes(),
               " in this model (another architecture?)");
    dst.copy_(it->second);
  }
  for (const auto& [name, _] : t)
    MOEV_CHECK(mine.count(name), source, ": checkpoint tensor '", name,
               "' has no place in this model (another architecture?)");
}

at::Tensor cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const at::Tensor& s) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(s);
}

}  // namespace moev::train
