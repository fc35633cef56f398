#include "moev/moe/experts.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include <ATen/Parallel.h>

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/blas.h"
#include "moev/nn/kernels.h"
#include "moev/nn/linear.h"
#include "moev/nn/packed_gemm.h"

namespace moev::moe {

int64_t gemm_rows(int64_t n) {
  if (n <= 64) return n;
  int64_t top = 0;  // floor(log2 n)
  while ((n >> (top + 1)) != 0) ++top;
  const int64_t step = int64_t{1} << (top - 5);
  return (n + step - 1) / step * step;
}

ExpertsImpl::ExpertsImpl(const ExpertsOptions& o) : options(o) {
  const int64_t E = o.num_experts(), D = o.dim(), H = o.hidden();
  w1 = register_parameter("w1", torch::empty({E, D, H}));
  b1 = register_parameter("b1", torch::empty({E, H}));
  w2 = register_parameter("w2", torch::empty({E, H, D}));
  b2 = register_parameter("b2", torch::empty({E, D}));
  reset_parameters();
}

void ExpertsImpl::reset_parameters() {
  // Xavier-uniform per expert and near-zero biases, as ViT initialises its MLPs,
  // so an expert starts as the dense MLP it replaces would.
  torch::NoGradGuard no_grad;
  const double D = static_cast<double>(options.dim()), H = static_cast<double>(options.hidden());
  const double bound = std::sqrt(6.0 / (D + H));
  w1.uniform_(-bound, bound);
  w2.uniform_(-bound, bound);
  b1.normal_(0, 1e-6);
  b2.normal_(0, 1e-6);
}

namespace {

// Splits the placed rows [0, offsets[E]) evenly over the threads, cutting
// through experts where needed (uneven expert loads cannot leave a core idle),
// and calls f(e, r0, r1) for each expert's part of a thread's rows.
template <typename F>
void parallel_rows_by_expert(const std::vector<int64_t>& offsets, const F& f) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  at::parallel_for(0, offsets[E], 16, [&](int64_t row0, int64_t row1) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = std::max(row0, offsets[e]), r1 = std::min(row1, offsets[e + 1]);
      if (r1 > r0) f(e, r0, r1);
    }
  });
}

// The grouped GEMMs of the experts: expert e owns rows offsets[e] .. offsets[e+1]
// of every activation. CPU float32 runs experts side by side on the threads
// (at::parallel_for over experts), each with single-threaded calls on raw
// rows (nn::packed_gemm on AVX-512, where the FFN's whole backward runs per
// expert on nn::packed_ffn_backward; else BLAS):
// with many experts the row blocks are small, and one multi-threaded GEMM
// per expert would spend its time forking and joining. Other dtypes (bf16, whose
// fast GEMMs only LibTorch's oneDNN path has) and devices run each expert's GEMM
// as a LibTorch op into a slice of the same preallocated output.
class GroupedGemm {
 public:
  GroupedGemm(const std::vector<int64_t>& offsets, const at::Tensor& like)
      : offsets_(offsets),
        raw_(like.device().is_cpu() && like.scalar_type() == at::kFloat),
        rounds_rows_(like.device().is_cpu() && like.scalar_type() == at::kBFloat16) {}

  // Whether rows_by_weight applies epilogues (fp32 on AVX-512's packed GEMMs).
  bool fuses_epilogues() const { return raw_ && nn::packed_gemm_supported(); }

  // out[rows e] = epilogue(in[rows e] op(w[e]) (+ b[e])); w: [E, I, O], or
  // [E, O, I] with transpose_w; in: [R, I], out and aux: [R, O]. Rows past
  // offsets[E] are not touched. An epilogue other than kNone needs fuses_epilogues().
  void rows_by_weight(const at::Tensor& in, const at::Tensor& w, const at::Tensor* b, at::Tensor& out,
                      bool transpose_w, nn::Epilogue epilogue = nn::Epilogue::kNone,
                      at::Tensor* aux = nullptr) const {
    const int64_t I = in.size(1), O = out.size(1);
    MOEV_CHECK(epilogue == nn::Epilogue::kNone || fuses_epilogues(), "rows_by_weight: no epilogues on this path");
    if (!raw_) {
      // An expert whose row count n is not a gemm_rows size runs on
      // gemm_rows(n) rows (output rows depend on their input rows only, so the
      // rows after its own, the next expert's or padding, are read and their
      // results dropped), into a scratch block shared by the experts.
      at::Tensor scratch_in, scratch_out;
      const int64_t M = max_rounded_rows();
      if (M > 0) scratch_out = at::empty({M, O}, out.options());
      for_experts([&](int64_t e, int64_t r0, int64_t n) {
        const int64_t m = rounds_rows_ ? gemm_rows(n) : n;
        auto o = m == n ? out.narrow(0, r0, n) : scratch_out.narrow(0, 0, m);
        at::Tensor x;
        if (m == n || r0 + m <= in.size(0)) {
          x = in.narrow(0, r0, m);
        } else {  // the last rows of the buffer: zero rows past its end
          if (!scratch_in.defined()) scratch_in = at::empty({M, I}, in.options());
          x = scratch_in.narrow(0, 0, m);
          x.narrow(0, 0, n).copy_(in.narrow(0, r0, n));
          x.narrow(0, n, m - n).zero_();
        }
        auto we = transpose_w ? w[e].t() : w[e];
        if (b) at::addmm_out(o, (*b)[e], x, we);
        else at::mm_out(o, x, we);
        if (m != n) out.narrow(0, r0, n).copy_(o.narrow(0, 0, n));
      });
      return;
    }
    const float* ip = in.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    const float* bp = b ? b->data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
    if (nn::packed_gemm_supported()) {
      // Training on AVX-512: each expert's weight packed once per call (O(I * O)
      // against its rows' O(n * I * O)) where OpenBLAS re-packs it for every
      // block of rows; the threads split the rows evenly, as below.
      const int64_t E = num_experts(), P = nn::packed_size(I, O);
      auto packed = at::empty({E, P}, w.options());
      float* pp = packed.data_ptr<float>();
      at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          if (offsets_[e + 1] == offsets_[e]) continue;
          // w[e] is [I, O], or [O, I] with transpose_w: element (i, o) at o * I + i.
          if (transpose_w) nn::pack_weight(wp + e * I * O, I, O, 1, I, pp + e * P);
          else nn::pack_weight(wp + e * I * O, I, O, O, 1, pp + e * P);
        }
      });
      float* ap = aux ? aux->data_ptr<float>() : nullptr;
      parallel_rows_by_expert(offsets_, [&](int64_t e, int64_t r0, int64_t r1) {
        nn::packed_gemm(r1 - r0, I, O, ip + r0 * I, I, pp + e * P, bp ? bp + e * O : nullptr, op + r0 * O, O,
                        epilogue, ap ? ap + r0 * O : nullptr);
      });
      return;
    }
    // Rows are independent here: the threads split them evenly.
    parallel_rows_by_expert(offsets_, [&](int64_t e, int64_t r0, int64_t r1) {
      const int64_t n = r1 - r0;
      float* oe = op + r0 * O;
      if (bp)
        for (int64_t r = 0; r < n; ++r) std::copy(bp + e * O, bp + (e + 1) * O, oe + r * O);
      const float* we = wp + e * I * O;
      if (transpose_w)
        nn::gemm_nt(int(n), int(O), int(I), ip + r0 * I, int(I), we, int(I), oe, int(O), 1.0f,
                    bp ? 1.0f : 0.0f);
      else
        nn::gemm_nn(int(n), int(O), int(I), ip + r0 * I, int(I), we, int(O), oe, int(O), 1.0f,
                    bp ? 1.0f : 0.0f);
    });
  }

  // gw[e] = a[rows e]^T g[rows e] and gb[e] = column sums of g[rows e];
  // a: [R, I], g: [R, O], gw: [E, I, O], gb: [E, O]. Experts without rows get zeros.
  void weight_grads(const at::Tensor& a, const at::Tensor& g, at::Tensor& gw, at::Tensor& gb) const {
    gw.zero_();
    gb.zero_();
    const int64_t I = a.size(1), O = g.size(1);
    if (!raw_) {
      // A row count that is not a gemm_rows size is padded with zero rows, in
      // both factors: they add nothing to the sum over rows.
      at::Tensor pad_a, pad_g;
      if (const int64_t M = max_rounded_rows(); M > 0) {
        pad_a = at::empty({M, I}, a.options());
        pad_g = at::empty({M, O}, g.options());
      }
      for_experts([&](int64_t e, int64_t r0, int64_t n) {
        auto ae = a.narrow(0, r0, n), ge = g.narrow(0, r0, n);
        auto gwe = gw[e], gbe = gb[e];
        const int64_t m = rounds_rows_ ? gemm_rows(n) : n;
        if (m == n) {
          at::mm_out(gwe, ae.t(), ge);
        } else {
          for (auto [src, pad] : {std::pair{&ae, &pad_a}, std::pair{&ge, &pad_g}}) {
            pad->narrow(0, 0, n).copy_(*src);
            pad->narrow(0, n, m - n).zero_();
          }
          at::mm_out(gwe, pad_a.narrow(0, 0, m).t(), pad_g.narrow(0, 0, m));
        }
        at::sum_out(gbe, ge, {0});
      });
      return;
    }
    const float *ap = a.data_ptr<float>(), *gp = g.data_ptr<float>();
    float *gwp = gw.data_ptr<float>(), *gbp = gb.data_ptr<float>();
    // Each expert's gradient is one GEMM over its rows.
    parallel_whole_experts([&](int64_t e, int64_t r0, int64_t n) {
      const float* ge = gp + r0 * O;
      nn::gemm_tn(int(I), int(O), int(n), ap + r0 * I, int(I), ge, int(O), gwp + e * I * O, int(O), 1.0f, 0.0f);
      nn::column_sums(ge, n, O, gbp + e * O);
    });
  }

  // The FFN's backward (fuses_epilogues() only) per expert on
  // nn::packed_ffn_backward, given dy [R, D], the forward's x [R, D], act and
  // d = GELU'(hpre) [R, H]; w1 [E, D, H], w2 [E, H, D]. Writes gx (placed rows;
  // undefined: not wanted) and the four gradients.
  void ffn_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& act, const at::Tensor& d,
                    const at::Tensor& w1, const at::Tensor& w2, at::Tensor& gx, at::Tensor& gw1, at::Tensor& gb1,
                    at::Tensor& gw2, at::Tensor& gb2) const {
    MOEV_CHECK(fuses_epilogues(), "ffn_backward: needs the packed kernels");
    const int64_t E = num_experts(), D = x.size(1), H = act.size(1);
    const int64_t P2 = nn::packed_size(D, H), P1 = nn::packed_size(H, D);
    for (auto* g : {&gw1, &gb1, &gw2, &gb2}) g->zero_();
    auto packed = at::empty({E, P2 + P1}, w1.options());
    const float *w1p = w1.data_ptr<float>(), *w2p = w2.data_ptr<float>();
    const float *gyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *ap = act.data_ptr<float>();
    const float* dp = d.data_ptr<float>();
    float *pp = packed.data_ptr<float>(), *gxp = gx.defined() ? gx.data_ptr<float>() : nullptr;
    float *gw1p = gw1.data_ptr<float>(), *gb1p = gb1.data_ptr<float>();
    float *gw2p = gw2.data_ptr<float>(), *gb2p = gb2.data_ptr<float>();
    parallel_whole_experts([&](int64_t e, int64_t r0, int64_t n) {
      // W2^T [D, H] and W1^T [H, D] of w2[e] [H, D] and w1[e] [D, H].
      float *w2t = pp + e * (P2 + P1), *w1t = w2t + P2;
      nn::pack_weight(w2p + e * H * D, D, H, 1, D, w2t);
      nn::pack_weight(w1p + e * D * H, H, D, 1, H, w1t);
      nn::packed_ffn_backward(n, D, H, gyp + r0 * D, xp + r0 * D, D, ap + r0 * H, dp + r0 * H, w2t, w1t,
                              gxp ? gxp + r0 * D : nullptr,
                              {gw1p + e * D * H, gb1p + e * H, gw2p + e * H * D, gb2p + e * D, false});
    });
  }

 private:
  int64_t num_experts() const { return static_cast<int64_t>(offsets_.size()) - 1; }
  // f(e, r0, n) for every expert e with n > 0 rows from r0, each expert on one
  // thread (its gradients are then sums in row order, whatever the threads),
  // the threads taking runs of whole experts of about equal numbers of rows.
  template <typename F>
  void parallel_whole_experts(const F& f) const {
    const auto bounds = balanced_expert_runs();
    at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t e = bounds[t0]; e < bounds[t1]; ++e)
        if (offsets_[e + 1] > offsets_[e]) f(e, offsets_[e], offsets_[e + 1] - offsets_[e]);
    });
  }
  // Expert boundaries b[0] = 0 < ... < b[T] = E cutting the placed rows into T
  // runs of about equal size, one per thread.
  std::vector<int64_t> balanced_expert_runs() const {
    const int64_t E = num_experts(), T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), E));
    std::vector<int64_t> b{0};
    for (int64_t t = 1; t < T; ++t) {
      const int64_t target = offsets_[E] * t / T;
      int64_t e = b.back();
      while (e < E && offsets_[e + 1] <= target) ++e;
      b.push_back(std::max(e, b.back()));
    }
    b.push_back(E);
    return b;
  }
  // The most rows an expert's GEMM is rounded up to, over the experts whose
  // row count gemm_rows changes (0: none).
  int64_t max_rounded_rows() const {
    int64_t most = 0;
    if (rounds_rows_)
      for (int64_t e = 0; e < num_experts(); ++e)
        if (const int64_t n = offsets_[e + 1] - offsets_[e], m = gemm_rows(n); m != n) most = std::max(most, m);
    return most;
  }
  template <typename F>
  void for_experts(F&& f) const {
    for (int64_t e = 0; e < num_experts(); ++e)
      if (offsets_[e + 1] > offsets_[e]) f(e, offsets_[e], offsets_[e + 1] - offsets_[e]);
  }
  const std::vector<int64_t>& offsets_;
  bool raw_;
  bool rounds_rows_;  // bf16 on CPU: oneDNN's GEMMs, run at gemm_rows sizes
};

// out = gelu(x w1 + b1) w2 + b2 per expert's rows; w1 [E, D, H] and w2 [E, H, D],
// or with `transposed` [E, H, D] and [E, D, H]. Fills act and gelu_saved (what
// nn::gelu_backward_saved needs) when given.
at::Tensor ffn_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                       const at::Tensor& w2, const at::Tensor& b2, const std::vector<int64_t>& offsets,
                       bool transposed, at::Tensor* gelu_saved = nullptr, at::Tensor* act_out = nullptr) {
  const int64_t R = x.size(0), D = x.size(1), H = b1.size(1), E = w1.size(0), A = offsets[E];
  auto out = at::empty({R, D}, x.options());
  out.narrow(0, A, R - A).zero_();
  GroupedGemm gg(offsets, x);
  at::Tensor act;
  if (gelu_saved && gg.fuses_epilogues()) {
    // GELU and its derivative (what gelu_backward_saved keeps on this path) from the GEMM's tiles.
    act = at::empty({R, H}, x.options());
    *gelu_saved = at::empty({R, H}, x.options());
    act.narrow(0, A, R - A).zero_();
    gelu_saved->narrow(0, A, R - A).zero_();
    gg.rows_by_weight(x, w1, &b1, act, transposed, nn::Epilogue::kGeluGrad, gelu_saved);
  } else {
    auto hpre = at::empty({R, H}, x.options());
    hpre.narrow(0, A, R - A).zero_();
    gg.rows_by_weight(x, w1, &b1, hpre, transposed);
    // Under GroupedFFN no graph is recorded.
    act = gelu_saved ? nn::gelu_saving(hpre, gelu_saved) : nn::gelu(hpre);
  }
  gg.rows_by_weight(act, w2, &b2, out, transposed);
  if (act_out) *act_out = act;
  return out;
}

// The same FFN in inference on weights packed by nn::pack_weight (w1 [E, P1],
// w2 [E, P2]): the threads split the placed rows evenly, cutting through
// experts, and each runs both GEMMs of its rows back to back, so an expert's
// hidden rows stay in the thread's cache.
at::Tensor packed_ffn_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                              const at::Tensor& w2, const at::Tensor& b2, const std::vector<int64_t>& offsets) {
  const int64_t R = x.size(0), D = x.size(1), H = b1.size(1), E = b1.size(0), A = offsets[E];
  auto out = at::empty({R, D}, x.options());
  out.narrow(0, A, R - A).zero_();
  const float *xp = x.data_ptr<float>(), *w1p = w1.data_ptr<float>(), *w2p = w2.data_ptr<float>();
  const float *b1p = b1.data_ptr<float>(), *b2p = b2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t P1 = w1.size(1), P2 = w2.size(1);
  parallel_rows_by_expert(offsets, [&](int64_t e, int64_t r0, int64_t r1) {
    nn::packed_ffn(r1 - r0, D, H, xp + r0 * D, D, w1p + e * P1, b1p + e * H, w2p + e * P2, b2p + e * D,
                   op + r0 * D, D);
  });
  return out;
}

// The expert FFN over rows sorted by expert, with a hand-written backward that
// writes into buffers allocated once per call (no per-expert autograd nodes, no
// slice-backward zero fills).
struct GroupedFFN : public torch::autograd::Function<GroupedFFN> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                            const at::Tensor& b2, const std::vector<int64_t>& offsets) {
    at::Tensor gelu_saved, act;
    auto out = ffn_forward(x, w1, b1, w2, b2, offsets, /*transposed=*/false, &gelu_saved, &act);
    ctx->save_for_backward({x, w1, w2, gelu_saved, act});
    ctx->saved_data["offsets"] = c10::IValue(offsets);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w1 = saved[1], &w2 = saved[2], &gelu_saved = saved[3], &act = saved[4];
    const auto offsets = ctx->saved_data["offsets"].toIntVector();
    const int64_t E = w1.size(0), D = x.size(1), H = w1.size(2);
    const int64_t A = offsets[E], R = act.size(0);
    GroupedGemm gg(offsets, x);
    auto gy = grads[0].contiguous();
    auto gw1 = at::empty_like(w1), gw2 = at::empty_like(w2);
    auto gb1 = at::empty({E, H}, x.options()), gb2 = at::empty({E, D}, x.options());
    at::Tensor gx;
    if (ctx->needs_input_grad(0)) {
      gx = at::empty_like(x);
      gx.narrow(0, A, R - A).zero_();
    }
    if (gg.fuses_epilogues()) {  // all of it per expert and block of rows, in cache
      gg.ffn_backward(gy, x.contiguous(), act, gelu_saved, w1.contiguous(), w2.contiguous(), gx, gw1, gb1, gw2, gb2);
      return {gx, gw1, gb1, gw2, gb2, at::Tensor()};
    }
    auto ghpre = at::empty_like(act);
    ghpre.narrow(0, A, R - A).zero_();
    gg.rows_by_weight(gy, w2, nullptr, ghpre, /*transpose_w=*/true);  // d act = dy w2^T
    ghpre = nn::gelu_backward_saved(ghpre, gelu_saved);
    gg.weight_grads(act, gy, gw2, gb2);  // d w2 = act^T dy
    gg.weight_grads(x, ghpre, gw1, gb1);  // d w1 = x^T d hpre
    if (gx.defined()) gg.rows_by_weight(ghpre, w1, nullptr, gx, /*transpose_w=*/true);  // dx = d hpre w1^T
    return {gx, gw1, gb1, gw2, gb2, at::Tensor()};
  }
};

}  // namespace

void ExpertsImpl::train(bool on) {
  inference_ = InferenceWeights{};
  torch::nn::Module::train(on);
}

const ExpertsImpl::InferenceWeights& ExpertsImpl::inference_weights(at::ScalarType dtype) {
  auto& c = inference_;
  std::vector<std::pair<const void*, int64_t>> source;
  // Weights made under InferenceMode keep no version counter (and change only
  // under it): their storage alone keys the copy.
  for (const auto* t : {&w1, &b1, &w2, &b2})
    source.emplace_back(t->data_ptr(), t->is_inference() ? -1 : static_cast<int64_t>(t->_version()));
  if (c.w1.defined() && c.dtype == dtype && c.source == source) return c;
  torch::NoGradGuard no_grad;
  c.source = std::move(source);
  c.dtype = dtype;
  // Packed copies are [E, P] (the others [E, I, O]).
  if (dtype == at::kFloat && w1.device().is_cpu() && nn::packed_gemm_supported()) {
    const int64_t E = options.num_experts(), D = options.dim(), H = options.hidden();
    auto w1c = w1.contiguous(), w2c = w2.contiguous();
    c.w1 = at::empty({E, nn::packed_size(D, H)}, w1.options());
    c.w2 = at::empty({E, nn::packed_size(H, D)}, w2.options());
    for (int64_t e = 0; e < E; ++e) {
      nn::pack_weight(w1c[e].data_ptr<float>(), D, H, H, 1, c.w1[e].data_ptr<float>());
      nn::pack_weight(w2c[e].data_ptr<float>(), H, D, D, 1, c.w2[e].data_ptr<float>());
    }
    c.b1 = b1.contiguous();
    c.b2 = b2.contiguous();
    return c;
  }
  const bool transpose = dtype == at::kFloat && w1.device().is_cpu();  // the raw-BLAS path
  c.w1 = (transpose ? w1.transpose(1, 2) : w1).to(dtype).contiguous();
  c.w2 = (transpose ? w2.transpose(1, 2) : w2).to(dtype).contiguous();
  c.b1 = b1.to(dtype).contiguous();
  c.b2 = b2.to(dtype).contiguous();
  return c;
}

at::Tensor ExpertsImpl::forward(const at::Tensor& x, const std::vector<int64_t>& offsets) {
  MOEV_CHECK(static_cast<int64_t>(offsets.size()) == options.num_experts() + 1 &&
                 offsets.back() <= x.size(0),
             "Experts: offsets must hold E + 1 row offsets");
  const auto dt = options.matmul_dtype();
  const bool wants_grad = at::GradMode::is_enabled() && (x.requires_grad() || w1.requires_grad() ||
                                                         w2.requires_grad() || b1.requires_grad() ||
                                                         b2.requires_grad());
  if (!is_training() && !wants_grad) {
    const auto mdt = dt == at::kBFloat16 ? dt : x.scalar_type();
    const auto& c = inference_weights(mdt);
    if (c.w1.dim() == 2) return packed_ffn_forward(x.contiguous(), c.w1, c.b1, c.w2, c.b2, offsets);
    const bool transposed = mdt == at::kFloat && x.device().is_cpu();
    return ffn_forward(x.to(mdt).contiguous(), c.w1, c.b1, c.w2, c.b2, offsets, transposed)
        .to(x.scalar_type());
  }
  if (dt == at::kBFloat16 && x.scalar_type() != dt)  // mixed precision: the casts' backward brings grads back
    return GroupedFFN::apply(x.to(dt).contiguous(), w1.to(dt), b1.to(dt), w2.to(dt), b2.to(dt),
                             offsets)
        .to(x.scalar_type());
  return GroupedFFN::apply(x.contiguous(), w1, b1, w2, b2, offsets);
}

}  // namespace moev::moe
