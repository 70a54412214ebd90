// CPU backend over BLAS/LAPACK function pointers from SciPy (see cpu_backend.h).
#include "cpu_backend.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

namespace py = pybind11;

namespace pissa {
namespace {

// Fortran BLAS/LAPACK signatures (every argument by pointer, LP64 ints).
template <typename T>
struct Lapack {
  using gemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                          const T*, const int*, const T*, const int*, const T*, T*, const int*);
  using syrk_t = void (*)(const char*, const char*, const int*, const int*, const T*, const T*,
                          const int*, const T*, T*, const int*);
  using trsm_t = void (*)(const char*, const char*, const char*, const char*, const int*,
                          const int*, const T*, const T*, const int*, T*, const int*);
  using potrf_t = void (*)(const char*, const int*, T*, const int*, int*);
  using gesdd_t = void (*)(const char*, const int*, const int*, T*, const int*, T*, T*,
                           const int*, T*, const int*, T*, const int*, int*, int*);
  gemm_t gemm = nullptr;
  syrk_t syrk = nullptr;
  trsm_t trsm = nullptr;
  potrf_t potrf = nullptr;
  gesdd_t gesdd = nullptr;
};

void* capsule_pointer(const py::dict& capi, const char* name, const char* module) {
  if (!capi.contains(name))
    throw std::runtime_error(std::string(module) + " does not export " + name);
  py::object cap = capi[name];
  void* p = PyCapsule_GetPointer(cap.ptr(), PyCapsule_GetName(cap.ptr()));
  if (p == nullptr) throw py::error_already_set();
  return p;
}

template <typename T>
const Lapack<T>& lapack() {
  static Lapack<T> fns;
  static std::once_flag once;
  std::call_once(once, [] {
    const char p = sizeof(T) == 4 ? 's' : 'd';
    auto blas = py::module_::import("scipy.linalg.cython_blas").attr("__pyx_capi__");
    auto lap = py::module_::import("scipy.linalg.cython_lapack").attr("__pyx_capi__");
    auto get = [&](const py::dict& capi, const char* base, const char* module) {
      return capsule_pointer(capi, (std::string(1, p) + base).c_str(), module);
    };
    const char* b = "scipy.linalg.cython_blas";
    const char* l = "scipy.linalg.cython_lapack";
    fns.gemm = reinterpret_cast<typename Lapack<T>::gemm_t>(get(blas, "gemm", b));
    fns.syrk = reinterpret_cast<typename Lapack<T>::syrk_t>(get(blas, "syrk", b));
    fns.trsm = reinterpret_cast<typename Lapack<T>::trsm_t>(get(blas, "trsm", b));
    fns.potrf = reinterpret_cast<typename Lapack<T>::potrf_t>(get(lap, "potrf", l));
    fns.gesdd = reinterpret_cast<typename Lapack<T>::gesdd_t>(get(lap, "gesdd", l));
  });
  return fns;
}

int to_int(int64_t v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string(what) + " = " + std::to_string(v) +
                                " does not fit LAPACK's 32-bit integers");
  return static_cast<int>(v);
}

template <typename T>
class CpuBackend final : public Backend<T> {
 public:
  CpuBackend() : f_(lapack<T>()) {}
  const char* name() const override { return "cpu"; }

  T* alloc(size_t count) override {
    void* p = std::aligned_alloc(64, std::max<size_t>(64, (count * sizeof(T) + 63) / 64 * 64));
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void release(T* p) override { std::free(p); }
  int* alloc_status(int64_t b) override {
    return static_cast<int*>(std::calloc(static_cast<size_t>(std::max<int64_t>(b, 1)), sizeof(int)));
  }
  void release_status(int* s) override { std::free(s); }
  void read_status(const int* status, int* host, int64_t b) override {
    std::memcpy(host, status, static_cast<size_t>(b) * sizeof(int));
  }

  void gemm(int64_t b, T alpha, const Mat<T>& A, const Mat<T>& B, T beta,
            const Mat<T>& C) override {
    if (C.t) throw std::logic_error("gemm: C must not be a transposed view");
    if (A.rows != C.rows || B.cols != C.cols || A.cols != B.rows)
      throw std::invalid_argument("gemm: shapes do not conform");
    const int m = to_int(C.rows, "m"), n = to_int(C.cols, "n"), k = to_int(A.cols, "k");
    const int lda = to_int(A.ld, "lda"), ldb = to_int(B.ld, "ldb"), ldc = to_int(C.ld, "ldc");
    const char ta = A.t ? 'T' : 'N', tb = B.t ? 'T' : 'N';
    for (int64_t i = 0; i < b; ++i)
      f_.gemm(&ta, &tb, &m, &n, &k, &alpha, A.p + i * A.bs, &lda, B.p + i * B.bs, &ldb, &beta,
              C.p + i * C.bs, &ldc);
  }

  void gram(int64_t b, const Mat<T>& Y, const Mat<T>& G) override {
    const int n = to_int(Y.cols, "k"), k = to_int(Y.rows, "m");
    const int lda = to_int(Y.ld, "ldy"), ldc = to_int(G.ld, "ldg");
    const T one = 1, zero = 0;
    for (int64_t i = 0; i < b; ++i)
      f_.syrk("L", "T", &n, &k, &one, Y.p + i * Y.bs, &lda, &zero, G.p + i * G.bs, &ldc);
  }

  void shift_diagonal(int64_t b, const Mat<T>& G, T rel) override {
    const T tiny = std::numeric_limits<T>::min() * static_cast<T>(G.rows);
    for (int64_t i = 0; i < b; ++i) {
      T* g = G.p + i * G.bs;
      T trace = 0;
      for (int64_t j = 0; j < G.rows; ++j) trace += g[j + j * G.ld];
      const T s = rel * trace + tiny;
      for (int64_t j = 0; j < G.rows; ++j) g[j + j * G.ld] += s;
    }
  }

  void cholesky(int64_t b, const Mat<T>& G, int* status, int flag) override {
    const int n = to_int(G.rows, "k"), ld = to_int(G.ld, "ldg");
    for (int64_t i = 0; i < b; ++i) {
      T* g = G.p + i * G.bs;
      int info = 0;
      f_.potrf("L", &n, g, &ld, &info);
      bool finite = info == 0;
      for (int j = 0; finite && j < n; ++j) finite = std::isfinite(g[j + j * G.ld]);
      if (!finite) status[i] |= flag;
    }
  }

  void solve_lower_t_right(int64_t b, const Mat<T>& L, const Mat<T>& Y) override {
    const int m = to_int(Y.rows, "m"), n = to_int(Y.cols, "k");
    const int lda = to_int(L.ld, "ldl"), ldb = to_int(Y.ld, "ldy");
    const T one = 1;
    for (int64_t i = 0; i < b; ++i)
      f_.trsm("R", "L", "T", "N", &m, &n, &one, L.p + i * L.bs, &lda, Y.p + i * Y.bs, &ldb);
  }

  void copy(int64_t b, const Mat<T>& src, const Mat<T>& dst) override {
    if (dst.t || src.rows != dst.rows || src.cols != dst.cols)
      throw std::invalid_argument("copy: shapes do not conform");
    for (int64_t i = 0; i < b; ++i) {
      const T* s = src.p + i * src.bs;
      T* d = dst.p + i * dst.bs;
      if (!src.t) {
        for (int64_t j = 0; j < dst.cols; ++j)
          std::memcpy(d + j * dst.ld, s + j * src.ld, static_cast<size_t>(dst.rows) * sizeof(T));
        continue;
      }
      constexpr int64_t kTile = 32;  // blocked transpose: both sides stay in cache
      for (int64_t j0 = 0; j0 < dst.cols; j0 += kTile)
        for (int64_t r0 = 0; r0 < dst.rows; r0 += kTile)
          for (int64_t r = r0; r < std::min(r0 + kTile, dst.rows); ++r)
            for (int64_t j = j0; j < std::min(j0 + kTile, dst.cols); ++j)
              d[r + j * dst.ld] = s[r * src.ld + j];
    }
  }

  void small_svd(int64_t b, const Mat<T>& A, const Mat<T>& U, T* S, const Mat<T>& Vt, int* status,
                 int flag) override {
    svd(b, A, U, S, Vt, status, flag, "small_svd");
  }

  void exact_svd(int64_t b, const Mat<T>& A, const Mat<T>& U, T* S, const Mat<T>& Vt, int* status,
                 int flag) override {
    svd(b, A, U, S, Vt, status, flag, "exact_svd");
  }

 private:
  // Thin SVD by divide and conquer (gesdd, jobz = 'S'), one workspace for the whole batch.
  void svd(int64_t b, const Mat<T>& A, const Mat<T>& U, T* S, const Mat<T>& Vt, int* status,
           int flag, const char* what) {
    const int m = to_int(A.rows, "m"), n = to_int(A.cols, "n");
    if (m < n) throw std::invalid_argument(std::string(what) + ": needs a tall matrix");
    const int lda = to_int(A.ld, "lda"), ldu = to_int(U.ld, "ldu"), ldvt = to_int(Vt.ld, "ldvt");
    std::vector<int> iwork(static_cast<size_t>(8) * n);
    T query = 0;
    int lwork = -1, info = 0;
    f_.gesdd("S", &m, &n, A.p, &lda, S, U.p, &ldu, Vt.p, &ldvt, &query, &lwork, iwork.data(),
             &info);
    lwork = static_cast<int>(query) + 1;
    std::vector<T> work(static_cast<size_t>(lwork));
    for (int64_t i = 0; i < b; ++i) {
      f_.gesdd("S", &m, &n, A.p + i * A.bs, &lda, S + i * n, U.p + i * U.bs, &ldu,
               Vt.p + i * Vt.bs, &ldvt, work.data(), &lwork, iwork.data(), &info);
      if (info != 0) status[i] |= flag;
    }
  }

  const Lapack<T>& f_;
};

}  // namespace

template <typename T>
std::unique_ptr<Backend<T>> make_cpu_backend() {
  return std::make_unique<CpuBackend<T>>();
}

template std::unique_ptr<Backend<float>> make_cpu_backend<float>();
template std::unique_ptr<Backend<double>> make_cpu_backend<double>();

}  // namespace pissa
