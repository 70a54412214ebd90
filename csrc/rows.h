// Row-by-row dtype conversion fused with the sum of squares of the fp32 side (CPU).
//
// decompose widens every bf16 weight to fp32 for the SVD and rounds every fp32 residual back to
// bf16, and reports both matrices' norms. In torch that is a copy plus a norm: two trips through
// memory. Here each element is converted and squared in the same pass.
//
// Bits: bf16 -> fp32 is exact (the 16 bits become the high half); fp32 -> bf16 rounds to
// nearest, ties to even, as torch does (NaN becomes the quiet NaN 0x7FC0). The sum of squares
// is accumulated in fp64, per row in 8 fixed lanes, then over the rows in order: the same value
// whatever the number of threads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <dlfcn.h>
#include <system_error>
#include <thread>
#include <vector>

namespace pissa {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

// One conversion: the value stored, and the fp32 value whose square is summed.
struct Bf16ToF32 {
  using Src = uint16_t;
  using Dst = float;
  static void put(Src s, Dst* d, float* v) { *v = *d = bf16_to_f32(s); }
};
struct F32ToBf16 {
  using Src = float;
  using Dst = uint16_t;
  static void put(Src s, Dst* d, float* v) {
    *d = f32_to_bf16(s);
    *v = s;
  }
};
struct F32ToF32 {
  using Src = float;
  using Dst = float;
  static void put(Src s, Dst* d, float* v) { *v = *d = s; }
};

// The AVX2 clone narrows fp32 to bf16 and widens to fp64 8 lanes at a time; the baseline x86-64
// build (SSE2) has no instructions for that narrowing.
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define PISSA_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef PISSA_CLONES
#define PISSA_CLONES
#endif

template <typename C>
PISSA_CLONES double convert_row(const typename C::Src* s, typename C::Dst* d, int64_t cols) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= cols; c += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      float v;
      C::put(s[c + k], d + c + k, &v);
      acc[k] += static_cast<double>(v) * v;
    }
  }
  for (; c < cols; ++c) {
    float v;
    C::put(s[c], d + c, &v);
    acc[0] += static_cast<double>(v) * v;
  }
  double sum = 0;
  for (double a : acc) sum += a;
  return sum;
}

// The host process's OpenMP runtime, when its symbols are global (torch loads its libgomp that
// way). Running on its thread pool matters on a small machine: after a parallel torch op its
// workers keep spinning for a while, and a thread of our own would share a core with one of
// them (measured on 2 cores: a 2-thread loop right after a GEMM ran no faster than 1 thread).
struct HostOpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel
  int (*thread_num)() = nullptr;                                            // omp_get_thread_num
  int (*num_threads)() = nullptr;                                           // omp_get_num_threads
};

inline const HostOpenMP* host_openmp() {
  static const HostOpenMP found = [] {
    HostOpenMP h;
    h.parallel = reinterpret_cast<decltype(h.parallel)>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    h.thread_num =
        reinterpret_cast<decltype(h.thread_num)>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
    h.num_threads =
        reinterpret_cast<decltype(h.num_threads)>(dlsym(RTLD_DEFAULT, "omp_get_num_threads"));
    return h;
  }();
  return found.parallel && found.thread_num && found.num_threads ? &found : nullptr;
}

// Runs body(part, parts) for part = 0 .. parts-1 on up to `threads` threads: the host's OpenMP
// pool if there is one, else threads of our own.
template <typename F>
void run_parallel(int threads, F&& body) {
  if (threads <= 1) return body(0, 1);
  if (const HostOpenMP* omp = host_openmp()) {
    struct Ctx {
      F* body;
      const HostOpenMP* omp;
    } ctx{&body, omp};
    omp->parallel(
        [](void* p) {
          auto* c = static_cast<Ctx*>(p);
          (*c->body)(c->omp->thread_num(), c->omp->num_threads());
        },
        &ctx, static_cast<unsigned>(threads), 0);
    return;
  }
  std::vector<std::thread> pool;
  for (int part = 1; part < threads; ++part) {
    try {
      pool.emplace_back([&body, part, threads] { body(part, threads); });
    } catch (const std::system_error&) {  // no thread to be had: do that part here
      body(part, threads);
    }
  }
  body(0, threads);
  for (auto& t : pool) t.join();
}

// dst[r, :] = convert(src[r, :]) for every row (leading dimensions src_ld, dst_ld, in elements)
// on up to `threads` threads (contiguous row ranges); returns the sum of squares of the fp32 side.
template <typename C>
double convert_rows(const typename C::Src* src, int64_t src_ld, typename C::Dst* dst,
                    int64_t dst_ld, int64_t rows, int64_t cols, int threads) {
  if (rows <= 0 || cols <= 0) return 0.0;
  std::vector<double> row_sums(static_cast<size_t>(rows));
  // Elements per thread at least: waking a pool thread costs microseconds, starting one of our
  // own ~0.1 ms (1M elements take ~0.4 ms).
  const int64_t grain = host_openmp() ? (1 << 16) : (1 << 20);
  const int64_t useful = std::max<int64_t>(1, rows * cols / grain);
  const int n = static_cast<int>(std::min<int64_t>({std::max(threads, 1), rows, useful}));
  run_parallel(n, [&](int part, int parts) {
    const int64_t begin = rows * part / parts, end = rows * (part + 1) / parts;
    for (int64_t r = begin; r < end; ++r)
      row_sums[r] = convert_row<C>(src + r * src_ld, dst + r * dst_ld, cols);
  });
  double total = 0;
  for (double s : row_sums) total += s;
  return total;
}

}  // namespace pissa
