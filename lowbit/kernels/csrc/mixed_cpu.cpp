// lowbit kernels for MixedBinaryWeight (kind "bin+int"), reading the stored tensors as they are.
// W (m, n), group size gs, G = ceil(n/gs) cells per row, w = b - 1 rest bits:
//   qsign int32 (m, ceil(n/32))  bit plane t (little-endian bit stream per row),
//   qrest int32 flat             w-bit codes r of the weights in high cells, row-major,
//   mask  int32 flat             one bit per cell (i*G + g), 1 = high,
//   p1, p2 fp16 (m, G)           alpha, mu (binary) or s, z (high),
//   qres  int32 flat (optional)  second sign u of the weights in binary cells, row-major,
//   p3    fp16 flat (optional)   alpha2 of the binary cells, row-major.
// Per-row start offsets into the flat streams (hoff: codes of qrest, roff: bits of qres, p3off: cells
// of p3) are computed once per weight by the Python side.
//
// gemv (few tokens): per row and cell, with S_g = sum of x over the cell (precomputed per token),
//   B = sum_{t_j = 1} x_j   (one table lookup per 8 columns: T[k][v] = sum of x[8k + l] over the set bits
//                            l of v, 256 floats per 8 columns, built once per token; a cell boundary inside
//                            a byte is handled by masking the byte),
//   binary:   mu S + alpha (2B - S)  [+ alpha2 (2U - S), U from qres the same way]
//   high:     s (2^w B + sum r_j x_j - z S)   (8 codes per 64-bit load, FMA with x; for w <= 3 and cells on
//                                              multiples of 8 columns without variable shifts (rest_dot_w3),
//                                              else split by two variable shifts (rest_dot))
// Per cell column: a branch-free pass over the rows (bit-plane terms), then the high cells' rest codes, then
// the residual signs of the binary cells (the cell kinds are random, so no per-cell branch).
// Tokens are done one after the other; cells are visited column-block first (all rows of a thread's range for
// cell column g, then g + 1), so the tables of one cell column (gs / 8 KiB) stay in L1.
// dequantize (many tokens): W^ (m, n) fp32, bit-identical to MixedBinaryWeight.dequantize (the module is
// built with -ffp-contract=off, so the multiply and the add are never fused), then BLAS on the Python side.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <vector>
#include <memory>
#include <cmath>
#include <algorithm>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_MAVX2 1
#endif

namespace {

struct Args {
  const uint8_t* sign; int64_t sign_bytes, sign_row_bits;
  const uint8_t* rest; int64_t rest_bytes;
  const uint8_t* mask;
  const at::Half* p1; const at::Half* p2;
  const uint8_t* res; int64_t res_bytes;
  const at::Half* p3;
  const int64_t* hoff; const int64_t* roff; const int64_t* p3off;
  int64_t m, n, G, gs; int w; bool residual;
};

// 8 bytes of a stream starting at byte `byte` (zero past the end).
inline uint64_t read64(const uint8_t* b, int64_t nbytes, int64_t byte) {
  uint64_t v = 0;
  if (byte + 8 <= nbytes) { std::memcpy(&v, b + byte, 8); return v; }
  for (int64_t k = byte; k < nbytes; ++k) v |= uint64_t(b[k]) << (8 * (k - byte));
  return v;
}

// 32 bits of a bit stream starting at bit `pos`.
inline uint32_t bits32(const uint8_t* b, int64_t nbytes, int64_t pos) {
  return uint32_t(read64(b, nbytes, pos >> 3) >> (pos & 7));
}

inline int bit_at(const uint8_t* b, int64_t pos) { return (b[pos >> 3] >> (pos & 7)) & 1; }

inline int code_at(const Args& a, int64_t k) {
  const int64_t pos = k * a.w;
  return int(read64(a.rest, a.rest_bytes, pos >> 3) >> (pos & 7)) & ((1 << a.w) - 1);
}

Args make_args(const torch::Tensor& qsign, const torch::Tensor& qrest, const torch::Tensor& mask,
               const torch::Tensor& p1, const torch::Tensor& p2, const torch::Tensor& qres, const torch::Tensor& p3,
               const torch::Tensor& hoff, const torch::Tensor& roff, const torch::Tensor& p3off,
               int64_t n, int64_t gs, int64_t bits) {
  TORCH_CHECK(qsign.dtype() == torch::kInt32 && qsign.dim() == 2 && qsign.is_contiguous(), "qsign: int32 (m, ceil(n/32))");
  TORCH_CHECK(qrest.dtype() == torch::kInt32 && mask.dtype() == torch::kInt32 && qres.dtype() == torch::kInt32, "int32 streams");
  TORCH_CHECK(qrest.is_contiguous() && mask.is_contiguous() && qres.is_contiguous(), "contiguous streams");
  TORCH_CHECK(p1.dtype() == torch::kHalf && p2.dtype() == torch::kHalf && p3.dtype() == torch::kHalf, "fp16 p1/p2/p3");
  TORCH_CHECK(p1.is_contiguous() && p2.is_contiguous() && p3.is_contiguous(), "contiguous p1/p2/p3");
  TORCH_CHECK(hoff.dtype() == torch::kInt64 && roff.dtype() == torch::kInt64 && p3off.dtype() == torch::kInt64, "int64 offsets");
  TORCH_CHECK(bits >= 2 && bits <= 8 && gs >= 1 && n >= 1, "bad bits/gs/n");
  Args a;
  a.m = qsign.size(0); a.n = n; a.gs = gs; a.G = (n + gs - 1) / gs; a.w = int(bits - 1);
  TORCH_CHECK(qsign.size(1) == (n + 31) / 32, "qsign width");
  TORCH_CHECK(p1.numel() == a.m * a.G && p2.numel() == a.m * a.G, "p1/p2 shape");
  TORCH_CHECK(mask.numel() * 32 >= a.m * a.G, "mask size");
  TORCH_CHECK(hoff.numel() == a.m && roff.numel() == a.m && p3off.numel() == a.m, "offsets size");
  a.sign = reinterpret_cast<const uint8_t*>(qsign.data_ptr<int32_t>());
  a.sign_bytes = qsign.numel() * 4; a.sign_row_bits = qsign.size(1) * 32;
  a.rest = reinterpret_cast<const uint8_t*>(qrest.data_ptr<int32_t>()); a.rest_bytes = qrest.numel() * 4;
  a.mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<int32_t>());
  a.p1 = p1.data_ptr<at::Half>(); a.p2 = p2.data_ptr<at::Half>();
  a.residual = qres.numel() > 0 || p3.numel() > 0;
  a.res = reinterpret_cast<const uint8_t*>(qres.data_ptr<int32_t>()); a.res_bytes = qres.numel() * 4;
  a.p3 = p3.data_ptr<at::Half>();
  a.hoff = hoff.data_ptr<int64_t>(); a.roff = roff.data_ptr<int64_t>(); a.p3off = p3off.data_ptr<int64_t>();
  return a;
}

// Portable loop: rows [i0, i1), M tokens (x (M, npad), S (M, G)).
void rows_scalar(const Args& a, const float* x, int64_t npad, const float* S, int64_t M, float* y, int64_t i0, int64_t i1) {
  const float half = float(1 << a.w);
  std::vector<float> acc(M);
  for (int64_t i = i0; i < i1; ++i) {
    int64_t hpos = a.hoff[i], rpos = a.roff[i], p3i = a.p3off[i];
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t c0 = g * a.gs, L = std::min(a.gs, a.n - c0), sb = i * a.sign_row_bits + c0;
      const float s1 = float(a.p1[i * a.G + g]), s2 = float(a.p2[i * a.G + g]);
      if (bit_at(a.mask, i * a.G + g)) {
        for (int64_t t = 0; t < M; ++t) {
          const float* xt = x + t * npad + c0;
          float d = 0.f;
          for (int64_t k = 0; k < L; ++k) d += (half * bit_at(a.sign, sb + k) + code_at(a, hpos + k)) * xt[k];
          acc[t] += s1 * (d - s2 * S[t * a.G + g]);
        }
        hpos += L;
      } else {
        const float a2 = a.residual ? float(a.p3[p3i++]) : 0.f;
        for (int64_t t = 0; t < M; ++t) {
          const float* xt = x + t * npad + c0;
          float B = 0.f, U = 0.f;
          for (int64_t k = 0; k < L; ++k) {
            if (bit_at(a.sign, sb + k)) B += xt[k];
            if (a.residual && bit_at(a.res, rpos + k)) U += xt[k];
          }
          const float Sg = S[t * a.G + g];
          acc[t] += s2 * Sg + s1 * (2.f * B - Sg) + (a.residual ? a2 * (2.f * U - Sg) : 0.f);
        }
        if (a.residual) rpos += L;
      }
    }
    for (int64_t t = 0; t < M; ++t) y[t * a.m + i] = acc[t];
  }
}

#ifdef LOWBIT_MAVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

struct Consts {
  __m256i iota, sh64, sh32, wmask, lanebits;  // lanebits: lane k keeps bits [k w, (k + 1) w) (w <= 3)
  explicit Consts(int w) {
    iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    sh64 = _mm256_setr_epi64x(0, 2 * w, 4 * w, 6 * w);
    sh32 = _mm256_setr_epi32(0, w, 0, w, 0, w, 0, w);
    wmask = _mm256_set1_epi32((1 << w) - 1);
    const int wl = std::min(w, 3);
    lanebits = _mm256_setr_epi32(7 >> (3 - wl), (7 >> (3 - wl)) << wl, (7 >> (3 - wl)) << (2 * wl), (7 >> (3 - wl)) << (3 * wl),
                                 (7 >> (3 - wl)) << (4 * wl), (7 >> (3 - wl)) << (5 * wl), (7 >> (3 - wl)) << (6 * wl),
                                 (7 >> (3 - wl)) << (7 * wl));
  }
  inline __m256 codes8(uint64_t v) const {        // 8 consecutive w-bit codes (low bits of v) as floats
    const __m256i q = _mm256_srlv_epi64(_mm256_set1_epi64x(int64_t(v)), sh64);
    const __m256i d = _mm256_srlv_epi32(_mm256_shuffle_epi32(q, _MM_SHUFFLE(2, 2, 0, 0)), sh32);
    return _mm256_cvtepi32_ps(_mm256_and_si256(d, wmask));
  }
  inline __m256 upto(int64_t r) const {           // lanes < r
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(r)), iota));
  }
};

// Tables of one token: T[k][v] = sum of x[8k + l] over the set bits l of v (256 entries per 8 columns).
void build_tables(const float* x, int64_t nchunks, float* T) {
  const __m256 m0 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
  const __m256 m1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
  const __m256 m2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, -1, -1, -1, -1));
  for (int64_t k = 0; k < nchunks; ++k) {
    const float* xk = x + 8 * k;
    // subset sums of columns 0..3 (lo, 16 entries) and 4..7 (hi)
    const __m256 l0 = _mm256_add_ps(_mm256_add_ps(_mm256_and_ps(m0, _mm256_broadcast_ss(xk)),
                                                  _mm256_and_ps(m1, _mm256_broadcast_ss(xk + 1))),
                                    _mm256_and_ps(m2, _mm256_broadcast_ss(xk + 2)));
    const __m256 l1 = _mm256_add_ps(l0, _mm256_broadcast_ss(xk + 3));
    const __m256 h0 = _mm256_add_ps(_mm256_add_ps(_mm256_and_ps(m0, _mm256_broadcast_ss(xk + 4)),
                                                  _mm256_and_ps(m1, _mm256_broadcast_ss(xk + 5))),
                                    _mm256_and_ps(m2, _mm256_broadcast_ss(xk + 6)));
    const __m256 h1 = _mm256_add_ps(h0, _mm256_broadcast_ss(xk + 7));
    alignas(32) float hi[16];
    _mm256_store_ps(hi, h0);
    _mm256_store_ps(hi + 8, h1);
    float* Tk = T + 256 * k;
    for (int h = 0; h < 16; ++h) {
      const __m256 hv = _mm256_set1_ps(hi[h]);
      _mm256_storeu_ps(Tk + 16 * h, _mm256_add_ps(hv, l0));
      _mm256_storeu_ps(Tk + 16 * h + 8, _mm256_add_ps(hv, l1));
    }
  }
}

// sum over columns [c0, c1) of bit * x by table lookups; byte(k) gives the 8 bits of columns 8k..8k+7.
template <class Byte>
inline float lut_sum(const float* T, int64_t c0, int64_t c1, Byte byte) {
  const int64_t k0 = c0 >> 3, k1 = (c1 - 1) >> 3;
  const uint32_t m0 = 0xFFu << (c0 & 7), m1 = 0xFFu >> (8 * (k1 + 1) - c1);
  if (k0 == k1) return T[256 * k0 + (byte(k0) & m0 & m1)];
  float s0 = T[256 * k0 + (byte(k0) & m0)], s1 = T[256 * k1 + (byte(k1) & m1)], s2 = 0.f, s3 = 0.f;
  int64_t k = k0 + 1;
  for (; k + 4 <= k1; k += 4) {
    s0 += T[256 * k + byte(k)];
    s1 += T[256 * (k + 1) + byte(k + 1)];
    s2 += T[256 * (k + 2) + byte(k + 2)];
    s3 += T[256 * (k + 3) + byte(k + 3)];
  }
  for (; k < k1; ++k) s0 += T[256 * k + byte(k)];
  return (s0 + s1) + (s2 + s3);
}

// 8 bits of a bit stream starting at bit p (p may be negative: bits before the stream read as 0).
inline uint32_t byte_at(const uint8_t* b, int64_t nbytes, int64_t p) {
  if (p >= 0) return uint32_t(read64(b, nbytes, p >> 3) >> (p & 7)) & 0xFFu;
  return (uint32_t(read64(b, nbytes, 0)) << (-p)) & 0xFFu;
}

inline uint64_t load64(const uint8_t* b) { uint64_t v; std::memcpy(&v, b, 8); return v; }

// sum r x over the L columns of a high cell (codes from code index hpos, x at the cell's first column) into acc
// scaled by coef.  Four chunks of 8 codes per step (four FMA chains); unchecked loads while 8 bytes past the last
// code of the step are inside the stream.
inline __m256 rest_dot(const Consts& C, const Args& a, int64_t hpos, const float* x, int64_t L, __m256 acc, __m256 coef) {
  const int w = a.w;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t k = 0;
  const uint8_t* rest = a.rest;
  for (; k + 32 <= L && (((hpos + k + 32) * w) >> 3) + 8 <= a.rest_bytes; k += 32) {
    const int64_t b0 = (hpos + k) * w, b1 = b0 + 8 * w, b2 = b1 + 8 * w, b3 = b2 + 8 * w;
    s0 = _mm256_fmadd_ps(C.codes8(load64(rest + (b0 >> 3)) >> (b0 & 7)), _mm256_loadu_ps(x + k), s0);
    s1 = _mm256_fmadd_ps(C.codes8(load64(rest + (b1 >> 3)) >> (b1 & 7)), _mm256_loadu_ps(x + k + 8), s1);
    s2 = _mm256_fmadd_ps(C.codes8(load64(rest + (b2 >> 3)) >> (b2 & 7)), _mm256_loadu_ps(x + k + 16), s2);
    s3 = _mm256_fmadd_ps(C.codes8(load64(rest + (b3 >> 3)) >> (b3 & 7)), _mm256_loadu_ps(x + k + 24), s3);
  }
  for (; k < L; k += 8) {
    const int64_t b0 = (hpos + k) * w;
    const __m256 xv = L - k >= 8 ? _mm256_loadu_ps(x + k) : _mm256_and_ps(C.upto(L - k), _mm256_loadu_ps(x + k));
    s0 = _mm256_fmadd_ps(C.codes8(read64(a.rest, a.rest_bytes, b0 >> 3) >> (b0 & 7)), xv, s0);
  }
  return _mm256_fmadd_ps(coef, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)), acc);
}

// rest_dot for w <= 3 and cells starting at a multiple of 8 columns, without variable shifts (slow on some
// CPUs): the 8 codes of a chunk fit in 24 bits, lane k keeps its own bits in place (r_k 2^(k w), exact as a float
// below 2^24) and multiplies xw = x_j 2^(-(j % 8) w) (scaled once per token; powers of two, so exact):
// the products are exactly r_k x_k.
inline float rest_dot_w3(const Consts& C, const Args& a, int64_t hpos, const float* xw, int64_t L) {
  const int w = a.w;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  const uint8_t* rest = a.rest;
  const auto q8 = [&](uint64_t v) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_set1_epi32(int32_t(uint32_t(v))), C.lanebits));
  };
  int64_t k = 0;
  for (; k + 32 <= L && (((hpos + k + 32) * w) >> 3) + 8 <= a.rest_bytes; k += 32) {
    const int64_t b0 = (hpos + k) * w, b1 = b0 + 8 * w, b2 = b1 + 8 * w, b3 = b2 + 8 * w;
    s0 = _mm256_fmadd_ps(q8(load64(rest + (b0 >> 3)) >> (b0 & 7)), _mm256_loadu_ps(xw + k), s0);
    s1 = _mm256_fmadd_ps(q8(load64(rest + (b1 >> 3)) >> (b1 & 7)), _mm256_loadu_ps(xw + k + 8), s1);
    s2 = _mm256_fmadd_ps(q8(load64(rest + (b2 >> 3)) >> (b2 & 7)), _mm256_loadu_ps(xw + k + 16), s2);
    s3 = _mm256_fmadd_ps(q8(load64(rest + (b3 >> 3)) >> (b3 & 7)), _mm256_loadu_ps(xw + k + 24), s3);
  }
  for (; k < L; k += 8) {
    const int64_t b0 = (hpos + k) * w;
    const __m256 xv = L - k >= 8 ? _mm256_loadu_ps(xw + k) : _mm256_and_ps(C.upto(L - k), _mm256_loadu_ps(xw + k));
    s0 = _mm256_fmadd_ps(q8(read64(a.rest, a.rest_bytes, b0 >> 3) >> (b0 & 7)), xv, s0);
  }
  return hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

// sum of T[k][byte k] over chunks [k0, k0 + nk) (cells aligned to whole bytes: no masks).
inline float lut_sum_aligned(const float* Tk, const uint8_t* b, int64_t nk) {  // Tk = T + 256 k0, b: byte k0
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t k = 0;
  for (; k + 8 <= nk; k += 8) {  // the bytes of 8 chunks with one load
    const uint64_t v = load64(b + k);
    const float* Tq = Tk + 256 * k;
    s0 += Tq[v & 255];
    s1 += Tq[256 + ((v >> 8) & 255)];
    s2 += Tq[512 + ((v >> 16) & 255)];
    s3 += Tq[768 + ((v >> 24) & 255)];
    s0 += Tq[1024 + ((v >> 32) & 255)];
    s1 += Tq[1280 + ((v >> 40) & 255)];
    s2 += Tq[1536 + ((v >> 48) & 255)];
    s3 += Tq[1792 + (v >> 56)];
  }
  for (; k + 4 <= nk; k += 4) {
    s0 += Tk[256 * k + b[k]];
    s1 += Tk[256 * (k + 1) + b[k + 1]];
    s2 += Tk[256 * (k + 2) + b[k + 2]];
    s3 += Tk[256 * (k + 3) + b[k + 3]];
  }
  for (; k < nk; ++k) s0 += Tk[256 * k + b[k]];
  return (s0 + s1) + (s2 + s3);
}

// Rows [i0, i1) for one token: x (npad, zero past n), S (G) cell sums, T its tables.  Cell columns outer, rows
// inner, so the tables of one cell (gs / 8 KiB) stay in L1 while every row reads them; the rows' stream offsets
// are carried in hp / rp / pp.
void rows_lut(const Args& a, const float* x, const float* xw, const float* S, const float* T, float* y, int64_t i0,
              int64_t i1) {
  const Consts C(a.w);
  const float half = float(1 << a.w);
  const int64_t row_bytes = a.sign_row_bits / 8, R = i1 - i0;
  const bool aligned = a.gs % 8 == 0;  // cells start on whole bytes of the bit plane (bits past n are 0)
  std::vector<int64_t> hp(a.hoff + i0, a.hoff + i1), rp(a.roff + i0, a.roff + i1), pp(a.p3off + i0, a.p3off + i1);
  std::vector<int64_t> hl(R), bl(R);  // this cell column's high rows and binary rows
  for (int64_t r = 0; r < R; ++r) y[i0 + r] = 0.f;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t c0 = g * a.gs, L = std::min(a.gs, a.n - c0), k0 = c0 >> 3, nk = (L + 7) >> 3;
    const float Sg = S[g];
    // Pass 1, branch-free (the cell kinds are random): the bit-plane term of every cell; the rows with high
    // cells and those with binary cells are listed for the passes below.
    int64_t nh = 0, nb = 0;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = i0 + r;
      const uint8_t* sr = a.sign + i * row_bytes;
      const float B = aligned ? lut_sum_aligned(T + 256 * k0, sr + k0, nk)
                              : lut_sum(T, c0, c0 + L, [sr](int64_t k) { return uint32_t(sr[k]); });
      const float s1 = float(a.p1[i * a.G + g]), s2 = float(a.p2[i * a.G + g]);
      const int hi = bit_at(a.mask, i * a.G + g);
      const float vh = s1 * (half * B - s2 * Sg), vb = (s2 - s1) * Sg + 2.f * s1 * B;
      y[i] += hi ? vh : vb;
      hl[nh] = r; nh += hi;
      bl[nb] = r; nb += 1 - hi;
    }
    // Pass 2: the rest bits of the high cells.
    for (int64_t q = 0; q < nh; ++q) {
      const int64_t r = hl[q], i = i0 + r;
      const float s1 = float(a.p1[i * a.G + g]);
      const float Rx = xw ? rest_dot_w3(C, a, hp[r], xw + c0, L)
                          : hsum8(rest_dot(C, a, hp[r], x + c0, L, _mm256_setzero_ps(), _mm256_set1_ps(1.f)));
      y[i] += s1 * Rx;
      hp[r] += L;
    }
    // Pass 3: the residual signs of the binary cells.
    for (int64_t q = 0; a.residual && q < nb; ++q) {
      const int64_t r = bl[q], i = i0 + r;
      const float a2 = float(a.p3[pp[r]++]);
      const int64_t base = rp[r] - c0, nbytes = a.res_bytes;
      const uint8_t* rs = a.res;
      const float U = aligned && (rp[r] & 7) == 0 && (L & 7) == 0  // the cell's signs are whole bytes
                          ? lut_sum_aligned(T + 256 * k0, rs + (rp[r] >> 3), nk)
                          : lut_sum(T, c0, c0 + L, [rs, nbytes, base](int64_t k) { return byte_at(rs, nbytes, base + 8 * k); });
      y[i] += a2 * (2.f * U - Sg);
      rp[r] += L;
    }
  }
}
#endif

torch::Tensor gemv(torch::Tensor x, torch::Tensor qsign, torch::Tensor qrest, torch::Tensor mask, torch::Tensor p1,
                   torch::Tensor p2, torch::Tensor qres, torch::Tensor p3, torch::Tensor hoff, torch::Tensor roff,
                   torch::Tensor p3off, int64_t n, int64_t gs, int64_t bits, bool scalar) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == n, "x: fp32 (M, n)");
  const Args a = make_args(qsign, qrest, mask, p1, p2, qres, p3, hoff, roff, p3off, n, gs, bits);
  x = x.contiguous();
  const int64_t M = x.size(0), npad = (n + 31) / 32 * 32 + 32;  // zeros past n: whole 32-column loads stay in x
  std::vector<float> xp(M * npad, 0.f), S(M * a.G, 0.f);
  const float* xs = x.data_ptr<float>();
  for (int64_t t = 0; t < M; ++t) std::memcpy(xp.data() + t * npad, xs + t * n, n * sizeof(float));
  const auto group_sums = [&]() {  // S (M, G): plain sums (portable path)
    for (int64_t t = 0; t < M; ++t)
      for (int64_t g = 0; g < a.G; ++g) {
        float acc = 0.f;
        for (int64_t j = g * gs, j1 = std::min(n, j + gs); j < j1; ++j) acc += xs[t * n + j];
        S[t * a.G + g] = acc;
      }
  };
  auto y = torch::empty({M, a.m}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  const float* xq = xp.data();
  const float* Sp = S.data();
#ifdef LOWBIT_MAVX2
  if (!scalar) {
    const int64_t nch = (n + 7) / 8;
    std::unique_ptr<float[]> T(new float[M * nch * 256]);  // every entry is written
    at::parallel_for(0, M * nch, 64, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end;) {  // chunks [begin, end) of the (token, chunk) grid
        const int64_t t = q / nch, k = q % nch, cnt = std::min(end - q, nch - k);
        build_tables(xq + t * npad + 8 * k, cnt, T.get() + (t * nch + k) * 256);
        q += cnt;
      }
    });
    const bool w3 = a.w <= 3 && gs % 8 == 0;  // shift-free decode of the high cells (see rest_dot_w3)
    std::vector<float> xw(w3 ? M * npad : 0);
    float scale[8];  // 2^(-l w), exact
    for (int l = 0; l < 8; ++l) scale[l] = std::ldexp(1.f, -a.w * l);
    for (int64_t j = 0; w3 && j < M * npad; ++j) xw[j] = xq[j] * scale[j & 7];  // npad % 32 == 0
    for (int64_t t = 0; t < M; ++t)  // S from the tables: T[k][255] is the sum of columns 8k..8k+7
      for (int64_t g = 0; g < a.G; ++g)
        S[t * a.G + g] = lut_sum(T.get() + t * nch * 256, g * gs, std::min(n, g * gs + gs), [](int64_t) { return 0xFFu; });
    at::parallel_for(0, a.m, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = 0; t < M; ++t)
        rows_lut(a, xq + t * npad, w3 ? xw.data() + t * npad : nullptr, Sp + t * a.G, T.get() + t * nch * 256,
                 yp + t * a.m, begin, end);
    });
    return y;
  }
#endif
  group_sums();
  at::parallel_for(0, a.m, 16, [&](int64_t begin, int64_t end) { rows_scalar(a, xq, npad, Sp, M, yp, begin, end); });
  return y;
}

torch::Tensor dequantize(torch::Tensor qsign, torch::Tensor qrest, torch::Tensor mask, torch::Tensor p1,
                         torch::Tensor p2, torch::Tensor qres, torch::Tensor p3, torch::Tensor hoff, torch::Tensor roff,
                         torch::Tensor p3off, int64_t n, int64_t gs, int64_t bits) {
  const Args a = make_args(qsign, qrest, mask, p1, p2, qres, p3, hoff, roff, p3off, n, gs, bits);
  auto W = torch::empty({a.m, n}, torch::kFloat32);
  float* wp = W.data_ptr<float>();
  const float half = float(1 << a.w);
  at::parallel_for(0, a.m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t hpos = a.hoff[i], rpos = a.roff[i], p3i = a.p3off[i];
      float* row = wp + i * n;
      for (int64_t g = 0; g < a.G; ++g) {
        const int64_t c0 = g * gs, L = std::min(gs, n - c0), sb = i * a.sign_row_bits + c0;
        const float s1 = float(a.p1[i * a.G + g]), s2 = float(a.p2[i * a.G + g]);
        if (bit_at(a.mask, i * a.G + g)) {
          for (int64_t k = 0; k < L; ++k) {
            const float q = float(code_at(a, hpos + k)) + float(bit_at(a.sign, sb + k)) * half;
            row[c0 + k] = s1 * (q - s2);
          }
          hpos += L;
        } else {
          const float a2 = a.residual ? float(a.p3[p3i++]) : 0.f;
          for (int64_t k = 0; k < L; ++k) {
            float v = s2 + s1 * (2.f * float(bit_at(a.sign, sb + k)) - 1.f);
            if (a.residual) v = v + a2 * (2.f * float(bit_at(a.res, rpos + k)) - 1.f);
            row[c0 + k] = v;
          }
          if (a.residual) rpos += L;
        }
      }
    }
  });
  return W;
}

}  // namespace

bool has_avx2() {
#ifdef LOWBIT_MAVX2
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x @ W^T for a packed mixed binary / high-bit weight (fp32, weights stay packed)");
  m.def("dequantize", &dequantize, "W^ (m, n) fp32 from a packed mixed binary / high-bit weight (bit-identical)");
  m.def("has_avx2", &has_avx2, "whether the AVX2 path was compiled");
}
