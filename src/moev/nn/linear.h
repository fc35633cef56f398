// The matmul precision of a model and the one linear-layer helper every model
// uses. "bf16" runs the GEMMs of linear layers and experts on bfloat16 copies
// of the activations and fp32 master weights (oneDNN's AVX-512 BF16 kernels,
// about 2.5x the fp32 GEMM rate where the CPU has them), with LayerNorm, softmax,
// residuals, router and losses in fp32: mixed precision as V-MoE trains on TPU.
// On a CPU without native bf16 dot products LibTorch 1.13 falls back to a scalar
// bf16 GEMM some 50x slower than fp32 (measured: tiny V-MoE 11 against 357
// img/s on an AVX2 EPYC), so there "bf16" runs fp32 GEMMs instead.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

namespace moev::nn {

// Whether this CPU has native bf16 dot products (AVX512_BF16 or AMX-BF16).
bool native_bf16();

// "fp32" -> kFloat; "bf16" -> kBFloat16 where native_bf16(), else kFloat (see
// above); anything else is an error naming the value.
at::ScalarType parse_precision(const std::string& name);

// x: [..., I], weight: [O, I], bias: [O] -> [..., O] in x's dtype; with
// matmul_dtype kBFloat16 the GEMM runs on bf16 copies, otherwise in x's dtype
// (one addmm: LibTorch 1.13's Linear on 3-D input adds the bias in a second
// pass over the output). In fp32 on an AVX-512 CPU it runs nn::packed_gemm on
// a packed copy of the weight, made once per weight version and shared by
// every caller; in training the input and weight gradients run on moev's
// kernels too.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  at::ScalarType matmul_dtype);

// residual + gamma * mlp(x, ...), gamma [D] a layer scale: the end of a
// ConvNeXt block. x, residual: [..., D] -> [..., D]. Without gradients on
// packed weights gamma is folded into fc2's weight and bias (packed per call)
// and the residual added in fc2's tiles, so the block's output is written
// once; otherwise layer_scale_residual(residual, mlp(...), gamma).
at::Tensor mlp_residual(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                        const at::Tensor& b2, const at::Tensor& gamma, const at::Tensor& residual,
                        at::ScalarType matmul_dtype);

// A patchify convolution (kernel = stride = p, no padding: a ViT's patch
// embedding, ConvNeXt's stem and downsampling) on channels-last input, as one
// GEMM over the gathered patches; oneDNN's strided convolution and its backward
// took ~20% of a conv-stem V-MoE step. x: [B, H, W, Ci], conv weight
// [Co, Ci, p, p], bias [Co] -> [B, H/p, W/p, Co] (trailing rows and columns that
// fill no patch are dropped, as Conv2d does).
at::Tensor patchify_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         at::ScalarType matmul_dtype);

// An "early convolution" stem (Xiao et al. 2021): a 3x3 convolution (stride 1,
// zero padding 1) and GELU, as one GEMM over the unfolded windows, straight into
// channels-last for the patchify that follows. LibTorch's direct convolution
// took 7 ms of weight gradient per 64 images for 0.7 ms of forward.
// images: [B, Ci, H, W], conv weight [Co, Ci, 3, 3], bias [Co] -> [B, H, W, Co].
at::Tensor conv3x3_gelu_nhwc(const at::Tensor& images, const at::Tensor& weight, const at::Tensor& bias,
                             at::ScalarType matmul_dtype);

// GELU (exact, erf), differentiable; on CPU bf16 tensors, and fp32 ones with
// AVX-512, moev's vectorised kernels (fp32 math), elsewhere at::gelu.
at::Tensor gelu(const at::Tensor& x);
// For hand-written backwards: y = GELU(x), and *saved = what
// gelu_backward_saved(grad, *saved) = grad * GELU'(x) needs. On CPU fp32 with
// AVX-512 that is GELU'(x) itself, from the forward's own erf and exp (the
// backward is one multiply instead of a second evaluation); otherwise x.
at::Tensor gelu_saving(const at::Tensor& x, at::Tensor* saved);
at::Tensor gelu_backward_saved(const at::Tensor& grad, const at::Tensor& saved);

// The dense FFN, x: [..., D] -> [..., D] in x's dtype: fc2(GELU(fc1(x))). In
// bf16 the hidden activations stay bf16 between the two GEMMs (no cast passes);
// on packed weights (as linear) the GELU is fused and the hidden rows never
// leave the cache.
at::Tensor mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
               const at::Tensor& b2, at::ScalarType matmul_dtype);

}  // namespace moev::nn
