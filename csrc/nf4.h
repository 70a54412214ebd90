// NF4 fake quantization, deq(Q(x)), for fp32 CPU data in one pass (QPiSSA's inner loop).
//
// Blocks of 64 consecutive values share one absmax. Each value is scaled into [-1, 1], given
// the index of the nearest of the 16 NF4 codes (the number of the 15 midpoints strictly below
// it: ties go down), and replaced by code * absmax. torch spends a trip through memory on each
// of those steps; here a block is read once and written once.
//
// Bits: the same fp32 operations as pissa_svd/quant.py's torch path (NaN and inf included),
// which matches bitsandbytes: full blocks multiply by the fp32 reciprocal of absmax (floored
// at 1e-38), the short tail block divides by it and also dequantizes with the floored value.
// No operation here can be contracted into an FMA, so the compiler cannot change a bit.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "rows.h"

namespace pissa {

constexpr int64_t kNf4Block = 64;
constexpr float kAbsmaxFloor = 1e-38f;

// One block. The code index is the number of the 15 sorted midpoints strictly below the
// scaled value (torch.bucketize, right=False), counted without a branch: a binary search
// mispredicts on random data, 15 compares vectorize.
PISSA_CLONES static void nf4_fake_block(const float* x, float* out, int64_t len, bool tail,
                                        const float* code_in, const float* mid_in) {
  float code[16], mid[15];
  std::copy(code_in, code_in + 16, code);
  std::copy(mid_in, mid_in + 15, mid);
  // NaN propagates as in torch: a NaN absmax makes the whole block NaN, a NaN value goes to
  // the top code (15), and an infinite absmax gives 0 * inf = NaN for the finite values.
  // |x| as bits orders like |x| itself, NaN above inf: one integer max finds both.
  uint32_t top = 0;
  for (int64_t k = 0; k < len; ++k) {
    uint32_t u;
    std::memcpy(&u, x + k, sizeof u);
    top = std::max(top, u & 0x7fffffffu);
  }
  float amax;
  std::memcpy(&amax, &top, sizeof amax);
  if (top > 0x7f800000u) amax = std::numeric_limits<float>::quiet_NaN();
  const float denom = std::max(amax, kAbsmaxFloor);  // NaN stays NaN
  const float inv = 1.0f / denom;
  const float scale = tail ? denom : amax;  // what the codes are multiplied back by
  for (int64_t k = 0; k < len; ++k) {
    float s = tail ? x[k] / denom : x[k] * inv;
    s = std::min(std::max(s, -1.0f), 1.0f);
    s = s == s ? s : 1.0f;  // NaN goes to the top code, as in torch.bucketize
    int idx = 0;
    for (int j = 0; j < 15; ++j) idx += mid[j] < s;
    out[k] = code[idx] * scale;
  }
}

// out[0:n] = deq(Q(x[0:n])) on up to `threads` threads (contiguous ranges of whole blocks).
inline void nf4_fake(const float* x, float* out, int64_t n, const float* code, const float* mid,
                     int threads) {
  const int64_t blocks = n / kNf4Block, full = blocks * kNf4Block;
  const int64_t grain = host_openmp() ? (1 << 16) : (1 << 20);  // values per thread at least
  const int parts = static_cast<int>(
      std::min<int64_t>({std::max(threads, 1), std::max<int64_t>(blocks, 1),
                         std::max<int64_t>(1, n / grain)}));
  run_parallel(parts, [&](int part, int count) {
    const int64_t begin = blocks * part / count, end = blocks * (part + 1) / count;
    for (int64_t b = begin; b < end; ++b)
      nf4_fake_block(x + b * kNf4Block, out + b * kNf4Block, kNf4Block, false, code, mid);
  });
  if (full < n) nf4_fake_block(x + full, out + full, n - full, true, code, mid);
}

}  // namespace pissa
