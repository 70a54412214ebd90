// CUDA backend (cuBLAS + cuSOLVER), built only when nvcc and the cuBLAS/cuSOLVER headers are
// found. Everything runs on the caller's stream; nothing here synchronizes the host.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "backend.h"

namespace pissa {

// A backend bound to CUDA device `device` and stream `stream` (a cudaStream_t as an integer;
// 0 = the legacy default stream). Handles are created once per device and reused.
template <typename T>
std::unique_ptr<Backend<T>> make_cuda_backend(int device, uintptr_t stream);

// cuSOLVER's own randomized SVD (cusolverDnXgesvdr), looped over the batch. A is column-major
// m x n per matrix and is destroyed. U m x rank, S rank, Vt rank x n per matrix (all
// non-transposed). Requires rank + oversample < min(m, n).
template <typename T>
void cuda_gesvdr(int device, uintptr_t stream, int64_t b, const Mat<T>& A, int64_t rank,
                 int64_t oversample, int64_t niter, const Mat<T>& U, T* S, const Mat<T>& Vt,
                 int* status);

// One line per fact: CUDA runtime/driver, cuBLAS and cuSOLVER versions, visible devices.
std::string cuda_info();

}  // namespace pissa
