// lowbit group-wise integer kernels for the CPU, reading the canonical packed layout directly.
// W (m, n): qweight int32 (m, ceil(n/32)*b) little-endian bit stream per row, scales fp16 (m, G),
// qzeros int32 (G, ceil(m/32)*b) or empty (symmetric: z = 2^(b-1)), g_idx int32 (n) or empty
// (contiguous groups g(j) = j / gs).   W^[i, j] = s[i, g(j)] * (q[i, j] - z[i, g(j)]).
//
// gemm:        y (M, m) = x (M, n) @ W^T, x/y any float dtype, fp32 accumulation (small M: decode);
//              the bf16 dot-product path (group_cpu_bf16.h) where it applies, else the fp32 path:
// dequantize:  W^ (m, n) fp32, bit-identical to the torch reference s * (q - z).
// 16 consecutive codes occupy exactly 2b bytes starting at byte 2*b*c (c = chunk of 16 columns), so
// one masked 16-byte load + broadcast + in-lane byte shuffle + per-lane variable shift + AND gives
// 16 codes as int32 lanes, for every width b = 1..8.  Chunks inside one group accumulate
// sum (q - z) x per group and are scaled once per group; chunks spanning groups (gs % 16 != 0) and
// g_idx layouts gather per-lane scales and zeros.
// gemm_q8:     the int8-activation decode path (group_cpu_q8.h, AVX2).
//
// Variants, chosen by the preprocessor from what the compiler targets (-march=native) and these build-time
// defines (tests build them to check every path on one machine):
//   LOWBIT_NO_AVX512  build as for a CPU without AVX-512 (the AVX2 path and gemm_q8);
//   LOWBIT_NO_AVX2    build as for a CPU without AVX2 either (the portable scalar loops only).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include <algorithm>
#if defined(LOWBIT_NO_AVX2) && !defined(LOWBIT_NO_AVX512)
#define LOWBIT_NO_AVX512 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(LOWBIT_NO_AVX512)
#include <immintrin.h>
#define LOWBIT_AVX512 1
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define LOWBIT_BF16 1  // bf16 dot products: 32 weights per instruction
#endif
#elif defined(__AVX2__) && defined(__FMA__) && !defined(LOWBIT_NO_AVX2)
#include <immintrin.h>
#include <cstring>
#define LOWBIT_AVX2 1  // 8-lane fp32 path for CPUs without AVX-512 (contiguous groups, gs % 8 == n % 8 == 0)
#endif

namespace {

struct Layout {
  const uint8_t* qw; int64_t row_bytes; const at::Half* scales; const uint8_t* qz; int64_t zrow_bytes;
  const int32_t* gidx; int64_t m, n, G, gs; int bits;
};

inline int code_at(const uint8_t* row, int64_t nbytes, int64_t k, int bits) {
  int64_t bit = k * bits, byte = bit >> 3;
  int v = row[byte] | (byte + 1 < nbytes ? row[byte + 1] << 8 : 0);
  return (v >> (bit & 7)) & ((1 << bits) - 1);
}

// Per-row scales and zeros as float (G each).
inline void row_params(const Layout& L, int64_t i, float* sf, float* zf) {
  const float zsym = float(1 << (L.bits - 1));
  for (int64_t g = 0; g < L.G; ++g) {
    sf[g] = float(L.scales[i * L.G + g]);
    zf[g] = L.qz ? float(code_at(L.qz + g * L.zrow_bytes, L.zrow_bytes, i, L.bits)) : zsym;
  }
}

inline int64_t group_of(const Layout& L, int64_t j) { return L.gidx ? L.gidx[j] : j / L.gs; }

#ifdef LOWBIT_AVX512
struct Unpacker {
  __m512i idx, shift, mask; __mmask16 load_mask; int bits;
  explicit Unpacker(int b) : bits(b) {
    alignas(64) int8_t ix[64]; alignas(64) int32_t sh[16];
    for (int l = 0; l < 16; ++l) {
      int bit = l * b, byte = bit >> 3;
      for (int q = 0; q < 4; ++q) ix[4 * l + q] = int8_t(-128);
      ix[4 * l] = int8_t(byte);
      if (byte + 1 < 16) ix[4 * l + 1] = int8_t(byte + 1);
      sh[l] = bit & 7;
    }
    idx = _mm512_load_si512(ix); shift = _mm512_load_si512(sh); mask = _mm512_set1_epi32((1 << b) - 1);
    load_mask = __mmask16((1u << (2 * b)) - 1u);
  }
  inline __m512 codes(const uint8_t* row, int64_t c) const {  // 16 codes of chunk c as floats
    __m128i raw = _mm_maskz_loadu_epi8(load_mask, row + 2 * bits * c);
    __m512i v = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(raw), idx);
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, shift), mask));
  }
};

inline __mmask16 tail_mask(int64_t n, int64_t c0) {
  return n - c0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c0)) - 1u);
}

// Per-lane group index of chunk columns c0..c0+15 (lanes past n repeat the last column).
inline __m512i lane_groups(const Layout& L, int64_t c0) {
  if (L.gidx && L.n - c0 >= 16) return _mm512_loadu_si512(L.gidx + c0);
  alignas(64) int32_t g[16];
  for (int l = 0; l < 16; ++l) g[l] = int32_t(group_of(L, std::min(c0 + l, L.n - 1)));
  return _mm512_load_si512(g);
}

// A run of chunks [c0, c1) inside group g (g >= 0), or of chunks spanning groups (g = -1).
struct Seg { int64_t c0, c1, g; };

std::vector<Seg> segments(const Layout& L) {
  std::vector<Seg> out;
  const int64_t nch = (L.n + 15) / 16;
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t a = 16 * c, b = std::min(a + 15, L.n - 1);
    const int64_t g = (!L.gidx && a / L.gs == b / L.gs) ? a / L.gs : -1;
    if (!out.empty() && out.back().g == g && out.back().c1 == c) out.back().c1 = c + 1;
    else out.push_back({c, c + 1, g});
  }
  return out;
}

// One weight row (scales sf, zeros zf) dot one token x (zero-padded to whole chunks).
// Within a group: two independent accumulators of (q - z) * x, scaled once per group.
inline float row_dot(const Layout& L, const Unpacker& U, const uint8_t* row, const float* sf, const float* zf,
                     const std::vector<Seg>& segs, const float* x) {
  __m512 tot = _mm512_setzero_ps();
  for (const Seg& sg : segs) {
    if (sg.g >= 0) {
      const __m512 z = _mm512_set1_ps(zf[sg.g]);
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t c = sg.c0;
      for (; c + 1 < sg.c1; c += 2) {
        a0 = _mm512_fmadd_ps(_mm512_sub_ps(U.codes(row, c), z), _mm512_loadu_ps(x + 16 * c), a0);
        a1 = _mm512_fmadd_ps(_mm512_sub_ps(U.codes(row, c + 1), z), _mm512_loadu_ps(x + 16 * c + 16), a1);
      }
      if (c < sg.c1) a0 = _mm512_fmadd_ps(_mm512_sub_ps(U.codes(row, c), z), _mm512_loadu_ps(x + 16 * c), a0);
      tot = _mm512_fmadd_ps(_mm512_set1_ps(sf[sg.g]), _mm512_add_ps(a0, a1), tot);
    } else {  // lanes of several groups: per-lane scale and zero
      for (int64_t c = sg.c0; c < sg.c1; ++c) {
        const __m512i gv = lane_groups(L, 16 * c);
        const __m512 w = _mm512_mul_ps(_mm512_sub_ps(U.codes(row, c), _mm512_i32gather_ps(gv, zf, 4)),
                                       _mm512_i32gather_ps(gv, sf, 4));
        tot = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16 * c), tot);
      }
    }
  }
  return _mm512_reduce_add_ps(tot);
}

#include "group_cpu_bf16.h"
#endif

#include "group_cpu_avx2.h"
void row_scalar(const Layout& L, int64_t i, const float* sf, const float* zf, const float* x, int64_t ldx,
                int64_t T, float* out, int64_t ldo) {
  const uint8_t* row = L.qw + i * L.row_bytes;
  for (int64_t t = 0; t < T; ++t) out[t * ldo] = 0.f;
  for (int64_t j = 0; j < L.n; ++j) {
    const int64_t g = group_of(L, j);
    const float w = (float(code_at(row, L.row_bytes, j, L.bits)) - zf[g]) * sf[g];
    for (int64_t t = 0; t < T; ++t) out[t * ldo] += w * x[t * ldx + j];
  }
}

Layout make_layout(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& qzeros,
                   const at::Tensor& g_idx, int64_t n, int64_t bits, int64_t gs) {
  TORCH_CHECK(qweight.dtype() == at::kInt && qweight.is_contiguous() && qweight.dim() == 2, "qweight: int32 (m, W)");
  TORCH_CHECK(scales.dtype() == at::kHalf && scales.is_contiguous(), "scales: fp16 (m, G)");
  TORCH_CHECK(bits >= 1 && bits <= 8 && gs >= 1, "bits 1..8, gs >= 1");
  Layout L{};
  L.m = qweight.size(0); L.n = n; L.bits = int(bits); L.gs = gs; L.G = scales.size(1);
  L.qw = reinterpret_cast<const uint8_t*>(qweight.data_ptr<int32_t>()); L.row_bytes = qweight.size(1) * 4;
  TORCH_CHECK(L.row_bytes * 8 >= n * bits && scales.size(0) == L.m, "qweight/scales shapes do not match");
  L.scales = scales.data_ptr<at::Half>();
  L.qz = nullptr; L.gidx = nullptr; L.zrow_bytes = 0;
  if (qzeros.numel()) {
    TORCH_CHECK(qzeros.dtype() == at::kInt && qzeros.is_contiguous() && qzeros.size(0) == L.G, "qzeros: int32 (G, Wz)");
    L.qz = reinterpret_cast<const uint8_t*>(qzeros.data_ptr<int32_t>()); L.zrow_bytes = qzeros.size(1) * 4;
  }
  if (g_idx.numel()) {
    TORCH_CHECK(g_idx.dtype() == at::kInt && g_idx.is_contiguous() && g_idx.numel() == n, "g_idx: int32 (n,)");
    L.gidx = g_idx.data_ptr<int32_t>();
  }
  return L;
}

}  // namespace

at::Tensor gemm(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor qzeros, at::Tensor g_idx,
                int64_t bits, int64_t gs, int64_t splits) {
  TORCH_CHECK(x.dim() >= 1 && x.is_floating_point(), "x: float (..., n)");
  const auto out_dtype = x.scalar_type();
  std::vector<int64_t> out_shape = x.sizes().vec();  // (..., n) -> (..., m)
  x = x.to(at::kFloat).reshape({-1, x.size(-1)}).contiguous();
  const Layout L = make_layout(qweight, scales, qzeros, g_idx, x.size(1), bits, gs);
  const int64_t M = x.size(0), n = L.n, npad = (n + 31) / 32 * 32, Gp = L.G + 16;
  at::Tensor y = at::empty({M, L.m}, x.options());
  at::Tensor xpad = npad == n ? x : at::constant_pad_nd(x, {0, npad - n});  // whole chunks, zeros past n
  const float* xp = xpad.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool fast8 = !L.gidx && L.gs % 8 == 0 && L.n % 8 == 0;  // the AVX2 path applies
  (void)fast8;
#ifdef LOWBIT_AVX512
  const std::vector<Seg> segs = segments(L);
#endif
#ifdef LOWBIT_BF16
  const int S = int(std::max<int64_t>(1, std::min<int64_t>(3, splits)));
  const bool simple = !L.gidx && L.bits <= 7 && L.gs % 32 == 0;  // bf16 path; others: fp32 row_dot
  std::vector<uint16_t> xb(simple ? M * S * npad : 0);
  std::vector<float> Xg(M * Gp, 0.f);
  for (int64_t t = 0; simple && t < M; ++t) {
    split_bf16(xp + t * npad, npad, S, xb.data() + t * S * npad);
    for (int64_t j = 0; j < n; ++j) Xg[t * Gp + j / L.gs] += xp[t * npad + j];
  }
#endif
  at::parallel_for(0, L.m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sf(2 * Gp), zf(2 * Gp);
#ifdef LOWBIT_AVX512
    const Unpacker U(L.bits);
#endif
#ifdef LOWBIT_BF16
    const Unpacker32 U32(std::min(L.bits, 7));
#endif
#ifdef LOWBIT_AVX2
    const Unpacker8 U8(L.bits, L.row_bytes);
#endif
    for (int64_t i = begin; i < end; ++i) {
#ifdef LOWBIT_BF16
      if (simple) {  // two rows at a time (one for an odd last row)
        const int R = i + 1 < end ? 2 : 1;
        for (int r = 0; r < R; ++r) row_params(L, i + r, sf.data() + r * Gp, zf.data() + r * Gp);
        const uint8_t* rw[2] = {L.qw + i * L.row_bytes, L.qw + (i + R - 1) * L.row_bytes};
        for (int64_t t = 0; t < M; ++t) {
          const uint16_t* xbt = xb.data() + t * S * npad;
          const float* xg = Xg.data() + t * Gp;
          float* o = yp + t * L.m + i;
#define LOWBIT_CALL(SS, RR) rows_dot_groups<SS, RR>(U32, rw, sf.data(), zf.data(), Gp, L.G, L.gs / 32, npad / 32, xbt, npad, xg, o, 1)
          if (R == 2) { if (S == 1) LOWBIT_CALL(1, 2); else if (S == 2) LOWBIT_CALL(2, 2); else LOWBIT_CALL(3, 2); }
          else { if (S == 1) LOWBIT_CALL(1, 1); else if (S == 2) LOWBIT_CALL(2, 1); else LOWBIT_CALL(3, 1); }
#undef LOWBIT_CALL
        }
        i += R - 1;
        continue;
      }
#endif
      row_params(L, i, sf.data(), zf.data());
#ifdef LOWBIT_AVX512
      for (int64_t t = 0; t < M; ++t)
        yp[t * L.m + i] = row_dot(L, U, L.qw + i * L.row_bytes, sf.data(), zf.data(), segs, xp + t * npad);
#elif defined(LOWBIT_AVX2)
      if (fast8) {
        for (int64_t t = 0; t < M; ++t)
          yp[t * L.m + i] = row_dot8(L, U8, L.qw + i * L.row_bytes, sf.data(), zf.data(), xp + t * npad);
      } else {
        row_scalar(L, i, sf.data(), zf.data(), xp, npad, M, yp + i, L.m);
      }
#else
      row_scalar(L, i, sf.data(), zf.data(), xp, npad, M, yp + i, L.m);
#endif
    }
  });
  out_shape.back() = L.m;
  return (out_dtype == at::kFloat ? y : y.to(out_dtype)).view(out_shape);
}

at::Tensor dequantize(at::Tensor qweight, at::Tensor scales, at::Tensor qzeros, at::Tensor g_idx,
                      int64_t n, int64_t bits, int64_t gs) {
  const Layout L = make_layout(qweight, scales, qzeros, g_idx, n, bits, gs);
  at::Tensor w = at::empty({L.m, n}, qweight.options().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  const bool fast8 = !L.gidx && L.gs % 8 == 0 && n % 8 == 0;  // the AVX2 path applies
  (void)fast8;
  at::parallel_for(0, L.m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sf(L.G + 16), zf(L.G + 16);
#ifdef LOWBIT_AVX512
    const Unpacker U(L.bits);
#endif
#ifdef LOWBIT_AVX2
    const Unpacker8 U8(L.bits, L.row_bytes);
#endif
    for (int64_t i = begin; i < end; ++i) {
      row_params(L, i, sf.data(), zf.data());
      const uint8_t* row = L.qw + i * L.row_bytes;
      float* o = wp + i * n;
#ifdef LOWBIT_AVX512
      int64_t g = 0, g_end = L.gs;
      for (int64_t c0 = 0; c0 < n; c0 += 16) {
        const int64_t cl = std::min(c0 + 15, n - 1);
        while (c0 >= g_end) { ++g; g_end += L.gs; }
        __m512 s, z;
        if (!L.gidx && cl < g_end) {
          s = _mm512_set1_ps(sf[g]); z = _mm512_set1_ps(zf[g]);
        } else {
          const __m512i gv = lane_groups(L, c0);
          s = _mm512_i32gather_ps(gv, sf.data(), 4); z = _mm512_i32gather_ps(gv, zf.data(), 4);
        }
        const __m512 v = _mm512_mul_ps(s, _mm512_sub_ps(U.codes(row, c0 / 16), z));
        _mm512_mask_storeu_ps(o + c0, tail_mask(n, c0), v);
      }
#else
#ifdef LOWBIT_AVX2
      if (fast8) {  // s * (q - z) lane by lane: the same two fp32 operations as the reference
        for (int64_t c = 0; c < n / 8; ++c) {
          const int64_t g = 8 * c / L.gs;
          _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(_mm256_set1_ps(sf[g]),
                                                    _mm256_sub_ps(U8.codes(row, c), _mm256_set1_ps(zf[g]))));
        }
        continue;
      }
#endif
      for (int64_t j = 0; j < n; ++j) {
        const int64_t g = group_of(L, j);
        o[j] = sf[g] * (float(code_at(row, L.row_bytes, j, L.bits)) - zf[g]);
      }
#endif
    }
  });
  return w;
}

#include "group_cpu_q8.h"
bool has_q8() {
#ifdef LOWBIT_Q8
  return true;
#else
  return false;
#endif
}

bool has_bf16() {
#ifdef LOWBIT_BF16
  return true;
#else
  return false;
#endif
}

bool has_avx2() {
#ifdef LOWBIT_AVX2
  return true;
#else
  return false;
#endif
}

bool has_avx512() {
#ifdef LOWBIT_AVX512
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "y = x @ W^T for a packed group-wise int weight (fp32)");
  m.def("dequantize", &dequantize, "W^ (m, n) fp32 from a packed group-wise int weight");
#ifdef LOWBIT_Q8
  m.def("gemm_q8", &gemm_q8, "y = x^ @ W^T with x rounded to int8 blocks (AVX2 integer dot products; 2/3/4/8 bits)");
#endif
  m.def("has_q8", &has_q8, "whether the int8-activation path (gemm_q8) was compiled");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 path was compiled");
  m.def("has_avx2", &has_avx2, "whether the AVX2 path (CPUs without AVX-512) was compiled");
  m.def("has_bf16", &has_bf16, "whether the AVX-512 BF16 dot-product path was compiled");
}
