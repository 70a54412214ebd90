// Python binding: tensors in and out through DLPack (torch, CuPy, JAX...), no libtorch.
// Compiled once per module: PISSA_WITH_CPU -> pissa_svd._native (BLAS/LAPACK from SciPy),
// PISSA_WITH_CUDA -> pissa_svd._native_cuda (cuBLAS/cuSOLVER on the caller's stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "dlpack.h"
#include "rsvd.h"
#ifdef PISSA_WITH_CPU
#include "cpu_backend.h"
#include "nf4.h"
#include "rows.h"
#endif
#ifdef PISSA_WITH_CUDA
#include "cuda_backend.h"
#endif

namespace py = pybind11;

namespace pissa {
namespace {

// A borrowed DLPack view of a Python tensor, released when it goes out of scope.
class View {
 public:
  View(const py::handle& obj, const char* arg, uintptr_t stream) : arg_(arg) {
    if (!py::hasattr(obj, "__dlpack__"))
      throw py::type_error(std::string(arg) + ": expected a tensor with __dlpack__, got " +
                           std::string(py::str(py::type::of(obj).attr("__name__"))));
    py::object cap = stream ? obj.attr("__dlpack__")(py::arg("stream") = stream)
                            : obj.attr("__dlpack__")();
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
    if (m == nullptr) throw py::error_already_set();
    PyCapsule_SetName(cap.ptr(), "used_dltensor");  // we own it now, per the protocol
    managed_ = m;
  }
  ~View() {
    if (managed_ && managed_->deleter) managed_->deleter(managed_);
  }
  View(const View&) = delete;
  View& operator=(const View&) = delete;

  const DLTensor& t() const { return managed_->dl_tensor; }
  int64_t dim(int i) const { return t().shape[i]; }
  bool is_cuda() const { return t().device.device_type == kDLCUDA; }
  int device_id() const { return t().device.device_id; }
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(static_cast<char*>(t().data) + t().byte_offset);
  }

  // Checks rank, dtype (fp32 or fp64, equal to `bits`), compact row-major strides and shape.
  void expect(std::vector<int64_t> shape, int bits) const {
    const DLTensor& d = t();
    if (d.ndim != static_cast<int>(shape.size()))
      throw py::value_error(std::string(arg_) + ": expected " + std::to_string(shape.size()) +
                            " dimensions, got " + std::to_string(d.ndim));
    if (d.dtype.code != kDLFloat || d.dtype.bits != bits || d.dtype.lanes != 1)
      throw py::value_error(std::string(arg_) + ": expected float" + std::to_string(bits) +
                            " (code 2, " + std::to_string(bits) + " bits), got code " +
                            std::to_string(d.dtype.code) + ", " + std::to_string(d.dtype.bits) +
                            " bits");
    int64_t expected_stride = 1;
    for (int i = d.ndim - 1; i >= 0; --i) {
      if (shape[i] >= 0 && d.shape[i] != shape[i])
        throw py::value_error(std::string(arg_) + ": dimension " + std::to_string(i) + " is " +
                              std::to_string(d.shape[i]) + ", expected " +
                              std::to_string(shape[i]));
      if (d.strides && d.shape[i] > 1 && d.strides[i] != expected_stride)
        throw py::value_error(std::string(arg_) + ": must be contiguous (row-major)");
      expected_stride *= d.shape[i];
    }
  }

 private:
  const char* arg_;
  DLManagedTensor* managed_ = nullptr;
};

// One status int per matrix in backend memory, read back once at the end, always released.
template <typename T>
class StatusBuffer {
 public:
  StatusBuffer(Backend<T>& be, int64_t b) : be_(be), b_(b), p_(be.alloc_status(b)) {}
  ~StatusBuffer() { be_.release_status(p_); }
  StatusBuffer(const StatusBuffer&) = delete;
  StatusBuffer& operator=(const StatusBuffer&) = delete;
  int* get() const { return p_; }
  std::vector<int> read() const {
    std::vector<int> host(static_cast<size_t>(b_));
    be_.read_status(p_, host.data(), b_);
    return host;
  }

 private:
  Backend<T>& be_;
  int64_t b_;
  int* p_;
};

Method parse_method(const std::string& m) {
  if (m == "halko") return Method::halko;
  if (m == "krylov") return Method::krylov;
  if (m == "krylov2") return Method::krylov2;
  if (m == "krylov3") return Method::krylov3;
  if (m == "exact") return Method::exact;
  throw py::value_error(
      "method: expected 'halko', 'krylov', 'krylov2', 'krylov3' or 'exact', got '" + m + "'");
}

template <typename T>
std::unique_ptr<Backend<T>> backend_for(const View& W, uintptr_t stream) {
  if (W.is_cuda()) {
#ifdef PISSA_WITH_CUDA
    return make_cuda_backend<T>(W.device_id(), stream);
#else
    throw py::value_error("W: a CUDA tensor was passed to pissa_svd._native (the CPU module)");
#endif
  }
  if (W.t().device.device_type != kDLCPU)
    throw py::value_error("W: only CPU and CUDA tensors are supported");
#ifdef PISSA_WITH_CPU
  (void)stream;
  return make_cpu_backend<T>();
#else
  throw py::value_error("W: a CPU tensor was passed to pissa_svd._native_cuda (the CUDA module)");
#endif
}

template <typename T>
std::vector<int> run(const View& W, const View& omega, const View& U, const View& S,
                     const View& Vh, int64_t rank, int niter, Method method, uintptr_t stream) {
  const int bits = sizeof(T) * 8;
  const int64_t b = W.dim(0), m = W.dim(1), n = W.dim(2);
  W.expect({b, m, n}, bits);
  if (rank < 1 || rank > std::min(m, n))
    throw py::value_error("rank: must be in [1, min(m, n) = " + std::to_string(std::min(m, n)) +
                          "], got " + std::to_string(rank));
  if (niter < 0) throw py::value_error("niter: must be >= 0, got " + std::to_string(niter));
  if (method != Method::exact) omega.expect({b, std::max(m, n), -1}, bits);
  U.expect({b, m, rank}, bits);
  S.expect({b, rank}, bits);
  Vh.expect({b, rank, n}, bits);
  for (const View* v : {&omega, &U, &S, &Vh})
    if (v->t().device.device_type != W.t().device.device_type || v->device_id() != W.device_id())
      throw py::value_error("all tensors must be on W's device");
  if (method != Method::exact && omega.dim(2) > std::min(m, n))
    throw py::value_error("omega: more columns than min(m, n)");
  if (method != Method::exact && krylov_depth(method, niter) * omega.dim(2) > std::min(m, n))
    throw py::value_error("krylov: depth * omega columns exceeds min(m, n); use exact");

  auto be = backend_for<T>(W, stream);  // may import SciPy: needs the GIL
  py::gil_scoped_release nogil;
  const int64_t k = std::max(m, n), l = method == Method::exact ? 0 : omega.dim(2);
  const Mat<T> w{W.data<T>(), m, n, n, true, m * n};
  const Mat<T> om{omega.data<T>(), k, l, l, true, k * l};  // unused by exact
  const Mat<T> u{U.data<T>(), m, rank, rank, true, m * rank};
  const Mat<T> vh{Vh.data<T>(), rank, n, n, true, rank * n};
  StatusBuffer<T> status(*be, b);
  rsvd<T>(*be, b, w, om, rank, niter, method, u, S.data<T>(), vh, status.get());
  return status.read();
}

std::vector<int> svd(const py::handle& W, const py::handle& omega, const py::handle& U,
                     const py::handle& S, const py::handle& Vh, int64_t rank, int niter,
                     const std::string& method, uintptr_t stream) {
  const View w(W, "W", stream), u(U, "U", stream), s(S, "S", stream), vh(Vh, "Vh", stream);
  const View om(omega, "omega", stream);
  if (w.t().ndim != 3) throw py::value_error("W: expected a (b, m, n) tensor");
  const Method meth = parse_method(method);
  if (w.t().dtype.bits == 64) return run<double>(w, om, u, s, vh, rank, niter, meth, stream);
  return run<float>(w, om, u, s, vh, rank, niter, meth, stream);
}

#ifdef PISSA_WITH_CPU
// A 2-D CPU tensor whose rows are contiguous, possibly padded (leading dimension ld >= cols).
struct RowsView {
  void* p;
  int64_t rows, cols, ld;
  DLDataType dtype;
};

RowsView rows_of(const View& v, const char* arg) {
  const DLTensor& d = v.t();
  if (d.device.device_type != kDLCPU)
    throw py::value_error(std::string(arg) + ": must be a CPU tensor");
  if (d.ndim != 2)
    throw py::value_error(std::string(arg) + ": expected 2 dimensions (rows, cols), got " +
                          std::to_string(d.ndim));
  const int64_t rows = d.shape[0], cols = d.shape[1];
  int64_t ld = cols;
  if (d.strides) {
    if (cols > 1 && d.strides[1] != 1)
      throw py::value_error(std::string(arg) + ": rows must be contiguous (column stride 1)");
    if (rows > 1) ld = d.strides[0];
    if (rows > 1 && ld < cols)
      throw py::value_error(std::string(arg) + ": row stride " + std::to_string(ld) +
                            " is shorter than a row (" + std::to_string(cols) + ")");
  }
  return {static_cast<char*>(d.data) + d.byte_offset, rows, cols, ld, d.dtype};
}

bool is(const DLDataType& t, uint8_t code, uint8_t bits) {
  return t.code == code && t.bits == bits && t.lanes == 1;
}

// dst = src converted (bf16 -> fp32, fp32 -> bf16 or fp32 -> fp32), returning the fp64 sum of
// squares of the fp32 side; the GIL is released while it runs.
double copy_rows(const py::handle& src, const py::handle& dst, int threads) {
  const View s(src, "src", 0), d(dst, "dst", 0);
  const RowsView a = rows_of(s, "src"), b = rows_of(d, "dst");
  if (a.rows != b.rows || a.cols != b.cols)
    throw py::value_error("dst: shape (" + std::to_string(b.rows) + ", " +
                          std::to_string(b.cols) + ") differs from src's (" +
                          std::to_string(a.rows) + ", " + std::to_string(a.cols) + ")");
  const bool bf16_in = is(a.dtype, kDLBfloat, 16), f32_in = is(a.dtype, kDLFloat, 32);
  const bool bf16_out = is(b.dtype, kDLBfloat, 16), f32_out = is(b.dtype, kDLFloat, 32);
  if (!(bf16_in && f32_out) && !(f32_in && (bf16_out || f32_out)))
    throw py::value_error("src, dst: supported dtypes are bf16 -> fp32, fp32 -> bf16 and "
                          "fp32 -> fp32");
  py::gil_scoped_release nogil;
  if (bf16_in)
    return convert_rows<Bf16ToF32>(static_cast<const uint16_t*>(a.p), a.ld,
                                   static_cast<float*>(b.p), b.ld, a.rows, a.cols, threads);
  if (bf16_out)
    return convert_rows<F32ToBf16>(static_cast<const float*>(a.p), a.ld,
                                   static_cast<uint16_t*>(b.p), b.ld, a.rows, a.cols, threads);
  return convert_rows<F32ToF32>(static_cast<const float*>(a.p), a.ld, static_cast<float*>(b.p),
                                b.ld, a.rows, a.cols, threads);
}
// out = deq(Q(x)) with NF4 (blocks of 64, absmax), both fp32 1-D contiguous CPU tensors of
// one length; code (16) and mid (15) are the NF4 codes and their midpoints. GIL released.
void nf4_fake_tensors(const py::handle& x, const py::handle& out,
                      const std::vector<float>& code, const std::vector<float>& mid,
                      int threads) {
  const View xv(x, "x", 0), ov(out, "out", 0);
  for (const View* v : {&xv, &ov}) {
    if (v->t().device.device_type != kDLCPU)
      throw py::value_error("x, out: must be CPU tensors");
  }
  xv.expect({-1}, 32);
  ov.expect({xv.dim(0)}, 32);
  if (code.size() != 16 || mid.size() != 15)
    throw py::value_error("code, mid: expected the 16 NF4 codes and their 15 midpoints");
  py::gil_scoped_release nogil;
  pissa::nf4_fake(xv.data<float>(), ov.data<float>(), xv.dim(0), code.data(), mid.data(),
                  threads);
}
#endif

#ifdef PISSA_WITH_CUDA
std::vector<int> gesvdr(const py::handle& W, const py::handle& U, const py::handle& S,
                        const py::handle& Vh, int64_t rank, int64_t oversample, int niter,
                        uintptr_t stream) {
  const View w(W, "W", stream), u(U, "U", stream), s(S, "S", stream), vh(Vh, "Vh", stream);
  if (w.t().ndim != 3 || !w.is_cuda()) throw py::value_error("W: expected a CUDA (b, m, n) tensor");
  const int64_t b = w.dim(0), m = w.dim(1), n = w.dim(2);
  auto go = [&](auto zero) -> std::vector<int> {
    using T = decltype(zero);
    const int bits = sizeof(T) * 8;
    w.expect({b, m, n}, bits);
    u.expect({b, m, rank}, bits);
    s.expect({b, rank}, bits);
    vh.expect({b, rank, n}, bits);
    if (rank < 1 || oversample < 0 || rank + oversample >= std::min(m, n))
      throw py::value_error("rank + oversample must be < min(m, n) = " +
                            std::to_string(std::min(m, n)) + " for gesvdr");
    auto be = make_cuda_backend<T>(w.device_id(), stream);
    py::gil_scoped_release nogil;
    Scratch<T> ws(*be);
    // Row-major W is column-major W^T (n x m): gesvdr(W^T) = Ua S Va^T gives W = Va S Ua^T,
    // and the column-major storage of row-major U (b, m, rank) is exactly U^T = Va^T, of
    // row-major Vh (b, rank, n) exactly Vh^T = Ua. gesvdr destroys its input: work on a copy.
    Mat<T> A = ws.mat(b, n, m);
    be->copy(b, Mat<T>{w.data<T>(), n, m, n, false, m * n}, A);
    StatusBuffer<T> status(*be, b);
    cuda_gesvdr<T>(w.device_id(), stream, b, A, rank, oversample, niter,
                   Mat<T>{vh.data<T>(), n, rank, n, false, n * rank}, s.data<T>(),
                   Mat<T>{u.data<T>(), rank, m, rank, false, rank * m}, status.get());
    return status.read();
  };
  if (w.t().dtype.bits == 64) return go(double{});
  return go(float{});
}
#endif

}  // namespace
}  // namespace pissa

PYBIND11_MODULE(PISSA_MODULE_NAME, m) {
  m.doc() = "pissa-svd native randomized SVD (see pissa_svd/native.py for the Python API)";
  m.def("svd", &pissa::svd, py::arg("W"), py::arg("omega"), py::arg("U"), py::arg("S"),
        py::arg("Vh"), py::arg("rank"), py::arg("niter"), py::arg("method"),
        py::arg("stream") = 0,
        "Top-rank SVD of W (b, m, n) into U (b, m, rank), S (b, rank), Vh (b, rank, n); omega is "
        "the (b, max(m, n), l) sketch. Returns one status int per matrix (0 = ok).");
#ifdef PISSA_WITH_CPU
  m.def("copy_rows", &pissa::copy_rows, py::arg("src"), py::arg("dst"), py::arg("threads") = 1,
        "dst (rows, cols) = src converted (bf16 -> fp32, fp32 -> bf16, fp32 -> fp32), rows "
        "contiguous, possibly padded; returns the fp64 sum of squares of the fp32 side.");
  m.def("nf4_fake", &pissa::nf4_fake_tensors, py::arg("x"), py::arg("out"), py::arg("code"),
        py::arg("mid"), py::arg("threads") = 1,
        "out = NF4 deq(Q(x)) for 1-D fp32 CPU tensors (blocks of 64, absmax), as bitsandbytes.");
#endif
#ifdef PISSA_WITH_CUDA
  m.def("gesvdr", &pissa::gesvdr, py::arg("W"), py::arg("U"), py::arg("S"), py::arg("Vh"),
        py::arg("rank"), py::arg("oversample"), py::arg("niter"), py::arg("stream") = 0,
        "cusolverDnXgesvdr over a batch; returns one status int per matrix (0 = ok).");
  m.def("info", &pissa::cuda_info);
  m.attr("backend") = "cuda";
#else
  m.attr("backend") = "cpu";
#endif
}
