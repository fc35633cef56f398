// Row-major single-precision GEMM on strided rows through the Fortran BLAS that
// LibTorch itself links (libblas.so.3: OpenBLAS via Debian's alternatives).
// Used where many small GEMMs run side by side inside at::parallel_for (experts,
// attention heads): there OpenBLAS runs each call on the calling thread, with
// none of the per-call dispatch and thread fork/join of at::mm.
#pragma once

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace moev::nn {

// Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
// C[M x N] = alpha * A[M x K] B[K x N] + beta * C
inline void gemm_nn(int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                    float* C, int ldc, float alpha, float beta) {
  sgemm_("N", "N", &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
// C = alpha * A B^T + beta * C, B stored [N x K]
inline void gemm_nt(int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                    float* C, int ldc, float alpha, float beta) {
  sgemm_("T", "N", &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
// C = alpha * A^T B + beta * C, A stored [K x M]
inline void gemm_tn(int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                    float* C, int ldc, float alpha, float beta) {
  sgemm_("N", "T", &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

}  // namespace moev::nn
