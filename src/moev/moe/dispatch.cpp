#include "moev/moe/dispatch.h"

#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::moe {

TokenRows token_rows(const RoutingResult& r, int64_t num_tokens) {
  TokenRows tr;
  if (!r.token_index.defined() || !r.token_index.device().is_cpu() || r.offsets.empty()) return tr;
  const int64_t A = r.offsets.back();
  const int64_t* ti = r.token_index.data_ptr<int64_t>();
  tr.ptr.assign(num_tokens + 1, 0);
  for (int64_t a = 0; a < A; ++a) ++tr.ptr[ti[a] + 1];
  for (int64_t t = 0; t < num_tokens; ++t) tr.ptr[t + 1] += tr.ptr[t];
  tr.rows.resize(A);
  std::vector<int64_t> fill(tr.ptr.begin(), tr.ptr.end() - 1);
  for (int64_t a = 0; a < A; ++a) tr.rows[fill[ti[a]]++] = a;
  return tr;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool fused(const at::Tensor& t, const TokenRows& tr) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && !tr.ptr.empty();
}

// Rows per parallel task: a few KB of copying, well above the fork cost.
constexpr int64_t kGrain = 64;

// dst[t] = sum over t's rows a of weight(a) * src[a], in row order (zero for a
// token without rows): combine's forward, and with weight 1 (exact) the
// backward of dispatch.
template <typename Weight>
void sum_rows_per_token(const float* src, float* dst, int64_t T, int64_t D, const TokenRows& tr,
                        const Weight& weight) {
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = dst + t * D;
      const int64_t p0 = tr.ptr[t], p1 = tr.ptr[t + 1];
      if (p0 == p1) {
        std::memset(o, 0, sizeof(float) * D);
        continue;
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t a = tr.rows[p];
        const float w = weight(a);
        const float* s = src + a * D;
        if (p == p0)
          for (int64_t d = 0; d < D; ++d) o[d] = s[d] * w;
        else
          for (int64_t d = 0; d < D; ++d) o[d] += s[d] * w;
      }
    }
  });
}

struct Dispatch : public torch::autograd::Function<Dispatch> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& token_index,
                            int64_t A, const TokenRows& tr) {
    const auto x = x_in.contiguous();
    const int64_t T = x.size(0), D = x.size(1), R = token_index.size(0);
    auto xd = at::empty({R, D}, x.options());
    const float* xp = x.data_ptr<float>();
    float* op = xd.data_ptr<float>();
    const int64_t* ti = token_index.data_ptr<int64_t>();
    at::parallel_for(0, R, kGrain, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        if (a < A) std::memcpy(op + a * D, xp + ti[a] * D, sizeof(float) * D);
        else std::memset(op + a * D, 0, sizeof(float) * D);
      }
    });
    if (x_in.requires_grad()) {  // inference keeps no copy of the token map
      ctx->saved_data["T"] = T;
      ctx->saved_data["ptr"] = c10::IValue(tr.ptr);
      ctx->saved_data["rows"] = c10::IValue(tr.rows);
    }
    return xd;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto gxd = grads[0].contiguous();
    const int64_t T = ctx->saved_data["T"].toInt(), D = gxd.size(1);
    TokenRows tr{ctx->saved_data["ptr"].toIntVector(), ctx->saved_data["rows"].toIntVector()};
    auto gx = at::empty({T, D}, gxd.options());
    sum_rows_per_token(gxd.data_ptr<float>(), gx.data_ptr<float>(), T, D, tr, [](int64_t) { return 1.0f; });
    return {gx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct Combine : public torch::autograd::Function<Combine> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& yd_in, const at::Tensor& gates_in,
                            const at::Tensor& token_index, const at::Tensor& gate_index,
                            const TokenRows& tr) {
    const auto yd = yd_in.contiguous();
    const auto gates = gates_in.contiguous();
    const int64_t T = gates.size(0), D = yd.size(1);
    auto y = at::empty({T, D}, yd.options());
    const float* yp = yd.data_ptr<float>();
    const float* gp = gates.data_ptr<float>();
    const int64_t* gi = gate_index.data_ptr<int64_t>();
    float* op = y.data_ptr<float>();
    sum_rows_per_token(yp, op, T, D, tr, [gp, gi](int64_t a) { return gp[gi[a]]; });
    ctx->save_for_backward({yd, gates, token_index, gate_index});
    ctx->saved_data["A"] = static_cast<int64_t>(tr.rows.size());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &yd = saved[0], &gates = saved[1], &token_index = saved[2], &gate_index = saved[3];
    const int64_t A = ctx->saved_data["A"].toInt(), R = yd.size(0), D = yd.size(1);
    const auto gy = grads[0].contiguous();
    const float* gyp = gy.data_ptr<float>();
    const float* yp = yd.data_ptr<float>();
    const float* gp = gates.data_ptr<float>();
    const int64_t* ti = token_index.data_ptr<int64_t>();
    const int64_t* gi = gate_index.data_ptr<int64_t>();
    at::Tensor gyd, ggates;
    float* gydp = nullptr;
    float* ggp = nullptr;
    if (ctx->needs_input_grad(0)) {
      gyd = at::empty({R, D}, yd.options());
      gydp = gyd.data_ptr<float>();
    }
    if (ctx->needs_input_grad(1)) {  // one (token, expert) pair per row: no two rows share an entry
      ggates = at::zeros_like(gates);
      ggp = ggates.data_ptr<float>();
    }
    at::parallel_for(0, R, kGrain, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        if (a >= A) {
          if (gydp) std::memset(gydp + a * D, 0, sizeof(float) * D);
          continue;
        }
        const float* g = gyp + ti[a] * D;
        if (gydp) {
          const float w = gp[gi[a]];
          float* o = gydp + a * D;
          for (int64_t d = 0; d < D; ++d) o[d] = g[d] * w;
        }
        if (ggp) {
          const float* s = yp + a * D;
          float acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += g[d] * s[d];
          ggp[gi[a]] = acc;
        }
      }
    });
    return {gyd, ggates, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor dispatch(const at::Tensor& x, const RoutingResult& r, const TokenRows& tr) {
  MOEV_CHECK(x.dim() == 2, "dispatch: expected x [T, D], got ", x.sizes());
  if (!fused(x, tr)) return x.index_select(0, r.token_index);
  MOEV_CHECK(static_cast<int64_t>(tr.ptr.size()) == x.size(0) + 1, "dispatch: token rows of ",
             tr.ptr.size() - 1, " tokens for x of ", x.size(0));
  return Dispatch::apply(x, r.token_index, r.offsets.back(), tr);
}

at::Tensor combine(const at::Tensor& yd, const at::Tensor& gates, const RoutingResult& r,
                   const TokenRows& tr) {
  MOEV_CHECK(yd.dim() == 2 && gates.dim() == 2, "combine: expected yd [R, D] and gates [T, E], got ",
             yd.sizes(), " and ", gates.sizes());
  const int64_t T = gates.size(0);
  if (!fused(yd, tr) || gates.scalar_type() != at::kFloat) {
    auto flat = torch::cat({gates.reshape(-1), gates.new_zeros({1})});  // padding rows point at the 0
    auto weight = flat.index_select(0, r.gate_index).to(yd.scalar_type());
    return torch::zeros({T, yd.size(1)}, yd.options()).index_add_(0, r.token_index, yd * weight.unsqueeze(1));
  }
  MOEV_CHECK(static_cast<int64_t>(tr.ptr.size()) == T + 1, "combine: token rows of ", tr.ptr.size() - 1,
             " tokens for gates of ", T);
  return Combine::apply(yd, gates, r.token_index, r.gate_index, tr);
}

}  // namespace moev::moe
