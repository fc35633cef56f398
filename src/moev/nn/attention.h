// Multi-head self-attention core, fused: softmax(Q K^T / sqrt(dh)) V for every
// (image, head) straight from the packed qkv projection, with a hand-written
// backward. Why: LibTorch 1.13's CPU bmm walks its batch one slice at a time
// (a select and a dispatch per image and head), which made the attention of a
// small ViT cost more than all its GEMMs; permute/contiguous copies of q, k, v
// and of the output are also gone.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace moev::nn {

// qkv: [B, N, 3 * D] laid out as (q | k | v), each D = heads * dh -> [B, N, D]
at::Tensor fused_attention(const at::Tensor& qkv, int64_t heads);

// The same result for any dtype and device: the fused kernel for CPU float32
// qkv, whatever matmul_dtype says, otherwise batched matmuls from stock ops;
// matmul_dtype kBFloat16 runs those on a bf16 copy and returns qkv's dtype.
// Why fp32 even under bf16 on the CPU: at a small ViT's 16-49 tokens the two
// products are a few percent of the FLOPs, and the stock bf16 path's casts,
// permutes and select/slice backward copies were 12% of a bf16 training step.
// qkv: [B, N, 3 * D] -> [B, N, D]
at::Tensor attention(const at::Tensor& qkv, int64_t heads, at::ScalarType matmul_dtype);

}  // namespace moev::nn
