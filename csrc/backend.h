// The small set of dense linear-algebra primitives the randomized SVD is written against.
// One algorithm (rsvd.h) runs on any backend: BLAS/LAPACK on the CPU (cpu_backend.cpp) and
// cuBLAS/cuSOLVER on a CUDA stream (cuda_backend.cu).
//
// Conventions
// - Column-major storage, as BLAS/LAPACK/cuBLAS expect. A Mat is a *view*: logical element
//   (i, j) lives at p[i + j * ld] when !t, or at p[i * ld + j] when t (a transposed view).
// - Every call works on a batch of `b` matrices; matrix k of a batch starts at p + k * bs.
// - Workspaces come from alloc()/release(): host memory on the CPU, stream-ordered device
//   memory on CUDA. No primitive synchronizes the host with the device.
// - Failures that depend on the data (a Gram matrix that is not positive definite, an SVD that
//   did not converge) are not thrown: they are OR-ed into `status[k]` (an int per matrix, in
//   backend memory), so the caller can check everything once, at the end. Argument and library
//   errors (bad handle, out of memory) throw std::runtime_error naming the call and matrix.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace pissa {

template <typename T>
struct Mat {
  T* p = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
  bool t = false;  // transposed view of column-major storage
  int64_t bs = 0;  // batch stride, elements

  Mat tr() const { return {p, cols, rows, ld, !t, bs}; }
  // Columns [c0, c0 + n) of a non-transposed view.
  Mat col_block(int64_t c0, int64_t n) const {
    if (t) throw std::logic_error("col_block of a transposed view");
    return {p + c0 * ld, rows, n, ld, false, bs};
  }
};

// A fresh column-major rows x cols matrix per batch element, packed back to back.
template <typename T>
Mat<T> packed(T* p, int64_t rows, int64_t cols) {
  return {p, rows, cols, rows, false, rows * cols};
}

template <typename T>
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // Memory in the backend's address space (host or device), aligned for T.
  virtual T* alloc(size_t count) = 0;
  virtual void release(T* p) = 0;
  virtual int* alloc_status(int64_t b) = 0;  // zero-filled
  virtual void release_status(int* s) = 0;

  // C = alpha * A @ B + beta * C, A/B any views, C non-transposed. (strided-batched GEMM)
  virtual void gemm(int64_t b, T alpha, const Mat<T>& A, const Mat<T>& B, T beta,
                    const Mat<T>& C) = 0;
  // dst = src (equal shapes); src any view (a transposed src is a transposing copy), dst
  // non-transposed. (cudaMemcpy2DAsync / cublas geam on CUDA)
  virtual void copy(int64_t b, const Mat<T>& src, const Mat<T>& dst) = 0;
  // Lower triangle of G = Y^T Y (k x k, non-transposed), Y non-transposed m x k. (SYRK)
  virtual void gram(int64_t b, const Mat<T>& Y, const Mat<T>& G) = 0;
  // G += (rel * trace(G) + tiny) * I on the diagonal: the shift of shifted CholeskyQR.
  virtual void shift_diagonal(int64_t b, const Mat<T>& G, T rel) = 0;
  // In place G = L L^T (lower). A failed factorization sets status[k] |= flag.
  virtual void cholesky(int64_t b, const Mat<T>& G, int* status, int flag) = 0;
  // Y = Y L^{-T} for lower-triangular L (k x k), Y non-transposed m x k. (TRSM)
  virtual void solve_lower_t_right(int64_t b, const Mat<T>& L, const Mat<T>& Y) = 0;
  // A (n x n, overwritten) = U diag(S) Vt; U, Vt n x n non-transposed, S n per matrix.
  virtual void small_svd(int64_t b, const Mat<T>& A, const Mat<T>& U, T* S, const Mat<T>& Vt,
                         int* status, int flag) = 0;
  // Thin SVD of a tall A (m x n, m >= n, overwritten): U m x n, S n, Vt n x n.
  virtual void exact_svd(int64_t b, const Mat<T>& A, const Mat<T>& U, T* S, const Mat<T>& Vt,
                         int* status, int flag) = 0;
  // Copy status (b ints) to the host (this one may synchronize: it is called once, at the end).
  virtual void read_status(const int* status, int* host, int64_t b) = 0;
};

inline std::string shape_str(int64_t b, int64_t m, int64_t n) {
  return "(" + std::to_string(b) + ", " + std::to_string(m) + ", " + std::to_string(n) + ")";
}

}  // namespace pissa
