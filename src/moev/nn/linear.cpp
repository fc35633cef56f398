#include "moev/nn/linear.h"

#include <dlfcn.h>

#include <mutex>
#include <unordered_map>

#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/kernels.h"
#include "moev/nn/layer_scale.h"
#include "moev/nn/packed_gemm.h"

namespace moev::nn {

bool native_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  return has;
}

namespace {

// bf16 GEMMs run on oneDNN primitives, one per GEMM shape, and the experts'
// row counts change every step; moe::gemm_rows rounds them to a few hundred
// sizes, so a run creates a few thousand primitives at most. Past
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

// Packed copies of Linear weights for inference GEMMs, made when a weight is
// first used without gradients and again whenever its storage or version
// changes (optimizer steps, loaded checkpoints). Keyed by the weight's
// TensorImpl and holding a weak reference to it: while the entry lives that
// address cannot be reused by another tensor, and entries of freed weights are
// swept out as new ones come in.
class PackedWeights {
 public:
  // weight: [O, I] -> its nn::pack_weight panels of W = weight^T.
  at::Tensor get(const at::Tensor& weight) {
    return get(weight, [&] { return weight; });
  }
  // The same for the [O, I] matrix that matrix() derives from the parameter
  // `weight` (a convolution's, reordered), called only when the copy must be
  // (re)made: the entry follows weight's identity and version.
  template <typename MakeMatrix>
  at::Tensor get(const at::Tensor& weight, const MakeMatrix& matrix) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto* key = weight.unsafeGetTensorImpl();
    auto it = entries_.find(key);
    if (it != entries_.end() && !it->second.owner.expired() && it->second.data == weight.data_ptr() &&
        it->second.version == weight._version())
      return it->second.packed;
    if (it == entries_.end() && entries_.size() >= sweep_at_) {
      for (auto e = entries_.begin(); e != entries_.end();) e = e->second.owner.expired() ? entries_.erase(e) : ++e;
      sweep_at_ = std::max<size_t>(64, 2 * entries_.size());
    }
    const at::Tensor m = matrix();
    const int64_t O = m.size(0), I = m.size(1);
    auto packed = at::empty({packed_size(I, O)}, m.options());
    pack_weight(m.data_ptr<float>(), I, O, m.stride(1), m.stride(0), packed.data_ptr<float>());
    Entry entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(weight.getIntrusivePtr()),
                weight.data_ptr(), weight._version(), packed};
    if (it != entries_.end()) it->second = std::move(entry);
    else entries_.emplace(key, std::move(entry));
    return packed;
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> owner;
    const void* data;
    int64_t version;
    at::Tensor packed;
  };
  std::mutex mu_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
  size_t sweep_at_ = 64;
};

PackedWeights& packed_weights() {
  static PackedWeights* cache = new PackedWeights;  // never destroyed: tensors may outlive statics
  return *cache;
}

// Whether a CPU fp32 layer can run on packed weights at all: AVX-512, fp32 GEMMs.
// Weights made under InferenceMode keep no version counter, so a packed copy
// could not tell when they change: those take the addmm path.
bool packed_eligible(const at::Tensor& x, at::ScalarType matmul_dtype,
                     std::initializer_list<const at::Tensor*> params) {
  if (matmul_dtype == at::kBFloat16 || !x.device().is_cpu() || x.scalar_type() != at::kFloat ||
      !packed_gemm_supported())
    return false;
  for (const auto* p : params)
    if (!p->defined() || p->scalar_type() != at::kFloat || !p->device().is_cpu() || p->is_inference()) return false;
  return true;
}

// Whether any of x and params wants a gradient.
bool wants_grad(const at::Tensor& x, std::initializer_list<const at::Tensor*> params) {
  if (!at::GradMode::is_enabled()) return false;
  if (x.requires_grad()) return true;
  for (const auto* p : params)
    if (p->requires_grad()) return true;
  return false;
}

// Whether a CPU fp32 layer runs on packed weights without gradients.
bool use_packed(const at::Tensor& x, at::ScalarType matmul_dtype, std::initializer_list<const at::Tensor*> params) {
  return packed_eligible(x, matmul_dtype, params) && !wants_grad(x, params);
}

// Rows per thread below which a packed GEMM stays on one thread.
constexpr int64_t kPackedGrain = 56;

// y[M, O] = epilogue(x[M, I] W + bias) over the rows, W packed (pack_weight);
// x rows at unit column stride. bias may be undefined; aux: a contiguous
// [M, O] for the epilogues that use one.
at::Tensor packed_rows(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& bias, int64_t out,
                       Epilogue epilogue = Epilogue::kNone, at::Tensor* aux = nullptr) {
  const int64_t in = x2.size(1), ldx = x2.stride(0);
  auto y = at::empty({x2.size(0), out}, x2.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  float* ap = aux ? aux->data_ptr<float>() : nullptr;
  at::parallel_for(0, x2.size(0), kPackedGrain, [&](int64_t r0, int64_t r1) {
    packed_gemm(r1 - r0, in, out, xp + r0 * ldx, ldx, wp, bp, yp + r0 * out, out, epilogue,
                ap ? ap + r0 * out : nullptr);
  });
  return y;
}

// weight [O, I] packed as the [O, I] matrix itself (the right operand of
// dX = dY weight), not its transpose.
at::Tensor pack_for_input_grad(const at::Tensor& weight) {
  const int64_t O = weight.size(0), I = weight.size(1);
  auto packed = at::empty({packed_size(O, I)}, weight.options());
  pack_weight(weight.data_ptr<float>(), O, I, weight.stride(0), weight.stride(1), packed.data_ptr<float>());
  return packed;
}

// Rows of the reduction per slice of weight_grad, at least; slices at most.
constexpr int64_t kSliceRows = 256;
constexpr int64_t kMaxSlices = 16;
// Floats of partial products weight_grad may keep (1 MB): the slices' extra
// copies of dW are summed at the end.
constexpr int64_t kPartialFloats = int64_t{1} << 18;

// into[j] += from[s * stride + j] for s = 0 .. count - 1 in that order, j < n,
// on all threads: slices' partial sums added in a fixed order.
void add_slices(float* into, const float* from, int64_t count, int64_t stride, int64_t n) {
  if (count > 0)
    at::parallel_for(0, n, 4096, [&](int64_t j0, int64_t j1) {
      for (int64_t s = 0; s < count; ++s) add_to(from + s * stride + j0, into + j0, j1 - j0);
    });
}

// dW[O, I] = dy[M, O]^T x2[M, I] on packed_gemm_tn and, when db is given,
// *db = the column sums of dy (a bias gradient, read while dy's rows are in
// cache). The work is cut into slices of the M rows times column panels of
// dW: panels alone left one of two threads idle at I = 32 (ConvNeXt's first
// stage) and both bound by memory elsewhere (measured, 2 threads: 101-192
// GFLOP/s by panels, 210-274 with slices). The slices depend on the shapes
// only and their partial sums are added in a fixed order, so the result does
// not depend on the thread count. Inputs narrower than a panel would leave
// half of every FMA idle: BLAS takes those.
at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& x2, at::Tensor* db = nullptr) {
  const int64_t M = dy.size(0), O = dy.size(1), I = x2.size(1);
  if (I < kPanelWidth) {
    if (db) *db = dy.sum(0);
    return at::mm(dy.t(), x2);
  }
  const int64_t slices = std::max<int64_t>(1, std::min({kMaxSlices, M / kSliceRows, kPartialFloats / (O * I)}));
  const int64_t panels = (I + kPanelWidth - 1) / kPanelWidth;
  // Slice 0 writes dW itself, slice s > 0 its own [O, I] of part.
  auto dw = at::empty({O, I}, dy.options());
  auto part = at::empty({slices - 1, O, I}, dy.options());
  auto sums = at::zeros({db ? slices : 0, O}, dy.options());
  const float *gp = dy.data_ptr<float>(), *xp = x2.data_ptr<float>();
  float *wp = dw.data_ptr<float>(), *pp = part.data_ptr<float>(), *sp = sums.data_ptr<float>();
  const int64_t ldx = x2.stride(0);
  at::parallel_for(0, slices * panels, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t s = item / panels, p = item % panels;
      const int64_t m0 = M * s / slices, m1 = M * (s + 1) / slices;
      const int64_t c0 = p * kPanelWidth, c1 = std::min(I, c0 + kPanelWidth);
      float* out = s == 0 ? wp : pp + (s - 1) * O * I;
      packed_gemm_tn(m1 - m0, O, c1 - c0, gp + m0 * O, O, xp + m0 * ldx + c0, ldx, out + c0, I, false);
      if (db && p == 0) column_sums(gp + m0 * O, m1 - m0, O, sp + s * O);
    }
  });
  add_slices(wp, pp, slices - 1, O * I, O * I);
  if (db) {
    add_slices(sp, sp + O, slices - 1, O, O);
    *db = sums[0];
  }
  return dw;
}

// fp32 training on AVX-512 CPUs: all three GEMMs on moev's kernels, the
// weight packed again at each call for the forward and the input gradient
// (O(I * O) against the GEMM's O(M * I * O)); OpenBLAS re-packs both operands
// at every call, ~15% of an fp32 training step in its copy routines.
struct PackedLinearTrain : public torch::autograd::Function<PackedLinearTrain> {
  // x2: [M, I], weight: [O, I], bias: [O] -> [M, O]
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x2, const at::Tensor& weight,
                            const at::Tensor& bias) {
    ctx->save_for_backward({x2, weight});
    return packed_rows(x2, packed_weights().get(weight), bias.contiguous(), weight.size(0));
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x2 = saved[0], &weight = saved[1];
    const auto dy = grads[0].contiguous();
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) dx = packed_rows(dy, pack_for_input_grad(weight), {}, weight.size(1));
    if (ctx->needs_input_grad(1)) dw = weight_grad(dy, x2, ctx->needs_input_grad(2) ? &db : nullptr);
    else if (ctx->needs_input_grad(2)) db = dy.sum(0);
    return {dx, dw, db};
  }
};

// Floats of the per-slice gradient accumulators (2 H D + H + D) up to which
// the FFN backward runs fused (they are read and written for every block of
// rows, and should stay in L2), and of all slices' accumulators together.
constexpr int64_t kFusedAccFloats = int64_t{1} << 19;
constexpr int64_t kFusedTotalFloats = int64_t{1} << 22;

// The dense FFN's backward on packed_ffn_backward, given dy [M, D], the
// forward's x2 [M, D], act [M, H] and d = GELU'(x W1^T + b1) [M, H]: slices
// of rows as in weight_grad (their partial gradients added in a fixed order),
// so the result does not depend on the thread count.
torch::autograd::variable_list mlp_backward_fused(const at::Tensor& dy, const at::Tensor& x2, const at::Tensor& act,
                                                  const at::Tensor& d, const at::Tensor& w1, const at::Tensor& w2,
                                                  bool want_dx) {
  const int64_t M = dy.size(0), D = dy.size(1), H = act.size(1), ldx = x2.stride(0);
  const int64_t acc = 2 * H * D + H + D;  // one slice's dW1 | dW2 | db1 | db2
  const int64_t slices =
      std::max<int64_t>(1, std::min({kMaxSlices, M / kSliceRows, kFusedTotalFloats / acc}));
  const auto p2 = pack_for_input_grad(w2), p1 = pack_for_input_grad(w1);
  auto part = at::zeros({slices, acc}, dy.options());
  at::Tensor dx = want_dx ? at::empty({M, D}, dy.options()) : at::Tensor();
  const float *gp = dy.data_ptr<float>(), *xp = x2.data_ptr<float>(), *ap = act.data_ptr<float>();
  const float *dp = d.data_ptr<float>(), *p2p = p2.data_ptr<float>(), *p1p = p1.data_ptr<float>();
  float *pp = part.data_ptr<float>(), *dxp = want_dx ? dx.data_ptr<float>() : nullptr;
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      float* a = pp + s * acc;
      const int64_t m0 = M * s / slices, m1 = M * (s + 1) / slices;
      packed_ffn_backward(m1 - m0, D, H, gp + m0 * D, xp + m0 * ldx, ldx, ap + m0 * H, dp + m0 * H, p2p, p1p,
                          dxp ? dxp + m0 * D : nullptr, {a, a + 2 * H * D, a + H * D, a + 2 * H * D + H, true});
    }
  });
  add_slices(pp, pp + acc, slices - 1, acc, acc);
  auto sum = part[0];
  return {dx, sum.narrow(0, 0, H * D).view({H, D}), sum.narrow(0, 2 * H * D, H),
          sum.narrow(0, H * D, D * H).view({D, H}), sum.narrow(0, 2 * H * D + H, D)};
}

// The dense FFN's training on the same kernels, fc2(GELU(fc1(x))) as one
// function: GELU and its derivative come out of fc1's GEMM tiles (the
// pre-activation is never stored), and the backward's d act = dy W2 is
// multiplied by that derivative in its own tiles, so neither GELU nor its
// backward makes a pass over the [M, H] activations of its own.
struct PackedMlpTrain : public torch::autograd::Function<PackedMlpTrain> {
  // x2: [M, D], w1: [H, D], b1: [H], w2: [D, H], b2: [D] -> [M, D]
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x2, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
    const int64_t H = w1.size(0), D = w2.size(0);
    auto d = at::empty({x2.size(0), H}, x2.options());  // GELU'(x W1 + b1)
    auto act = packed_rows(x2, packed_weights().get(w1), b1.contiguous(), H, Epilogue::kGeluGrad, &d);
    ctx->save_for_backward({x2, w1, w2, act, d});
    return packed_rows(act, packed_weights().get(w2), b2.contiguous(), D);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x2 = saved[0], &w1 = saved[1], &w2 = saved[2], &act = saved[3];
    auto d = saved[4];
    const auto dy = grads[0].contiguous();
    const int64_t D = w2.size(0), H = w1.size(0);
    if (2 * H * D + H + D <= kFusedAccFloats)
      return mlp_backward_fused(dy, x2, act, d, w1, w2, ctx->needs_input_grad(0));
    auto dh = packed_rows(dy, pack_for_input_grad(w2), {}, H, Epilogue::kMulAux, &d);
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) dx = packed_rows(dh, pack_for_input_grad(w1), {}, D);
    at::Tensor db1, db2;
    auto dw1 = weight_grad(dh, x2, &db1);
    auto dw2 = weight_grad(dy, act, &db2);
    return {dx, dw1, db1, dw2, db2};
  }
};

// Whether a CPU fp32 layer trains on the packed kernels (PackedLinearTrain).
bool use_packed_training(const at::Tensor& x, at::ScalarType matmul_dtype, const at::Tensor& weight,
                         const at::Tensor& bias) {
  return packed_eligible(x, matmul_dtype, {&weight, &bias}) && wants_grad(x, {&weight, &bias});
}

// moev's GELU kernels: bf16 always (LibTorch converts one element at a time),
// fp32 with AVX-512 (LibTorch's oneDNN eltwise is slower than ours there).
bool gelu_kernel(const at::Tensor& x) {
  return x.device().is_cpu() &&
         (x.scalar_type() == at::kBFloat16 || (x.scalar_type() == at::kFloat && cpu_has_avx512()));
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* bits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// Elements per task of the element-wise kernels.
constexpr int64_t kElementGrain = 16384;

at::Tensor gelu_tensor(const at::Tensor& x_in) {
  const auto x = x_in.contiguous();
  auto y = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t a, int64_t b) { gelu_f32(xp + a, yp + a, b - a); });
    return y;
  }
  const uint16_t* xp = bits(x);
  uint16_t* yp = bits(y);
  at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t a, int64_t b) { gelu_bf16(xp + a, yp + a, b - a); });
  return y;
}

// Whether gelu_saving keeps GELU'(x) (true) or x.
bool saves_derivative(const at::Tensor& x) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && cpu_has_avx512();
}

// grad * GELU'(x) from x: bf16 on moev's kernel (fp32 on AVX-512 keeps GELU'
// itself, see saves_derivative), the rest on LibTorch's.
at::Tensor gelu_backward_x(const at::Tensor& grad_in, const at::Tensor& x_in) {
  if (!x_in.device().is_cpu() || x_in.scalar_type() != at::kBFloat16 || grad_in.scalar_type() != at::kBFloat16)
    return at::gelu_backward(grad_in, x_in);
  const auto g = grad_in.contiguous(), x = x_in.contiguous();
  auto gx = at::empty_like(x);
  const uint16_t *gp = bits(g), *xp = bits(x);
  uint16_t* op = bits(gx);
  at::parallel_for(0, x.numel(), kElementGrain,
                   [&](int64_t a, int64_t b) { gelu_backward_bf16(gp + a, xp + a, op + a, b - a); });
  return gx;
}

struct Gelu : public torch::autograd::Function<Gelu> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
    at::Tensor saved;
    auto y = gelu_saving(x, &saved);
    ctx->save_for_backward({saved});
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {gelu_backward_saved(grads[0], ctx->get_saved_variables()[0])};
  }
};

}  // namespace

at::Tensor gelu(const at::Tensor& x) {
  if (!gelu_kernel(x)) return at::gelu(x);
  if (at::GradMode::is_enabled() && x.requires_grad()) return Gelu::apply(x);
  return gelu_tensor(x);
}

at::Tensor gelu_saving(const at::Tensor& x_in, at::Tensor* saved) {
  if (!saves_derivative(x_in)) {
    *saved = x_in;
    return moev::nn::gelu(x_in);
  }
  const auto x = x_in.contiguous();
  auto y = at::empty_like(x), d = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *dp = d.data_ptr<float>();
  at::parallel_for(0, x.numel(), kElementGrain,
                   [&](int64_t a, int64_t b) { gelu_and_grad_f32(xp + a, yp + a, dp + a, b - a); });
  *saved = d;
  return y;
}

at::Tensor gelu_backward_saved(const at::Tensor& grad, const at::Tensor& saved) {
  if (!saves_derivative(saved)) return gelu_backward_x(grad, saved);
  return grad.to(saved.scalar_type()) * saved;
}

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
  const auto out = weight.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  auto x2 = x.reshape({-1, x.size(-1)});
  if (use_packed(x, matmul_dtype, {&weight, &bias})) {
    if (x2.stride(1) != 1) x2 = x2.contiguous();
    return packed_rows(x2, packed_weights().get(weight), bias.contiguous(), out).view(sizes);
  }
  if (use_packed_training(x, matmul_dtype, weight, bias)) {
    if (x2.stride(1) != 1) x2 = x2.contiguous();
    return PackedLinearTrain::apply(x2, weight, bias).view(sizes);
  }
  if (matmul_dtype != at::kBFloat16)
    return torch::addmm(bias, x2, weight.t()).view(sizes);
  return torch::addmm(bias.to(matmul_dtype), x2.to(matmul_dtype), weight.to(matmul_dtype).t())
      .to(x.scalar_type())
      .view(sizes);
}

namespace {

// The packed inference FFN: out [M, D] = fc2(GELU(fc1(x2))) (+ residual [M, D],
// contiguous, when defined), both layers per block of rows on one thread, so
// the hidden rows stay in L2. p1, p2: the packed weights.
at::Tensor packed_mlp_rows(const at::Tensor& x2, const at::Tensor& p1, const at::Tensor& b1, const at::Tensor& p2,
                           const at::Tensor& b2, int64_t H, const at::Tensor& residual) {
  const int64_t D = x2.size(1), ldx = x2.stride(0);
  const auto c1 = b1.contiguous(), c2 = b2.contiguous();
  auto y = at::empty({x2.size(0), D}, x2.options());
  const float *xp = x2.data_ptr<float>(), *w1p = p1.data_ptr<float>(), *w2p = p2.data_ptr<float>();
  const float *b1p = c1.data_ptr<float>(), *b2p = c2.data_ptr<float>();
  const float* rp = residual.defined() ? residual.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x2.size(0), kPackedGrain, [&](int64_t r0, int64_t r1) {
    packed_ffn(r1 - r0, D, H, xp + r0 * ldx, ldx, w1p, b1p, w2p, b2p, yp + r0 * D, D, rp ? rp + r0 * D : nullptr);
  });
  return y;
}

at::Tensor rows_of(const at::Tensor& x) {
  auto x2 = x.reshape({-1, x.size(-1)});
  return x2.stride(1) == 1 ? x2 : x2.contiguous();
}

}  // namespace

at::Tensor mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
               const at::Tensor& b2, at::ScalarType matmul_dtype) {
  if (use_packed(x, matmul_dtype, {&w1, &b1, &w2, &b2})) {
    MOEV_CHECK(w2.size(0) == x.size(-1), "mlp: fc2 must map back to the input width");
    return packed_mlp_rows(rows_of(x), packed_weights().get(w1), b1, packed_weights().get(w2), b2, w1.size(0), {})
        .view(x.sizes());
  }
  if (packed_eligible(x, matmul_dtype, {&w1, &b1, &w2, &b2}) && w1.requires_grad() && w2.requires_grad() &&
      b1.requires_grad() && b2.requires_grad()) {
    const int64_t D = x.size(-1);
    auto x2 = x.reshape({-1, D});
    if (x2.stride(1) != 1) x2 = x2.contiguous();
    return PackedMlpTrain::apply(x2, w1, b1, w2, b2).view(x.sizes());
  }
  const auto dt = matmul_dtype == at::kBFloat16 ? matmul_dtype : x.scalar_type();
  return linear(nn::gelu(linear(x.to(dt), w1, b1, matmul_dtype)), w2, b2, matmul_dtype)
      .to(x.scalar_type());
}

at::Tensor mlp_residual(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                        const at::Tensor& b2, const at::Tensor& gamma, const at::Tensor& residual,
                        at::ScalarType matmul_dtype) {
  if (!use_packed(x, matmul_dtype, {&w1, &b1, &w2, &b2, &gamma}) || residual.sizes() != x.sizes() ||
      residual.scalar_type() != at::kFloat || !residual.device().is_cpu() || w2.size(0) != x.size(-1))
    return layer_scale_residual(residual, mlp(x, w1, b1, w2, b2, matmul_dtype), gamma);
  // gamma (fc2(a)) = a (gamma W2^T) + gamma b2: gamma scales fc2's output rows.
  const auto w2g = w2 * gamma.unsqueeze(1), b2g = b2 * gamma;
  auto p2 = at::empty({packed_size(w2.size(1), w2.size(0))}, w2.options());
  pack_weight(w2g.data_ptr<float>(), w2.size(1), w2.size(0), 1, w2.size(1), p2.data_ptr<float>());
  return packed_mlp_rows(rows_of(x), packed_weights().get(w1), b1, p2, b2g, w1.size(0),
                         residual.reshape({-1, x.size(-1)}).contiguous())
      .view(x.sizes());
}

at::Tensor patchify_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         at::ScalarType matmul_dtype) {
  const int64_t B = x.size(0), Ci = x.size(3), p = weight.size(2), Co = weight.size(0);
  const int64_t h = x.size(1) / p, w = x.size(2) / p;
  // [B, h, p, w, p, Ci] -> [B, h, w, p, p, Ci]: each patch's pixels in (row, column, channel) order.
  auto patches = x.narrow(1, 0, h * p).narrow(2, 0, w * p).reshape({B, h, p, w, p, Ci}).permute({0, 1, 3, 2, 4, 5});
  const auto matrix = [&] { return weight.permute({0, 2, 3, 1}).reshape({Co, p * p * Ci}); };  // same order
  if (use_packed(x, matmul_dtype, {&weight, &bias}))  // the reordered weight packed once per version
    return packed_rows(patches.reshape({B * h * w, p * p * Ci}), packed_weights().get(weight, matrix),
                       bias.contiguous(), Co)
        .view({B, h, w, Co});
  return linear(patches.reshape({B, h, w, p * p * Ci}), matrix(), bias, matmul_dtype);
}

at::Tensor conv3x3_gelu_nhwc(const at::Tensor& images, const at::Tensor& weight, const at::Tensor& bias,
                             at::ScalarType matmul_dtype) {
  const int64_t B = images.size(0), Ci = images.size(1), H = images.size(2), W = images.size(3);
  auto windows = torch::nn::functional::unfold(images, torch::nn::functional::UnfoldFuncOptions(3).padding(1))
                     .transpose(1, 2)
                     .reshape({B, H, W, Ci * 9});  // (channel, row, column) order, as the conv weight
  return nn::gelu(linear(windows, weight.reshape({weight.size(0), Ci * 9}), bias, matmul_dtype));
}

}  // namespace moev::nn
