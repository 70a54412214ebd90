// Randomized truncated SVD written once, over the Backend primitives (backend.h).
//
// One power iteration from a Gaussian sketch, `niter` rounds, then Rayleigh-Ritz over its last
// `depth` blocks, as pissa_svd/linalg.py does, so the two implementations are comparable step by
// step: depth 1 is the Halko, Martinsson & Tropp (2011) range finder, depth niter + 1 the block
// Krylov subspace of Musco & Musco (2015), depths 2 and 3 are krylov2 and krylov3. Every depth
// makes the same passes over W.
//
// Orthonormalization is CholeskyQR, made unconditional for GPUs: a first *shifted* round
// (Fukaya et al. 2020: G + s I, s ~ 11 (m k + k^2) u ||Y||_F^2) cannot fail for a full-rank block
// and keeps its span; between power iterations that span is all that matters, so one shifted
// round is enough there. Final bases get two more plain rounds (shifted CholeskyQR3), which are
// orthonormal to working precision for cond(Y) up to ~1/u. Nothing branches on data, so nothing
// synchronizes: a Cholesky that still fails (a rank-deficient or zero block) is recorded in
// `status`, and the caller redoes those matrices with Householder QR.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "backend.h"

namespace pissa {

enum class Method { halko, krylov, krylov2, krylov3, exact };

// How many of the power iteration's niter + 1 blocks Rayleigh-Ritz keeps (linalg.krylov_depth).
inline int krylov_depth(Method method, int niter) {
  if (method == Method::halko) return 1;
  if (method == Method::krylov2) return std::min(2, niter + 1);
  if (method == Method::krylov3) return std::min(3, niter + 1);
  return niter + 1;
}

enum Status : int { kCholesky = 1, kSmallSvd = 2, kExactSvd = 4 };

template <typename T>
class Scratch {  // backend allocations released on scope exit (also on exceptions)
 public:
  explicit Scratch(Backend<T>& be) : be_(be) {}
  ~Scratch() {
    for (T* p : ptrs_) be_.release(p);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Mat<T> mat(int64_t b, int64_t rows, int64_t cols) {
    ptrs_.push_back(be_.alloc(static_cast<size_t>(b * rows * cols)));
    return packed(ptrs_.back(), rows, cols);
  }

 private:
  Backend<T>& be_;
  std::vector<T*> ptrs_;
};

// C = alpha A B + beta C for any views, including a transposed C (C^T = B^T A^T).
template <typename T>
void gemm_any(Backend<T>& be, int64_t b, T alpha, const Mat<T>& A, const Mat<T>& B, T beta,
              const Mat<T>& C) {
  if (C.t)
    be.gemm(b, alpha, B.tr(), A.tr(), beta, C.tr());
  else
    be.gemm(b, alpha, A, B, beta, C);
}

template <typename T>
void copy_any(Backend<T>& be, int64_t b, const Mat<T>& src, const Mat<T>& dst) {
  if (dst.t)
    be.copy(b, src.tr(), dst.tr());
  else
    be.copy(b, src, dst);
}

// Y (m x k, non-transposed) <- an orthonormal basis of its span (final) or a well-conditioned
// one (!final). G: k x k packed scratch.
template <typename T>
void orthonormalize(Backend<T>& be, int64_t b, const Mat<T>& Y, const Mat<T>& G, bool final,
                    int* status) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double m = static_cast<double>(Y.rows), k = static_cast<double>(Y.cols);
  be.gram(b, Y, G);
  be.shift_diagonal(b, G, static_cast<T>(11.0 * (m * k + k * (k + 1)) * u));
  be.cholesky(b, G, status, kCholesky);
  be.solve_lower_t_right(b, G, Y);
  for (int round = 0; final && round < 2; ++round) {
    be.gram(b, Y, G);
    be.cholesky(b, G, status, kCholesky);
    be.solve_lower_t_right(b, G, Y);
  }
}

// Rayleigh-Ritz on the orthonormal basis Q (m x L) of X (m x n, m <= n), given Bt = X^T Q
// (n x L, packed): Bt = Qb R, R^T = Ur S Vr^T, so X ~= (Q Ur) S (Vr^T Qb^T). Writes the top
// `rank` triplets.
template <typename T>
void rayleigh_ritz(Backend<T>& be, Scratch<T>& ws, int64_t b, const Mat<T>& Bt, const Mat<T>& Q,
                   int64_t rank, const Mat<T>& U, T* S, const Mat<T>& Vh, int* status) {
  const int64_t n = Bt.rows, L = Q.cols;
  Mat<T> Qb = ws.mat(b, n, L), G = ws.mat(b, L, L);
  Mat<T> R = ws.mat(b, L, L), Ur = ws.mat(b, L, L), Vrt = ws.mat(b, L, L), s = ws.mat(b, 1, L);
  be.copy(b, Bt, Qb);
  orthonormalize(be, b, Qb, G, true, status);
  be.gemm(b, T(1), Bt.tr(), Qb, T(0), R);  // R^T = Bt^T Qb  (L x L)
  be.small_svd(b, R, Ur, s.p, Vrt, status, kSmallSvd);
  gemm_any(be, b, T(1), Q, Ur.col_block(0, rank), T(0), U);
  Mat<T> vrt_top{Vrt.p, rank, L, L, false, Vrt.bs};
  gemm_any(be, b, T(1), vrt_top, Qb.tr(), T(0), Vh);
  be.copy(b, Mat<T>{s.p, 1, rank, 1, false, L}, Mat<T>{S, 1, rank, 1, false, rank});
}

// Top-`rank` SVD of a batch of W (row-major b x mW x nW, passed as the transposed view of its
// column-major storage) into U (b x mW x rank), S (b x rank), Vh (b x rank x nW), all row-major.
// omega: row-major (b x n x l) test matrix for the short-side orientation X (n = max(mW, nW)),
// exactly the sketch the torch path draws. status: b ints in backend memory.
template <typename T>
void rsvd(Backend<T>& be, int64_t b, const Mat<T>& W, const Mat<T>& omega, int64_t rank, int niter,
          Method method, const Mat<T>& U, T* S, const Mat<T>& Vh, int* status) {
  Scratch<T> ws(be);
  const bool flip = W.rows > W.cols;  // work on X with m <= n
  const Mat<T> X = flip ? W.tr() : W;
  const Mat<T> Ux = flip ? Vh.tr() : U, Vhx = flip ? U.tr() : Vh;
  const int64_t m = X.rows, n = X.cols;

  if (method == Method::exact) {
    const Mat<T> tall = X.tr();  // n x m, n >= m
    Mat<T> A = ws.mat(b, n, m), Ua = ws.mat(b, n, m), Vat = ws.mat(b, m, m), s = ws.mat(b, 1, m);
    be.copy(b, tall, A);
    be.exact_svd(b, A, Ua, s.p, Vat, status, kExactSvd);
    // X = tall^T = Vat^T S Ua^T: U_X = (Vat[:rank, :])^T, Vh_X = (Ua[:, :rank])^T.
    copy_any(be, b, Mat<T>{Vat.p, rank, m, m, false, Vat.bs}.tr(), Ux);
    copy_any(be, b, Ua.col_block(0, rank).tr(), Vhx);
    be.copy(b, Mat<T>{s.p, 1, rank, 1, false, m}, Mat<T>{S, 1, rank, 1, false, rank});
    return;
  }

  const int64_t l = omega.cols;
  if (omega.rows != n) throw std::invalid_argument("omega must have max(m, n) rows");
  if (l < rank || l > m) throw std::invalid_argument("omega needs rank <= columns <= min(m, n)");
  Mat<T> Z = ws.mat(b, n, l), G = ws.mat(b, l, l);

  // K = [Q_lead ... Q_niter]: the first `lead` blocks only power the sketch up (one CholeskyQR
  // round keeps them well conditioned); each kept block is X (X^T Q_prev) orthogonalized against
  // the kept ones before it (block Gram-Schmidt, twice). X^T Q_prev is used as it comes: any
  // basis of its span gives the same next block, at a squared condition number (linalg.py).
  // The products P_i = X^T Q_i that the iteration computes anyway are kept as the blocks of
  // Bt = X^T K, so Rayleigh-Ritz needs only the last block's: 2q + 2 passes over W whatever
  // the depth.
  const int d = krylov_depth(method, niter), lead = niter + 1 - d;
  const int64_t L = d * l;
  if (L > m) throw std::invalid_argument("krylov space depth * l exceeds min(m, n)");
  Mat<T> K = ws.mat(b, m, L), C = ws.mat(b, L, l), Bt = ws.mat(b, n, L);
  Mat<T> Q0 = K.col_block(0, l);
  be.gemm(b, T(1), X, omega, T(0), Q0);
  orthonormalize(be, b, Q0, G, lead == 0, status);
  for (int i = 0; i < lead; ++i) {
    be.gemm(b, T(1), X.tr(), Q0, T(0), Z);
    be.gemm(b, T(1), X, Z, T(0), Q0);
    orthonormalize(be, b, Q0, G, i == lead - 1, status);
  }
  for (int i = 1; i < d; ++i) {
    const Mat<T> prev = K.col_block((i - 1) * l, l), done = K.col_block(0, i * l);
    const Mat<T> Y = K.col_block(i * l, l);
    const Mat<T> Ci{C.p, i * l, l, i * l, false, C.bs};
    const Mat<T> P = Bt.col_block((i - 1) * l, l);
    be.gemm(b, T(1), X.tr(), prev, T(0), P);
    be.gemm(b, T(1), X, P, T(0), Y);
    for (int pass = 0; pass < 2; ++pass) {
      be.gemm(b, T(1), done.tr(), Y, T(0), Ci);
      be.gemm(b, T(-1), done, Ci, T(1), Y);
    }
    orthonormalize(be, b, Y, G, true, status);
  }
  be.gemm(b, T(1), X.tr(), K.col_block((d - 1) * l, l), T(0), Bt.col_block((d - 1) * l, l));
  rayleigh_ritz(be, ws, b, Bt, K, rank, Ux, S, Vhx, status);
}

}  // namespace pissa
