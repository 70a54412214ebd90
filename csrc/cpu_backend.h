// CPU backend: BLAS/LAPACK taken at run time from SciPy's exported Fortran symbols
// (scipy.linalg.cython_blas / cython_lapack capsules), so nothing is linked at build time.
#pragma once
#include <memory>

#include "backend.h"

namespace pissa {

// Imports SciPy's BLAS/LAPACK on first use (needs the GIL); throws std::runtime_error naming
// what is missing.
template <typename T>
std::unique_ptr<Backend<T>> make_cpu_backend();

}  // namespace pissa
