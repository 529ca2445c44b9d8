// CPU kernels for zeroth-order training: the fused in-place update p <- p + sum_j a_j z(seed_j) + c p and the
// fill out <- z(seed), both in one pass over memory, with z regenerated from Philox (csrc/philox.h), never stored.
//
// Layout of the work: the parameter's elements [offset, offset + numel) of its stream are cut into blocks of
// kBlock Philox counters (4 * kBlock elements). Each block's noise is generated into a stack buffer in three
// vectorised sweeps (Philox words, transform, interleave into element order), the terms are accumulated there,
// and the block of p is read and written once. Blocks are spread over threads by at::parallel_for, so
// torch.set_num_threads() governs this kernel too, unless a call bounds its own threads (num_threads > 0:
// AMP's host pass runs beside the thread that launches the GPU work and leaves it a core). The split does not
// change a single bit: each element's value depends only on its index. Arithmetic is fp32 for fp32/bf16/fp16 parameters (fp64
// parameters are updated in fp64 with fp32 noise).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "philox.h"

namespace {

using memtrain::philox::box_muller;
using memtrain::philox::kRademacher;
using memtrain::philox::philox4x32_10;

// 64 counters = 256 elements per block: the buffers (5 KiB) stay in L1 and the sweeps are long enough for
// 16-lane vectors. Measured on a 2-core AVX-512 Xeon: 32 -> 64 gained ~8%, 128 gained nothing more.
constexpr int64_t kBlock = 64;
// Blocks per parallel task: 64 blocks = 16 Ki elements, well above the thread hand-off cost.
constexpr int64_t kGrainBlocks = 64;
// Blocks of p to prefetch ahead of the one being updated.
constexpr int64_t kPrefetchBlocks = 2;

// Threads that ran the calling thread's last pass (last_pass_threads(): the test that the bound is honoured).
thread_local int64_t last_threads = 0;

// body(b0, b1) over the blocks [0, nblocks), in chunks of at least kGrainBlocks blocks: on torch's intra-op
// threads when num_threads <= 0, else on at most num_threads threads (an OpenMP team of exactly that size, so
// no other thread is woken; torch's thread settings are not touched). Records the threads that ran a chunk.
template <typename F>
void parallel_blocks(int64_t nblocks, int64_t num_threads, const F& body) {
  if (nblocks <= 0) {
    last_threads = 0;
    return;
  }
  std::atomic<int64_t> ran{0};
  auto counted = [&](int64_t b0, int64_t b1) {
    ran.fetch_add(1, std::memory_order_relaxed);
    body(b0, b1);
  };
  const int64_t tasks = std::min<int64_t>(num_threads, (nblocks + kGrainBlocks - 1) / kGrainBlocks);
  if (num_threads <= 0) {
    at::parallel_for(0, nblocks, kGrainBlocks, counted);
  } else if (tasks <= 1) {
    counted(0, nblocks);
  } else {
    const int64_t chunk = (nblocks + tasks - 1) / tasks;
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(tasks))
    {
      const int64_t b0 = omp_get_thread_num() * chunk;
      if (b0 < nblocks) {
        counted(b0, std::min(nblocks, b0 + chunk));
      }
    }
#else
    at::parallel_for(0, nblocks, chunk, counted);  // at most `tasks` chunks of `chunk` blocks
#endif
  }
  last_threads = ran.load();
}

struct Term {
  uint64_t seed;
  float coef;
};

// Philox words of counters n0 .. n0 + kBlock - 1 of (seed, stream), lane j of counter n0 + k into w_j[k].
//
// GCC vectorises the portable loop with vpmullq (a 64x64-bit multiply, 3 uops) for the 32x32->64-bit products;
// the intrinsic paths use vpmuludq on even and odd lanes instead. Measured on a 2-core AVX-512 Xeon, 125 M
// elements: 109 ms (portable loop, 512-bit) -> see bench/RESULTS.md for the intrinsic path's figure.
#if defined(__AVX512F__)
inline __m512i mulhilo_avx512(__m512i a, __m512i m, __m512i& hi) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  return _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
#endif

void philox_words(uint64_t seed, uint64_t stream, uint64_t n0, uint32_t* __restrict w0, uint32_t* __restrict w1,
                  uint32_t* __restrict w2, uint32_t* __restrict w3) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t s0 = static_cast<uint32_t>(stream), s1 = static_cast<uint32_t>(stream >> 32);
  // Counters in 32-bit lanes: the high word only changes where the low word wraps.
  const uint32_t n0_lo = static_cast<uint32_t>(n0), n0_hi = static_cast<uint32_t>(n0 >> 32);
#if defined(__AVX512F__)
  static_assert(kBlock % 16 == 0, "kBlock must be a multiple of 16");
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i mul0 = _mm512_set1_epi32(static_cast<int>(memtrain::philox::kMul0));
  const __m512i mul1 = _mm512_set1_epi32(static_cast<int>(memtrain::philox::kMul1));
  for (int64_t k = 0; k < kBlock; k += 16) {
    const __m512i lo_base = _mm512_set1_epi32(static_cast<int>(n0_lo));
    __m512i c0 = _mm512_add_epi32(lo_base, _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(k))));
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(n0_hi));
    c1 = _mm512_mask_add_epi32(c1, _mm512_cmplt_epu32_mask(c0, lo_base), c1, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(s0)), c3 = _mm512_set1_epi32(static_cast<int>(s1));
    uint32_t key0 = k0, key1 = k1;
    for (int r = 0; r < memtrain::philox::kRounds; ++r) {
      __m512i hi0, hi1;
      const __m512i lo0 = mulhilo_avx512(c0, mul0, hi0);
      const __m512i lo1 = mulhilo_avx512(c2, mul1, hi1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(key0)), 0x96);
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(key1)), 0x96);
      c1 = lo1;
      c3 = lo0;
      key0 += memtrain::philox::kWeyl0;
      key1 += memtrain::philox::kWeyl1;
    }
    _mm512_store_si512(reinterpret_cast<__m512i*>(w0 + k), c0);
    _mm512_store_si512(reinterpret_cast<__m512i*>(w1 + k), c1);
    _mm512_store_si512(reinterpret_cast<__m512i*>(w2 + k), c2);
    _mm512_store_si512(reinterpret_cast<__m512i*>(w3 + k), c3);
  }
#else
#pragma omp simd
  for (int64_t k = 0; k < kBlock; ++k) {
    uint32_t c0 = n0_lo + static_cast<uint32_t>(k);
    uint32_t c1 = n0_hi + (c0 < n0_lo ? 1u : 0u), c2 = s0, c3 = s1;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    w0[k] = c0;
    w1[k] = c1;
    w2[k] = c2;
    w3[k] = c3;
  }
#endif
}

// acc[4k + j] (+)= coef * z_j(seed, stream, n0 + k) for k in [0, kBlock); `first` overwrites instead of adding.
void accumulate_noise(uint64_t seed, uint64_t stream, uint64_t n0, float coef, int dist, bool first,
                      float* __restrict acc) {
  alignas(64) uint32_t w0[kBlock], w1[kBlock], w2[kBlock], w3[kBlock];
  philox_words(seed, stream, n0, w0, w1, w2, w3);
  alignas(64) float z0[kBlock], z1[kBlock], z2[kBlock], z3[kBlock];
  if (dist == kRademacher) {
#pragma omp simd
    for (int64_t k = 0; k < kBlock; ++k) {
      z0[k] = (w0[k] >> 31) ? coef : -coef;
      z1[k] = (w1[k] >> 31) ? coef : -coef;
      z2[k] = (w2[k] >> 31) ? coef : -coef;
      z3[k] = (w3[k] >> 31) ? coef : -coef;
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < kBlock; ++k) {
      float a, b, c, d;
      box_muller(w0[k], w1[k], a, b);
      box_muller(w2[k], w3[k], c, d);
      z0[k] = coef * a;
      z1[k] = coef * b;
      z2[k] = coef * c;
      z3[k] = coef * d;
    }
  }
  if (first) {
#pragma omp simd
    for (int64_t k = 0; k < kBlock; ++k) {
      acc[4 * k] = z0[k];
      acc[4 * k + 1] = z1[k];
      acc[4 * k + 2] = z2[k];
      acc[4 * k + 3] = z3[k];
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < kBlock; ++k) {
      acc[4 * k] += z0[k];
      acc[4 * k + 1] += z1[k];
      acc[4 * k + 2] += z2[k];
      acc[4 * k + 3] += z3[k];
    }
  }
}

// Loads and stores in fp32 (fp64 for double). bf16 conversions are written as bit operations so they vectorise;
// the store rounds to nearest even and keeps NaN a NaN, as c10::BFloat16 does.
inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load(const c10::BFloat16* p, int64_t i) {
  uint16_t bits;
  std::memcpy(&bits, p + i, 2);
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }
inline void store(c10::BFloat16* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  u = nan ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  const uint16_t bits = static_cast<uint16_t>(u >> 16);
  std::memcpy(p + i, &bits, 2);
}

// p[l] <- p[l] + (acc + c p[l]) over the fused terms, or out[l] <- z when `fill` (p is not read). With `cast`
// (AMP's host pass) the new value is also stored, rounded to nearest even, into cast[l] in the same sweep: the
// master update and its low-precision wire copy in one read and two writes.
template <typename scalar_t, typename cast_t = scalar_t>
void fused_pass(scalar_t* p, int64_t numel, int64_t offset, uint64_t stream, const std::vector<Term>& terms,
                double c, int dist, bool fill, int64_t num_threads, cast_t* cast = nullptr) {
  if (numel == 0) {
    last_threads = 0;
    return;
  }
  const int64_t first_counter = offset / 4;
  const int64_t end_counter = (offset + numel + 3) / 4;
  const int64_t nblocks = (end_counter - first_counter + kBlock - 1) / kBlock;
  using acc_t = decltype(load(p, 0));
  const acc_t cc = static_cast<acc_t>(c);
  parallel_blocks(nblocks, num_threads, [&](int64_t b0, int64_t b1) {
    alignas(64) float acc[4 * kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = first_counter + b * kBlock;
      if (!fill && b + kPrefetchBlocks < b1) {
        // Ask for the block processed kPrefetchBlocks from now while this one computes its noise: the
        // noise is pure arithmetic, so the loads overlap it instead of adding to it.
        const int64_t ahead = std::max<int64_t>(4 * (n0 + kPrefetchBlocks * kBlock) - offset, 0);
        const char* line = reinterpret_cast<const char*>(p + ahead);
        for (int64_t byte = 0; byte < 4 * kBlock * static_cast<int64_t>(sizeof(scalar_t)); byte += 64) {
          __builtin_prefetch(line + byte, 1, 3);
        }
      }
      if (terms.empty()) {
        std::fill(acc, acc + 4 * kBlock, 0.0f);
      }
      for (size_t t = 0; t < terms.size(); ++t) {
        accumulate_noise(terms[t].seed, stream, static_cast<uint64_t>(n0), terms[t].coef, dist, t == 0, acc);
      }
      const int64_t lo = std::max(4 * n0, offset);
      const int64_t hi = std::min(4 * n0 + 4 * kBlock, offset + numel);
      scalar_t* q = p + (lo - offset);
      const float* a = acc + (lo - 4 * n0);
      const int64_t len = hi - lo;
      if (fill) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          store(q, i, static_cast<acc_t>(a[i]));
        }
      } else if (cast != nullptr) {
        cast_t* w = cast + (lo - offset);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const acc_t v = load(q, i);
          const acc_t next = v + (static_cast<acc_t>(a[i]) + cc * v);
          store(q, i, next);
          store(w, i, next);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const acc_t v = load(q, i);
          store(q, i, v + (static_cast<acc_t>(a[i]) + cc * v));
        }
      }
    }
  });
}

void check_target(const at::Tensor& p, const char* op) {
  TORCH_CHECK(p.device().is_cpu(), op, ": expected a CPU tensor, got one on ", p.device(),
              "; CUDA tensors go through the Triton kernel (memtrain.kernels.zo_perturb)");
  TORCH_CHECK(p.is_contiguous(), op, ": expected a contiguous tensor, got strides ", p.strides(),
              "; call .contiguous() on a copy, or update the parameter it views");
  const auto st = p.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": expected float32, float64, bfloat16 or float16, got ", st);
}

int check_dist(int64_t dist, const char* op) {
  TORCH_CHECK(dist == memtrain::philox::kNormal || dist == kRademacher, op,
              ": dist must be 0 (normal) or 1 (rademacher), got ", dist);
  return static_cast<int>(dist);
}

template <typename F>
void dispatch(const at::Tensor& p, F&& f) {
  switch (p.scalar_type()) {
    case at::kFloat:
      f(p.data_ptr<float>());
      break;
    case at::kDouble:
      f(p.data_ptr<double>());
      break;
    case at::kBFloat16:
      f(p.data_ptr<c10::BFloat16>());
      break;
    default:
      f(p.data_ptr<c10::Half>());
      break;
  }
}

// The (seed, coefficient) terms of a fused pass, after checking one coefficient per seed and offset >= 0.
std::vector<Term> checked_terms(const std::vector<int64_t>& seeds, const std::vector<double>& coefs, int64_t offset,
                                const char* op) {
  TORCH_CHECK(seeds.size() == coefs.size(), op, ": got ", seeds.size(), " seeds but ", coefs.size(),
              " coefficients; pass one coefficient per seed");
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  std::vector<Term> terms;
  for (size_t j = 0; j < seeds.size(); ++j) {
    terms.push_back({static_cast<uint64_t>(seeds[j]), static_cast<float>(coefs[j])});
  }
  return terms;
}

int64_t check_threads(int64_t num_threads, const char* op) {
  TORCH_CHECK(num_threads >= 0, op, ": num_threads must be >= 0 (0: torch's intra-op thread count), got ", num_threads);
  return num_threads;
}

at::Tensor zo_axpbz_(at::Tensor p, const std::vector<int64_t>& seeds, const std::vector<double>& coefs, int64_t stream,
                     double c, int64_t dist, int64_t offset, int64_t num_threads) {
  check_target(p, "zo_axpbz_");
  const std::vector<Term> terms = checked_terms(seeds, coefs, offset, "zo_axpbz_");
  const int d = check_dist(dist, "zo_axpbz_");
  const int64_t t = check_threads(num_threads, "zo_axpbz_");
  const int64_t n = p.numel();
  dispatch(p, [&](auto* ptr) { fused_pass(ptr, n, offset, static_cast<uint64_t>(stream), terms, c, d, false, t); });
  return p;
}

at::Tensor zo_axpbz_cast_(at::Tensor p, at::Tensor out, const std::vector<int64_t>& seeds,
                          const std::vector<double>& coefs, int64_t stream, double c, int64_t dist, int64_t offset,
                          int64_t num_threads) {
  check_target(p, "zo_axpbz_cast_");
  TORCH_CHECK(p.scalar_type() == at::kFloat, "zo_axpbz_cast_: the master must be float32, got ", p.scalar_type());
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "zo_axpbz_cast_: out must be a contiguous CPU tensor");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf,
              "zo_axpbz_cast_: out must be bfloat16 or float16, got ", out.scalar_type());
  TORCH_CHECK(out.numel() == p.numel(), "zo_axpbz_cast_: out has ", out.numel(), " elements but p has ", p.numel());
  const std::vector<Term> terms = checked_terms(seeds, coefs, offset, "zo_axpbz_cast_");
  const int d = check_dist(dist, "zo_axpbz_cast_");
  const int64_t t = check_threads(num_threads, "zo_axpbz_cast_");
  const int64_t n = p.numel();
  float* ptr = p.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(stream);
  if (out.scalar_type() == at::kBFloat16) {
    fused_pass(ptr, n, offset, s, terms, c, d, false, t, out.data_ptr<c10::BFloat16>());
  } else {
    fused_pass(ptr, n, offset, s, terms, c, d, false, t, out.data_ptr<c10::Half>());
  }
  return p;
}

template <typename cast_t>
void cast_pass(const float* src, cast_t* out, int64_t n, int64_t num_threads) {
  constexpr int64_t kChunk = 4 * kBlock;  // elements per block, as in fused_pass
  parallel_blocks((n + kChunk - 1) / kChunk, num_threads, [&](int64_t b0, int64_t b1) {
    const int64_t hi = std::min(n, b1 * kChunk);
#pragma omp simd
    for (int64_t i = b0 * kChunk; i < hi; ++i) {
      store(out, i, src[i]);
    }
  });
}

// out <- src rounded to nearest even (AMP's host pass for a tensor without a pending update), bit for bit
// torch's .to(bfloat16/float16), with the threads bounded as in zo_axpbz_cast_.
at::Tensor cast_(at::Tensor src, at::Tensor out, int64_t num_threads) {
  TORCH_CHECK(src.device().is_cpu() && src.is_contiguous() && src.scalar_type() == at::kFloat,
              "cast_: src must be a contiguous float32 CPU tensor, got ", src.scalar_type(), " on ", src.device());
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "cast_: out must be a contiguous CPU tensor");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf,
              "cast_: out must be bfloat16 or float16, got ", out.scalar_type());
  TORCH_CHECK(out.numel() == src.numel(), "cast_: out has ", out.numel(), " elements but src has ", src.numel());
  const int64_t t = check_threads(num_threads, "cast_");
  if (out.scalar_type() == at::kBFloat16) {
    cast_pass(src.data_ptr<float>(), out.data_ptr<c10::BFloat16>(), src.numel(), t);
  } else {
    cast_pass(src.data_ptr<float>(), out.data_ptr<c10::Half>(), src.numel(), t);
  }
  return out;
}

at::Tensor philox_fill_(at::Tensor out, int64_t seed, int64_t stream, int64_t dist, int64_t offset,
                       int64_t num_threads) {
  check_target(out, "philox_fill_");
  TORCH_CHECK(offset >= 0, "philox_fill_: offset must be >= 0, got ", offset);
  const int d = check_dist(dist, "philox_fill_");
  const int64_t t = check_threads(num_threads, "philox_fill_");
  const std::vector<Term> terms{{static_cast<uint64_t>(seed), 1.0f}};
  const int64_t n = out.numel();
  dispatch(out, [&](auto* ptr) { fused_pass(ptr, n, offset, static_cast<uint64_t>(stream), terms, 0.0, d, true, t); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memtrain CPU kernels: Philox noise and fused zeroth-order updates";
  m.def("zo_axpbz_", &zo_axpbz_, "p <- p + sum_j coefs[j] * z(seeds[j], stream, offset + i) + c * p, in place",
        py::arg("p"), py::arg("seeds"), py::arg("coefs"), py::arg("stream"), py::arg("c"), py::arg("dist"),
        py::arg("offset"), py::arg("num_threads") = 0,
        // No Python object is touched inside: other threads (the offload engine's) run meanwhile.
        py::call_guard<py::gil_scoped_release>());
  m.def("zo_axpbz_cast_", &zo_axpbz_cast_,
        "zo_axpbz_ on a float32 p, and out <- p rounded to nearest even (bfloat16/float16) in the same pass",
        py::arg("p"), py::arg("out"), py::arg("seeds"), py::arg("coefs"), py::arg("stream"), py::arg("c"),
        py::arg("dist"), py::arg("offset"), py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("cast_", &cast_, "out <- src rounded to nearest even (float32 -> bfloat16/float16), in place", py::arg("src"),
        py::arg("out"), py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("philox_fill_", &philox_fill_, "out <- z(seed, stream, offset + i), in place", py::arg("out"),
        py::arg("seed"), py::arg("stream"), py::arg("dist"), py::arg("offset"), py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("last_pass_threads", [] { return last_threads; },
        "threads that ran the calling thread's last pass (0: an empty tensor)");
}
