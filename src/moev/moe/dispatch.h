// Dispatch and combine of the shared MoE core: token rows into the
// expert-sorted layout of a RoutingResult, and the experts' outputs back to
// their tokens weighted by their gates.
//
// On CPU float32 each direction is one fused pass with a hand-written backward
// that is again one pass: combine writes every token's output once (no zero
// fill, no separate gate multiply, no scatter-add, whose CPU kernel in LibTorch
// 1.13 adds one row at a time on one thread), and the gradient of dispatch sums
// each token's rows the same way. Both split their work over tokens or rows, so
// no two threads write one row. Other devices and dtypes run the same maths as
// LibTorch ops (index_select / index_add_), so a CUDA build works unchanged.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "moev/moe/router.h"

namespace moev::moe {

// The token-major view of the A placed rows: rows[ptr[t]] .. rows[ptr[t+1]-1]
// are token t's assignments, in row order (at most K of them for top-K; any
// number, none included, for Expert-Choice).
struct TokenRows {
  std::vector<int64_t> ptr;   // T + 1 offsets into rows
  std::vector<int64_t> rows;  // A row indices
};
TokenRows token_rows(const RoutingResult& r, int64_t num_tokens);

// x: [T, D] -> xd: [R, D]; row a < A is x[token_index[a]], padding rows are zero.
at::Tensor dispatch(const at::Tensor& x, const RoutingResult& r, const TokenRows& tr);

// yd: [R, D], gates: [T, E] (r.combine_gates) -> y: [T, D],
// y[t] = sum over t's rows a of gates.view(-1)[gate_index[a]] * yd[a] (zero for
// a token with no placed row). Differentiable in yd and gates.
at::Tensor combine(const at::Tensor& yd, const at::Tensor& gates, const RoutingResult& r,
                   const TokenRows& tr);

}  // namespace moev::moe
