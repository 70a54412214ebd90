// CUDA backend: cuBLAS + cuSOLVER on the caller's stream (the contract is in backend.h).
// Nothing here synchronizes the host except read_status(); workspaces are stream-ordered.
#include "cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pissa {
namespace {

// ---------------------------------------------------------------- errors

// What a failing call was working on: matrix k of a batch of b (the whole batch when k < 0),
// each m x n; b == 0: nothing to say.
struct Where {
  int64_t k = -1, b = 0, m = 0, n = 0;
};

std::string describe(const Where& w) {
  if (w.b == 0) return "";
  const std::string batch = "a batch of " + std::to_string(w.b);
  return (w.k < 0 ? " on " + batch : " on matrix " + std::to_string(w.k) + " of " + batch) +
         ", " + std::to_string(w.m) + " x " + std::to_string(w.n);
}

std::string status_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " = " + std::to_string(int(e)) + ": " +
         cudaGetErrorString(e);
}
std::string status_text(cublasStatus_t s) {
  return std::string(cublasGetStatusName(s)) + " = " + std::to_string(int(s)) + ": " +
         cublasGetStatusString(s);
}
std::string status_text(cusolverStatus_t s) {
  static const char* const names[] = {  // the contiguous values 0..11
      "SUCCESS", "NOT_INITIALIZED", "ALLOC_FAILED", "INVALID_VALUE", "ARCH_MISMATCH",
      "MAPPING_ERROR", "EXECUTION_FAILED", "INTERNAL_ERROR", "MATRIX_TYPE_NOT_SUPPORTED",
      "NOT_SUPPORTED", "ZERO_PIVOT", "INVALID_LICENSE"};
  const int v = int(s);
  return std::string("CUSOLVER_STATUS_") + (v >= 0 && v < 12 ? names[v] : "UNKNOWN") + " = " +
         std::to_string(v);
}

bool failed(cudaError_t e) { return e != cudaSuccess; }
bool failed(cublasStatus_t s) { return s != CUBLAS_STATUS_SUCCESS; }
bool failed(cusolverStatus_t s) { return s != CUSOLVER_STATUS_SUCCESS; }

// Throws std::runtime_error naming the call, the status and the matrix. A '?' in `call` stands
// for the precision letter `prec` (S or D), as in "cublas?trsm_64".
template <typename Status>
void check(Status s, const char* call, const Where& w = {}, char prec = '?') {
  if (!failed(s)) return;
  std::string name(call);
  std::replace(name.begin(), name.end(), '?', prec);
  throw std::runtime_error(name + " failed (" + status_text(s) + ")" + describe(w));
}

int to_int(int64_t v, const char* what) {  // for the 32-bit gesvdj API
  if (v < 0 || v > INT_MAX)
    throw std::invalid_argument(std::string(what) + " = " + std::to_string(v) +
                                " does not fit cusolverDn<t>gesvdj's 32-bit integers");
  return static_cast<int>(v);
}

// ---------------------------------------------------------------- precision traits, views

template <typename T>
struct Tr;
template <>
struct Tr<float> {
  static constexpr cudaDataType dt = CUDA_R_32F;
  static constexpr char letter = 'S';
  static constexpr auto gemm = cublasSgemmStridedBatched_64;
  static constexpr auto syrk = cublasSsyrk_64;
  static constexpr auto trsm = cublasStrsm_64;
  static constexpr auto geam = cublasSgeam_64;
  static constexpr auto gesvdj_size = cusolverDnSgesvdj_bufferSize;
  static constexpr auto gesvdj = cusolverDnSgesvdj;
};
template <>
struct Tr<double> {
  static constexpr cudaDataType dt = CUDA_R_64F;
  static constexpr char letter = 'D';
  static constexpr auto gemm = cublasDgemmStridedBatched_64;
  static constexpr auto syrk = cublasDsyrk_64;
  static constexpr auto trsm = cublasDtrsm_64;
  static constexpr auto geam = cublasDgeam_64;
  static constexpr auto gesvdj_size = cusolverDnDgesvdj_bufferSize;
  static constexpr auto gesvdj = cusolverDnDgesvdj;
};

template <typename T>
std::string dims(const Mat<T>& a) {
  return std::to_string(a.rows) + " x " + std::to_string(a.cols) + (a.t ? " (transposed)" : "");
}
template <typename T>
int64_t ld(const Mat<T>& a) {  // the libraries reject ld < 1 even for empty matrices
  return std::max<int64_t>(1, a.ld);
}
template <typename T>
cublasOperation_t op(const Mat<T>& a) {
  return a.t ? CUBLAS_OP_T : CUBLAS_OP_N;
}
template <typename T>
void not_transposed(const char* what, std::initializer_list<const Mat<T>*> views) {
  for (const Mat<T>* v : views)
    if (v->t) throw std::logic_error(std::string(what) + ": transposed views are not supported");
}
template <typename T>
int64_t square(const char* what, const Mat<T>& a) {
  if (a.rows != a.cols)
    throw std::invalid_argument(std::string(what) + ": needs a square matrix, got " + dims(a));
  return a.rows;
}

// ---------------------------------------------------------------- device, memory, handles

class DeviceGuard {  // makes `device` current for a scope, then restores the previous one
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device_) {
      const cudaError_t e = cudaSetDevice(device_);
      if (failed(e))
        throw std::runtime_error("cudaSetDevice(" + std::to_string(device_) + ") failed (" +
                                 status_text(e) + ")");
    }
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_, prev_ = 0;
};

void* malloc_async(size_t bytes, cudaStream_t s) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  const cudaError_t e = cudaMallocAsync(&p, bytes, s);
  if (failed(e))
    throw std::runtime_error("cudaMallocAsync failed (" + status_text(e) + ") allocating " +
                             std::to_string(bytes) + " bytes");
  return p;
}

class Scratch {  // stream-ordered device buffer, freed (stream-ordered) at scope exit
 public:
  Scratch(size_t bytes, cudaStream_t s) : s_(s), p_(malloc_async(bytes, s)) {}
  ~Scratch() {
    if (p_) cudaFreeAsync(p_, s_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename U>
  U* as() const {
    return static_cast<U*>(p_);
  }

 private:
  cudaStream_t s_;
  void* p_;
};

struct Handles {
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  cusolverDnParams_t params = nullptr;
  gesvdjInfo_t svdj = nullptr;  // defaults: tolerance = machine eps, 100 sweeps, sorted
};

// Host workspace of cuSOLVER's 64-bit API: one per thread, grown but never freed, so no
// buffer is released while a call queued on the stream might still use it (NVIDIA's samples
// free theirs only after synchronizing, and nothing here synchronizes).
char* host_workspace(size_t bytes) {
  thread_local std::vector<std::unique_ptr<char[]>> kept;
  thread_local size_t size = 0;
  if (bytes > size) {
    size = std::max(bytes, 2 * size);
    kept.emplace_back(new char[size]);
  }
  return kept.empty() ? nullptr : kept.back().get();
}

Handles create_handles() {  // on the current device
  Handles h;
  try {
    check(cublasCreate(&h.blas), "cublasCreate");
    check(cusolverDnCreate(&h.solver), "cusolverDnCreate");
    check(cusolverDnCreateParams(&h.params), "cusolverDnCreateParams");
    check(cusolverDnCreateGesvdjInfo(&h.svdj), "cusolverDnCreateGesvdjInfo");
  } catch (...) {
    if (h.svdj) cusolverDnDestroyGesvdjInfo(h.svdj);
    if (h.params) cusolverDnDestroyParams(h.params);
    if (h.solver) cusolverDnDestroy(h.solver);
    if (h.blas) cublasDestroy(h.blas);
    throw;
  }
  return h;
}

// Handles are per (device, thread): a handle carries its stream, so one handle shared by two
// threads (the binding releases the GIL) would send one thread's work to the other's stream.
// A thread takes them from a per-device free list on first use and gives them back when it
// exits. They are never destroyed: destroying them at process exit can outlive the driver.
struct Pool {
  std::mutex mu;
  std::map<int, std::vector<Handles>> free;
};
Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}
struct ThreadHandles {
  std::map<int, Handles> by_device;
  ~ThreadHandles() {
    std::lock_guard<std::mutex> lock(pool().mu);
    for (const auto& dh : by_device) pool().free[dh.first].push_back(dh.second);
  }
};

// The calling thread's handles for `device` (which must be current), bound to `stream`.
Handles& bind(int device, cudaStream_t stream) {
  thread_local ThreadHandles mine;
  auto it = mine.by_device.find(device);
  if (it == mine.by_device.end()) {
    Handles h;
    {
      std::lock_guard<std::mutex> lock(pool().mu);
      std::vector<Handles>& spare = pool().free[device];
      if (!spare.empty()) {
        h = spare.back();
        spare.pop_back();
      }
    }
    it = mine.by_device.emplace(device, h.blas ? h : create_handles()).first;
  }
  Handles& h = it->second;
  check(cublasSetStream(h.blas, stream), "cublasSetStream");
  check(cusolverDnSetStream(h.solver, stream), "cusolverDnSetStream");
  return h;
}

// ---------------------------------------------------------------- kernels

constexpr int kThreads = 256, kTile = 32, kTileRows = 8;

// Launches with the launch's own error returned (cudaGetLastError could report an older one).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t s, const char* what,
            const Where& w, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.stream = s;
  check(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...), what, w);
}

unsigned blocks(int64_t count, int64_t limit = INT_MAX) {
  if (count > limit)
    throw std::invalid_argument("a grid of " + std::to_string(count) + " blocks is too large");
  return static_cast<unsigned>(count);
}

// One block per matrix: with d_i = g[i * step], d_i += rel * sum(d) + tiny.
template <typename T>
__global__ void shift_diagonal_kernel(T* g, int64_t n, int64_t step, int64_t bs, T rel, T tiny) {
  __shared__ T part[kThreads];
  T* d = g + static_cast<int64_t>(blockIdx.x) * bs;
  T sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += d[i * step];
  part[threadIdx.x] = sum;
  __syncthreads();
  for (unsigned w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  const T shift = rel * part[0] + tiny;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) d[i * step] += shift;
}

// dst(i, j) = src[i + j * sld], or src[i * sld + j] for a transposed src; blockIdx.z strides
// over the batch. A block moves a 32 x 32 tile; a transposed one goes through shared memory so
// that reads and writes both coalesce.
template <typename T>
__global__ void copy_kernel(const T* src, int64_t sld, int64_t sbs, bool transposed, T* dst,
                            int64_t dld, int64_t dbs, int64_t rows, int64_t cols, int64_t b) {
  __shared__ T tile[kTile][kTile + 1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  for (int64_t k = blockIdx.z; k < b; k += gridDim.z) {
    const T* s = src + k * sbs;
    T* d = dst + k * dbs;
    if (!transposed) {
      const int64_t i = i0 + threadIdx.x;
      for (int64_t j = j0 + threadIdx.y; j < j0 + kTile; j += kTileRows)
        if (i < rows && j < cols) d[i + j * dld] = s[i + j * sld];
      continue;
    }
    for (int r = threadIdx.y; r < kTile; r += kTileRows) {  // consecutive threads: along j
      const int64_t i = i0 + r, j = j0 + threadIdx.x;
      if (i < rows && j < cols) tile[r][threadIdx.x] = s[i * sld + j];
    }
    __syncthreads();
    for (int c = threadIdx.y; c < kTile; c += kTileRows) {  // consecutive threads: along i
      const int64_t i = i0 + threadIdx.x, j = j0 + c;
      if (i < rows && j < cols) d[i + j * dld] = tile[threadIdx.x][c];
    }
    __syncthreads();  // the next batch element reuses the tile
  }
}

// One block per matrix k: status[k] |= flag when info[k] != 0 or, if x is given, when one of
// x[k * bs + i * inc], i < len, is not finite (NaN/Inf that the library let through).
template <typename T>
__global__ void flag_kernel(const int* info, const T* x, int64_t len, int64_t inc, int64_t bs,
                            int* status, int flag) {
  const int64_t k = blockIdx.x;
  int bad = 0;
  if (x != nullptr)
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) bad |= !isfinite(x[k * bs + i * inc]);
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0 && (bad || info[k] != 0)) status[k] |= flag;
}

template <typename T>
void flag_failures(int64_t b, const int* info, const T* x, int64_t len, int64_t inc, int64_t bs,
                   int* status, int flag, cudaStream_t s) {
  if (status == nullptr || b == 0) return;
  launch(flag_kernel<T>, blocks(b), kThreads, s, "flag_kernel launch", Where{-1, b, len, 1},
         info, x, len, inc, bs, status, flag);
}

// ---------------------------------------------------------------- backend

template <typename T>
class CudaBackend final : public Backend<T> {
 public:
  CudaBackend(int device, uintptr_t stream)
      : device_(device), stream_(reinterpret_cast<cudaStream_t>(stream)) {
    DeviceGuard guard(device_);  // fails early on a bad device
  }
  const char* name() const override { return "cuda"; }

  T* alloc(size_t count) override {
    DeviceGuard guard(device_);
    return static_cast<T*>(malloc_async(count * sizeof(T), stream_));
  }
  // release/release_status never throw: rsvd.h calls them from destructors. A failing
  // cudaFreeAsync means the context is already broken, and the next checked call says so.
  void release(T* p) override { free_async(p); }
  int* alloc_status(int64_t b) override {
    DeviceGuard guard(device_);
    int* s = static_cast<int*>(malloc_async(static_cast<size_t>(b) * sizeof(int), stream_));
    if (s) check(cudaMemsetAsync(s, 0, b * sizeof(int), stream_), "cudaMemsetAsync (status)");
    return s;
  }
  void release_status(int* s) override { free_async(s); }

  void gemm(int64_t b, T alpha, const Mat<T>& A, const Mat<T>& B, T beta,
            const Mat<T>& C) override {
    if (C.t) throw std::logic_error("gemm: C must not be a transposed view");
    const int64_t m = C.rows, n = C.cols, k = A.cols;
    if (A.rows != m || B.rows != k || B.cols != n)
      throw std::invalid_argument("gemm: shapes do not match: A " + dims(A) + ", B " + dims(B) +
                                  ", C " + dims(C));
    if (b == 0 || m == 0 || n == 0) return;
    DeviceGuard guard(device_);
    Handles& h = bind(device_, stream_);
    check(Tr<T>::gemm(h.blas, op(A), op(B), m, n, k, &alpha, A.p, ld(A), A.bs, B.p, ld(B), B.bs,
                      &beta, C.p, ld(C), C.bs, b),
          "cublas?gemmStridedBatched_64", Where{-1, b, m, n}, Tr<T>::letter);
  }

  void copy(int64_t b, const Mat<T>& src, const Mat<T>& dst) override {
    if (dst.t) throw std::logic_error("copy: dst must not be a transposed view");
    if (src.rows != dst.rows || src.cols != dst.cols)
      throw std::invalid_argument("copy: src is " + dims(src) + ", dst " + dims(dst));
    const int64_t m = dst.rows, n = dst.cols;
    if (b == 0 || m == 0 || n == 0) return;
    DeviceGuard guard(device_);
    const dim3 grid(blocks((m + kTile - 1) / kTile), blocks((n + kTile - 1) / kTile, 65535),
                    blocks(std::min<int64_t>(b, 65535)));
    launch(copy_kernel<T>, grid, dim3(kTile, kTileRows), stream_, "copy_kernel launch",
           Where{-1, b, m, n}, src.p, src.ld, src.bs, src.t, dst.p, dst.ld, dst.bs, m, n, b);
  }

  void gram(int64_t b, const Mat<T>& Y, const Mat<T>& G) override {
    not_transposed("gram", {&Y, &G});
    const int64_t m = Y.rows, k = Y.cols;
    if (square("gram", G) != k)
      throw std::invalid_argument("gram: G is " + dims(G) + ", Y " + dims(Y));
    if (b == 0 || k == 0) return;
    DeviceGuard guard(device_);
    Handles& h = bind(device_, stream_);
    const T one = 1, zero = 0;
    if (b == 1) {  // half the flops of a GEMM
      check(Tr<T>::syrk(h.blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T, k, m, &one, Y.p, ld(Y), &zero,
                        G.p, ld(G)),
            "cublas?syrk_64", Where{0, b, m, k}, Tr<T>::letter);
    } else {  // one launch for the batch; the full G (only its lower triangle is used)
      check(Tr<T>::gemm(h.blas, CUBLAS_OP_T, CUBLAS_OP_N, k, k, m, &one, Y.p, ld(Y), Y.bs, Y.p,
                        ld(Y), Y.bs, &zero, G.p, ld(G), G.bs, b),
            "cublas?gemmStridedBatched_64", Where{-1, b, m, k}, Tr<T>::letter);
    }
  }

  void shift_diagonal(int64_t b, const Mat<T>& G, T rel) override {
    not_transposed("shift_diagonal", {&G});
    const int64_t n = square("shift_diagonal", G);
    if (b == 0 || n == 0) return;
    DeviceGuard guard(device_);
    const T tiny = std::numeric_limits<T>::min() * static_cast<T>(n);
    launch(shift_diagonal_kernel<T>, blocks(b), kThreads, stream_, "shift_diagonal_kernel launch",
           Where{-1, b, n, n}, G.p, n, G.ld + 1, G.bs, rel, tiny);
  }

  void cholesky(int64_t b, const Mat<T>& G, int* status, int flag) override {
    not_transposed("cholesky", {&G});
    const int64_t n = square("cholesky", G);
    if (b == 0 || n == 0) return;
    DeviceGuard guard(device_);
    Handles& h = bind(device_, stream_);
    const cudaDataType dt = Tr<T>::dt;
    size_t dev_bytes = 0, host_bytes = 0;
    check(cusolverDnXpotrf_bufferSize(h.solver, h.params, CUBLAS_FILL_MODE_LOWER, n, dt, G.p,
                                      ld(G), dt, &dev_bytes, &host_bytes),
          "cusolverDnXpotrf_bufferSize", Where{-1, b, n, n});
    Scratch work(dev_bytes, stream_), info(b * sizeof(int), stream_);
    char* host = host_workspace(host_bytes);
    for (int64_t k = 0; k < b; ++k)
      check(cusolverDnXpotrf(h.solver, h.params, CUBLAS_FILL_MODE_LOWER, n, dt, G.p + k * G.bs,
                             ld(G), dt, work.as<void>(), dev_bytes, host, host_bytes,
                             info.as<int>() + k),
            "cusolverDnXpotrf", Where{k, b, n, n});
    // A NaN in G can come back with info == 0 and a NaN factor: check the diagonal too.
    flag_failures<T>(b, info.as<int>(), G.p, n, G.ld + 1, G.bs, status, flag, stream_);
  }

  void solve_lower_t_right(int64_t b, const Mat<T>& L, const Mat<T>& Y) override {
    not_transposed("solve_lower_t_right", {&L, &Y});
    const int64_t n = square("solve_lower_t_right", L), m = Y.rows;
    if (Y.cols != n)
      throw std::invalid_argument("solve_lower_t_right: L is " + dims(L) + ", Y " + dims(Y));
    if (b == 0 || m == 0 || n == 0) return;
    DeviceGuard guard(device_);
    Handles& h = bind(device_, stream_);
    const T one = 1;
    for (int64_t k = 0; k < b; ++k)
      check(Tr<T>::trsm(h.blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T,
                        CUBLAS_DIAG_NON_UNIT, m, n, &one, L.p + k * L.bs, ld(L), Y.p + k * Y.bs,
                        ld(Y)),
            "cublas?trsm_64", Where{k, b, m, n}, Tr<T>::letter);
  }

  void small_svd(int64_t b, const Mat<T>& A, const Mat<T>& U, T* S, const Mat<T>& Vt, int* status,
                 int flag) override {
    not_transposed("small_svd", {&A, &U, &Vt});
    const int64_t n = square("small_svd", A);
    if (square("small_svd", U) != n || square("small_svd", Vt) != n)
      throw std::invalid_argument("small_svd: A is " + dims(A) + ", U " + dims(U) + ", Vt " +
                                  dims(Vt));
    if (b == 0 || n == 0) return;
    const int ni = to_int(n, "small_svd: n"), lda = to_int(ld(A), "small_svd: lda"),
              ldu = to_int(ld(U), "small_svd: ldu");
    DeviceGuard guard(device_);
    Handles& h = bind(device_, stream_);
    // gesvdj returns V: into one scratch matrix, transposed into Vt right after each call.
    Scratch v(n * n * sizeof(T), stream_), info(b * sizeof(int), stream_);
    int lwork = 0;
    check(Tr<T>::gesvdj_size(h.solver, CUSOLVER_EIG_MODE_VECTOR, 1, ni, ni, A.p, lda, S, U.p, ldu,
                             v.as<T>(), ni, &lwork, h.svdj),
          "cusolverDn?gesvdj_bufferSize", Where{-1, b, n, n}, Tr<T>::letter);
    Scratch work(static_cast<size_t>(lwork) * sizeof(T), stream_);
    const T one = 1, zero = 0;
    for (int64_t k = 0; k < b; ++k) {
      const Where w{k, b, n, n};
      check(Tr<T>::gesvdj(h.solver, CUSOLVER_EIG_MODE_VECTOR, 1, ni, ni, A.p + k * A.bs, lda,
                          S + k * n, U.p + k * U.bs, ldu, v.as<T>(), ni, work.as<T>(), lwork,
                          info.as<int>() + k, h.svdj),
            "cusolverDn?gesvdj", w, Tr<T>::letter);
      T* vt = Vt.p + k * Vt.bs;  // Vt = V^T (geam with C = B, beta = 0: in place, B unread)
      check(Tr<T>::geam(h.blas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, &one, v.as<T>(), n, &zero, vt,
                        ld(Vt), vt, ld(Vt)),
            "cublas?geam_64", w, Tr<T>::letter);
    }
    flag_failures<T>(b, info.as<int>(), S, n, 1, n, status, flag, stream_);
  }

  void exact_svd(int64_t b, const Mat<T>& A, const Mat<T>& U, T* S, const Mat<T>& Vt, int* status,
                 int flag) override {
    not_transposed("exact_svd", {&A, &U, &Vt});
    const int64_t m = A.rows, n = A.cols;
    if (m < n || U.rows != m || U.cols != n || Vt.rows != n || Vt.cols != n)
      throw std::invalid_argument("exact_svd: needs A m x n (m >= n), U m x n, Vt n x n; got A " +
                                  dims(A) + ", U " + dims(U) + ", Vt " + dims(Vt));
    if (b == 0 || n == 0) return;
    DeviceGuard guard(device_);
    Handles& h = bind(device_, stream_);
    const cudaDataType dt = Tr<T>::dt;
    size_t dev_bytes = 0, host_bytes = 0;
    check(cusolverDnXgesvd_bufferSize(h.solver, h.params, 'S', 'S', m, n, dt, A.p, ld(A), dt, S,
                                      dt, U.p, ld(U), dt, Vt.p, ld(Vt), dt, &dev_bytes,
                                      &host_bytes),
          "cusolverDnXgesvd_bufferSize", Where{-1, b, m, n});
    Scratch work(dev_bytes, stream_), info(b * sizeof(int), stream_);
    char* host = host_workspace(host_bytes);
    for (int64_t k = 0; k < b; ++k)
      check(cusolverDnXgesvd(h.solver, h.params, 'S', 'S', m, n, dt, A.p + k * A.bs, ld(A), dt,
                             S + k * n, dt, U.p + k * U.bs, ld(U), dt, Vt.p + k * Vt.bs, ld(Vt),
                             dt, work.as<void>(), dev_bytes, host, host_bytes,
                             info.as<int>() + k),
            "cusolverDnXgesvd", Where{k, b, m, n});
    flag_failures<T>(b, info.as<int>(), S, n, 1, n, status, flag, stream_);
  }

  void read_status(const int* status, int* host, int64_t b) override {
    if (b == 0) return;
    DeviceGuard guard(device_);
    check(cudaMemcpyAsync(host, status, b * sizeof(int), cudaMemcpyDeviceToHost, stream_),
          "cudaMemcpyAsync (status to host)");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

 private:
  void free_async(void* p) noexcept {
    if (p == nullptr) return;
    int prev = device_;
    cudaGetDevice(&prev);
    if (prev != device_) cudaSetDevice(device_);
    cudaFreeAsync(p, stream_);
    if (prev != device_) cudaSetDevice(prev);
  }

  int device_;
  cudaStream_t stream_;
};

std::string version_text(int v) {  // 12040 -> "12.4"
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

template <typename Get, typename Status>
std::string library_version(Get get, Status ok) {
  int major = 0, minor = 0, patch = 0;
  if (get(MAJOR_VERSION, &major) != ok || get(MINOR_VERSION, &minor) != ok ||
      get(PATCH_LEVEL, &patch) != ok)
    return "unknown";
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

}  // namespace

template <typename T>
std::unique_ptr<Backend<T>> make_cuda_backend(int device, uintptr_t stream) {
  return std::make_unique<CudaBackend<T>>(device, stream);
}

template <typename T>
void cuda_gesvdr(int device, uintptr_t stream, int64_t b, const Mat<T>& A, int64_t rank,
                 int64_t oversample, int64_t niter, const Mat<T>& U, T* S, const Mat<T>& Vt,
                 int* status) {
  not_transposed("cuda_gesvdr", {&A, &U, &Vt});
  const int64_t m = A.rows, n = A.cols, mn = std::min(m, n), l = rank + oversample;
  if (rank < 1 || oversample < 0 || niter < 0 || l >= mn)
    throw std::invalid_argument(
        "cuda_gesvdr: cusolverDnXgesvdr needs rank >= 1, oversample >= 0, niter >= 0 and "
        "rank + oversample < min(m, n); got rank = " + std::to_string(rank) +
        ", oversample = " + std::to_string(oversample) + ", niter = " + std::to_string(niter) +
        " for A " + dims(A));
  if (U.rows != m || U.cols != rank || Vt.rows != rank || Vt.cols != n)
    throw std::invalid_argument("cuda_gesvdr: needs U m x rank and Vt rank x n; got A " +
                                dims(A) + ", U " + dims(U) + ", Vt " + dims(Vt) +
                                ", rank = " + std::to_string(rank));
  if (b == 0) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const cudaDataType dt = Tr<T>::dt;
  DeviceGuard guard(device);
  Handles& h = bind(device, s);
  // gesvdr writes into scratch, never into the caller's rank-sized outputs: U (m x m) and V
  // (n x n), as NVIDIA's Xgesvdr sample allocates them (ldu * m, ldv * n; the sampled space
  // needs only rank + oversample columns, but nothing documents that less is enough), S
  // min(m, n) values. The leading rank of each are copied out, V (n x rank) transposed into Vt.
  Scratch us(m * m * sizeof(T), s), vs(n * n * sizeof(T), s), ss(mn * sizeof(T), s);
  Scratch info(b * sizeof(int), s);
  size_t dev_bytes = 0, host_bytes = 0;
  check(cusolverDnXgesvdr_bufferSize(h.solver, h.params, 'S', 'S', m, n, rank, oversample, niter,
                                     dt, A.p, ld(A), dt, ss.as<T>(), dt, us.as<T>(), m, dt,
                                     vs.as<T>(), n, dt, &dev_bytes, &host_bytes),
        "cusolverDnXgesvdr_bufferSize", Where{-1, b, m, n});
  Scratch work(dev_bytes, s);
  char* host = host_workspace(host_bytes);
  const T one = 1, zero = 0;
  for (int64_t k = 0; k < b; ++k) {
    const Where w{k, b, m, n};
    check(cusolverDnXgesvdr(h.solver, h.params, 'S', 'S', m, n, rank, oversample, niter, dt,
                            A.p + k * A.bs, ld(A), dt, ss.as<T>(), dt, us.as<T>(), m, dt,
                            vs.as<T>(), n, dt, work.as<void>(), dev_bytes, host,
                            host_bytes, info.as<int>() + k),
          "cusolverDnXgesvdr", w);
    check(cudaMemcpy2DAsync(U.p + k * U.bs, ld(U) * sizeof(T), us.as<T>(), m * sizeof(T),
                            m * sizeof(T), rank, cudaMemcpyDeviceToDevice, s),
          "cudaMemcpy2DAsync (U)", w);
    check(cudaMemcpyAsync(S + k * rank, ss.as<T>(), rank * sizeof(T), cudaMemcpyDeviceToDevice, s),
          "cudaMemcpyAsync (S)", w);
    T* vt = Vt.p + k * Vt.bs;
    check(Tr<T>::geam(h.blas, CUBLAS_OP_T, CUBLAS_OP_N, rank, n, &one, vs.as<T>(), n, &zero, vt,
                      ld(Vt), vt, ld(Vt)),
          "cublas?geam_64", w, Tr<T>::letter);
  }
  flag_failures<T>(b, info.as<int>(), S, rank, 1, rank, status, 1, s);
}

std::string cuda_info() {  // never throws on a machine without a GPU or a driver
  int v = 0;
  std::string out = "cuda runtime: " + (cudaRuntimeGetVersion(&v) == cudaSuccess
                                            ? version_text(v) : std::string("unknown"));
  v = 0;
  const bool driver = cudaDriverGetVersion(&v) == cudaSuccess && v > 0;
  out += "\ncuda driver: " + (driver ? version_text(v) : std::string("no driver"));
  out += "\ncublas: " + library_version(cublasGetProperty, CUBLAS_STATUS_SUCCESS);
  out += "\ncusolver: " + library_version(cusolverGetProperty, CUSOLVER_STATUS_SUCCESS);
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the error: it is reported here, not by a later call
    out += "\ncuda devices: none";
    if (e != cudaSuccess)
      out += std::string(" (cudaGetDeviceCount: ") + cudaGetErrorString(e) + ")";
    return out;
  }
  for (int i = 0; i < count; ++i) {
    out += "\ncuda device " + std::to_string(i) + ": ";
    cudaDeviceProp p;
    const cudaError_t pe = cudaGetDeviceProperties(&p, i);
    if (pe != cudaSuccess) {
      cudaGetLastError();
      out += std::string("unavailable (cudaGetDeviceProperties: ") + cudaGetErrorString(pe) + ")";
      continue;
    }
    char mem[32];
    std::snprintf(mem, sizeof mem, "%.1f GiB", p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    out += std::string(p.name) + ", compute capability " + std::to_string(p.major) + "." +
           std::to_string(p.minor) + ", " + mem;
  }
  return out;
}

template std::unique_ptr<Backend<float>> make_cuda_backend<float>(int, uintptr_t);
template std::unique_ptr<Backend<double>> make_cuda_backend<double>(int, uintptr_t);
template void cuda_gesvdr<float>(int, uintptr_t, int64_t, const Mat<float>&, int64_t, int64_t,
                                 int64_t, const Mat<float>&, float*, const Mat<float>&, int*);
template void cuda_gesvdr<double>(int, uintptr_t, int64_t, const Mat<double>&, int64_t, int64_t,
                                  int64_t, const Mat<double>&, double*, const Mat<double>&, int*);

}  // namespace pissa
