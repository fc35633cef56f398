#include "moev/nn/linear.h"

#include <dlfcn.h>

#include <mutex>

#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::nn {

bool native_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  return has;
}

namespace {

// bf16 GEMMs run on oneDNN primitives, one per GEMM shape, and the experts'
// row counts change every step, so a run creates a few thousand of them. Past
// the primitive cache's default capacity (1024) oneDNN 2.6 evicts primitives
// while the other replica's thread may be creating or running one, and with
// AMX kernels that race corrupts memory (seen here: a bad_alloc of ~90 TB
// within seconds, with MoE in every block and two replicas). A cache that
// holds every shape a run meets never evicts, and spares the JIT rebuilds too.
// Looked up at run time: LibTorch loads libdnnl, moev does not link it itself.
constexpr int kPrimitiveCacheCapacity = 16384;

void widen_onednn_primitive_cache() {
  static std::once_flag once;
  std::call_once(once, [] {
    using get_fn = int (*)(int*);
    using set_fn = int (*)(int);
    auto get = reinterpret_cast<get_fn>(::dlsym(RTLD_DEFAULT, "dnnl_get_primitive_cache_capacity"));
    auto set = reinterpret_cast<set_fn>(::dlsym(RTLD_DEFAULT, "dnnl_set_primitive_cache_capacity"));
    int now = 0;
    if (get && set && get(&now) == 0 && now < kPrimitiveCacheCapacity) set(kPrimitiveCacheCapacity);
  });
}

}  // namespace

at::ScalarType parse_precision(const std::string& name) {
  if (name == "fp32") return at::kFloat;
  if (name == "bf16") {
    if (!native_bf16()) return at::kFloat;
    widen_onednn_primitive_cache();
    return at::kBFloat16;
  }
  fail("precision '", name, "': expected fp32 or bf16");
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  at::ScalarType matmul_dtype) {
  const auto in = x.size(-1), out = weight.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  auto x2 = x.reshape({-1, in});
  if (matmul_dtype != at::kBFloat16)
    return torch::addmm(bias, x2, weight.t()).view(sizes);
  return torch::addmm(bias.to(matmul_dtype), x2.to(matmul_dtype), weight.to(matmul_dtype).t())
      .to(x.scalar_type())
      .view(sizes);
}

at::Tensor mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
               const at::Tensor& b2, at::ScalarType matmul_dtype) {
  const auto dt = matmul_dtype == at::kBFloat16 ? matmul_dtype : x.scalar_type();
  return linear(torch::gelu(linear(x.to(dt), w1, b1, matmul_dtype)), w2, b2, matmul_dtype)
      .to(x.scalar_type());
}

at::Tensor patchify_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         at::ScalarType matmul_dtype) {
  const int64_t B = x.size(0), Ci = x.size(3), p = weight.size(2), Co = weight.size(0);
  const int64_t h = x.size(1) / p, w = x.size(2) / p;
  // [B, h, p, w, p, Ci] -> [B, h, w, p, p, Ci]: each patch's pixels in (row, column, channel) order.
  auto patches = x.narrow(1, 0, h * p).narrow(2, 0, w * p).reshape({B, h, p, w, p, Ci}).permute({0, 1, 3, 2, 4, 5});
  auto w2 = weight.permute({0, 2, 3, 1}).reshape({Co, p * p * Ci});  // same order
  return linear(patches.reshape({B, h, w, p * p * Ci}), w2, bias, matmul_dtype);
}

}  // namespace moev::nn
