// Counter-based Philox4x32-10 and the normal / Rademacher transforms used by every memtrain backend.
//
// The single C++ source of truth for the noise stream z(seed, stream, i); it compiles for the host
// (csrc/zo_cpu.cpp) and for CUDA device code. kernels/philox.py holds the Triton twin and the torch
// twin of exactly this definition, and memtrain/testing.py an independent NumPy reference.
//
// Stream definition (shared by all backends):
//   key     = (seed & 0xffffffff, seed >> 32)                       seed: 64-bit
//   counter = (n & 0xffffffff, n >> 32, stream & 0xffffffff, stream >> 32), n = i / 4
//   r[0..3] = Philox4x32-10(counter, key)                           element i takes lane i % 4
//   normal:     u(x) = (x >> 9) * 2^-23 + 2^-24  (exact in fp32, in (0, 1))
//               (z0, z1) = sqrt(-2 ln u(r0)) * (cos 2πu(r1), sin 2πu(r1)); (z2, z3) likewise from (r2, r3)
//               ln and (cos, sin)(2π·) are evaluated by the branch-free fp32 routines below, which every
//               backend repeats operation for operation, so backends agree to a few ulp; |z| <= 5.77.
//   rademacher: z_j = +1 if the top bit of r_j is set, else -1
// Philox4x32-10: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11); the
// known-answer vectors of Random123 are checked in tests/kernels/test_philox.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEMTRAIN_HD __host__ __device__ __forceinline__
#else
#define MEMTRAIN_HD inline
#endif

namespace memtrain {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;

enum Distribution : int { kNormal = 0, kRademacher = 1 };

// In place: c[0..3] <- Philox4x32-10(c, (k0, k1)).
MEMTRAIN_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

MEMTRAIN_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MEMTRAIN_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// A uniform float in (0, 1), never 0 (so the logarithm is finite) and never 1.
MEMTRAIN_HD float unit_open(uint32_t x) {
  return static_cast<float>(x >> 9) * 1.1920928955078125e-07f + 5.9604644775390625e-08f;
}

// ln(x) for normal x > 0, branch-free so that it vectorises, within a few ulp of the true value.
// x = 2^k m with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.1716, whose odd series
// is cut after s^9 (the next term is below 2e-9 relative). ln 2 is split so that k ln2_hi is exact.
MEMTRAIN_HD float log_positive(float x) {
  const uint32_t shifted = float_bits(x) + (0x3f800000u - 0x3f3504f3u);
  const float k = static_cast<float>(static_cast<int32_t>(shifted >> 23) - 127);
  const float f = bits_float((shifted & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  const float tail = s2 * (0.666666666666666667f + s2 * (0.4f + s2 * (0.285714285714285714f + s2 * 0.222222222222222222f)));
  return k * 0.693145751953125f + (2.0f * s + (s * tail + k * 1.428606765330187e-06f));
}

// (cos 2πu, sin 2πu) for u in [0, 1], branch-free. The quadrant is taken off u exactly (u - q/4 is exact in
// fp32), leaving |a| <= π/4 where Taylor series to a^9 / a^10 are accurate below 2e-9.
MEMTRAIN_HD void sincos_2pi(float u, float& c, float& s) {
  const float q = floorf(4.0f * u + 0.5f);
  const float a = (u - 0.25f * q) * 6.28318530717958647692f;
  const float a2 = a * a;
  const float sa = a * (1.0f + a2 * (-1.66666666666666667e-01f +
                                     a2 * (8.33333333333333333e-03f +
                                           a2 * (-1.98412698412698413e-04f + a2 * 2.75573192239858907e-06f))));
  const float ca =
      1.0f + a2 * (-0.5f + a2 * (4.16666666666666667e-02f +
                                 a2 * (-1.38888888888888889e-03f +
                                       a2 * (2.48015873015873016e-05f + a2 * -2.75573192239858907e-07f))));
  const int quadrant = static_cast<int>(q) & 3;
  c = quadrant == 0 ? ca : quadrant == 1 ? -sa : quadrant == 2 ? -ca : sa;
  s = quadrant == 0 ? sa : quadrant == 1 ? ca : quadrant == 2 ? -sa : -ca;
}

// Box-Muller: two uniform words -> two independent standard normals (fp32 arithmetic).
MEMTRAIN_HD void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float radius = sqrtf(-2.0f * log_positive(unit_open(a)));
  float c, s;
  sincos_2pi(unit_open(b), c, s);
  z0 = radius * c;
  z1 = radius * s;
}

MEMTRAIN_HD float rademacher(uint32_t x) { return (x >> 31) ? 1.0f : -1.0f; }

// The four values z(seed, stream, 4n .. 4n+3).
MEMTRAIN_HD void noise4(uint64_t seed, uint64_t stream, uint64_t n, int dist, float& z0, float& z1, float& z2,
                        float& z3) {
  uint32_t c0 = static_cast<uint32_t>(n), c1 = static_cast<uint32_t>(n >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  if (dist == kRademacher) {
    z0 = rademacher(c0);
    z1 = rademacher(c1);
    z2 = rademacher(c2);
    z3 = rademacher(c3);
  } else {
    box_muller(c0, c1, z0, z1);
    box_muller(c2, c3, z2, z3);
  }
}

}  // namespace philox
}  // namespace memtrain
