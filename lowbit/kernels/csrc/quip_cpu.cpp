// lowbit QuIP# kernels for the CPU: y (M, m) = x (M, n) @ W~^T with the rotated weight
// W~ = sum_k scales[k] * C_k decoded on the fly from the stored codes (never materialised for small M).
// Stage 1: E8P codes int16 (m, n/8).  Stage 2 (optional): the 8-bit E8 residual codes uint8 (m, n/8)
// ("e8res", 3 bits) or a second E8P stage int16 (m, n/8) (4 bits).
//
// E8P code c (16 bits): i = c & 255 the abs pattern, sig = (c >> 8) & 127 the signs of coords 0..6,
// t = c >> 15 the shift (0: +1/4, 1: -1/4); sign of coord 7 = (parity(i) + popcount(sig)) & 1.
// Tables prepared by the Python side (so the codebook has one definition, lowbit.packed.codebooks):
//   A (256, 8) fp32: abs patterns with coord 7 negated where parity(i) is odd,
//   S (128, 8) int32: sign-bit XOR masks of sig, coord 7 = popcount(sig) & 1,
//   R (256, 8) fp32: the residual codebook.
// So  decode(c) = (A[i] ^ S[sig]) + (t ? -1/4 : +1/4)  exactly (all values are exact in fp32).
//
// gemv:     fused decode-and-dot for small M (meant for 1..4 tokens; any M works, in blocks of 4): per row
//           and stage, 1-4 independent accumulators of (A[i] ^ S[sig]) . x over the chunks of 8 (the codes of
//           1-4 chunks read with one load, each decoded once for all tokens of the block); the shift term
//           1/4 * sum_c (+-1) * sum(x_chunk) is accumulated in a separate pass from precomputed chunk sums of
//           x (8 codes per AVX2 step: the int16 sign bit is t); each stage is scaled once per row.
//           Scalar loop (same tables) where the CPU has no AVX2+FMA, or when asked (tests).
// rht:      the Hadamard RHT of lowbit.packed.rht in one call (see below).
// rotated:  W~ (m, n) fp32, bit-identical to the torch reference  0 + s0 * C0 (+ s1 * C1)  (the module is
//           built with -ffp-contract=off so the multiply and the add are never fused).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#include <cmath>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_QAVX2 1
#endif

namespace {

struct Args {
  const uint16_t* c1; const uint8_t* c2;  // c2: uint8 (e8res) or uint16 (e8p) rows, nullptr without stage 2
  int st2;                                // 0 none, 1 e8res, 2 e8p
  float s0, s1;
  const float* A; const uint32_t* S; const float* R;
  int64_t m, n, nc;                       // nc = n / 8 chunks
};

alignas(8) const float kShift[2] = {0.25f, -0.25f};  // E8P shift by bit 15

inline float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// Codeword j-th coordinate of E8P code c (scalar).
inline float e8p_coord(const Args& a, uint32_t c, int j) {
  const float v = as_float(as_bits(a.A[(c & 255) * 8 + j]) ^ a.S[((c >> 8) & 127) * 8 + j]);
  return v + kShift[c >> 15];
}

inline float stage2_coord(const Args& a, int64_t i, int64_t ch, int j) {
  if (a.st2 == 1) return a.R[a.c2[i * a.nc + ch] * 8 + j];
  return e8p_coord(a, reinterpret_cast<const uint16_t*>(a.c2)[i * a.nc + ch], j);
}

// Scalar fallback (CPUs without AVX2/FMA): rows [i0, i1), all M tokens.
void rows_scalar(const Args& a, const float* x, int64_t M, float* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t t = 0; t < M; ++t) {
      const float* xt = x + t * a.n;
      float acc1 = 0.f, acc2 = 0.f;
      for (int64_t ch = 0; ch < a.nc; ++ch) {
        const uint32_t c = a.c1[i * a.nc + ch];
        for (int j = 0; j < 8; ++j) {
          acc1 += e8p_coord(a, c, j) * xt[8 * ch + j];
          if (a.st2) acc2 += stage2_coord(a, i, ch, j) * xt[8 * ch + j];
        }
      }
      y[t * a.m + i] = a.s0 * acc1 + (a.st2 ? a.s1 * acc2 : 0.f);
    }
  }
}

#ifdef LOWBIT_QAVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// (A[i] ^ S[sig]) for code c: the codeword without its shift.  Only bits 0..14 of c are read, so c may carry
// further codes above bit 16 (several codes read with one load).
inline __m256 e8p_signed(const Args& a, uint64_t c) {
  const char* A = reinterpret_cast<const char*>(a.A);
  const char* S = reinterpret_cast<const char*>(a.S);
  return _mm256_xor_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(A + ((c << 5) & 0x1FE0))),
                       _mm256_loadu_ps(reinterpret_cast<const float*>(S + ((c >> 3) & 0xFE0))));
}

// sum_c (t_c ? -xs[c] : xs[c]) for one row of E8P codes: 8 codes per step, the int16 sign bit is t.
inline __m256 shift_sum(const uint16_t* codes, const float* xs, int64_t nc) {
  const __m256i top = _mm256_set1_epi32(int32_t(0x80000000u));
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= nc; c += 8) {
    const __m256i cw = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + c)));
    acc = _mm256_add_ps(acc, _mm256_xor_ps(_mm256_loadu_ps(xs + c), _mm256_castsi256_ps(_mm256_and_si256(cw, top))));
  }
  float tail = 0.f;
  for (; c < nc; ++c) tail += (codes[c] >> 15) ? -xs[c] : xs[c];
  return _mm256_add_ps(acc, _mm256_setr_ps(tail, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f));
}

// Rows [i0, i1) for M tokens (x (M, n), xs (M, ncp) chunk sums), stage-2 kind ST2.
template <int M, int ST2>
void rows_avx2(const Args& a, const float* x, const float* xs, int64_t ncp, float* y, int64_t i0, int64_t i1) {
  constexpr int S = ST2 ? 2 : 1;
  constexpr int U = (M * S <= 1) ? 4 : (M * S <= 2 ? 2 : 1);  // independent FMA chains per (stage, token)
  const int64_t nc = a.nc;
  for (int64_t i = i0; i < i1; ++i) {
    const uint16_t* c1 = a.c1 + i * nc;
    const uint8_t* r2 = ST2 == 1 ? a.c2 + i * nc : nullptr;
    const uint16_t* e2 = ST2 == 2 ? reinterpret_cast<const uint16_t*>(a.c2) + i * nc : nullptr;
    __m256 acc[S][M][U];
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < M; ++t)
        for (int u = 0; u < U; ++u) acc[s][t][u] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + U <= nc; c += U) {
      uint64_t k1 = 0, k2 = 0;  // the U codes of each stage, read with one load
      std::memcpy(&k1, c1 + c, sizeof(uint16_t) * U);
      if (ST2 == 1) std::memcpy(&k2, r2 + c, U);
      if (ST2 == 2) std::memcpy(&k2, e2 + c, sizeof(uint16_t) * U);
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m256 w1 = e8p_signed(a, k1 >> (16 * u));
        __m256 w2 = w1;
        if (ST2 == 1) w2 = _mm256_loadu_ps(a.R + 8 * ((k2 >> (8 * u)) & 255));
        if (ST2 == 2) w2 = e8p_signed(a, k2 >> (16 * u));
#pragma GCC unroll 4
        for (int t = 0; t < M; ++t) {
          const __m256 xv = _mm256_loadu_ps(x + t * a.n + 8 * (c + u));
          acc[0][t][u] = _mm256_fmadd_ps(w1, xv, acc[0][t][u]);
          if (ST2) acc[S - 1][t][u] = _mm256_fmadd_ps(w2, xv, acc[S - 1][t][u]);
        }
      }
    }
    for (; c < nc; ++c) {
      const __m256 w1 = e8p_signed(a, c1[c]);
      __m256 w2 = w1;
      if (ST2 == 1) w2 = _mm256_loadu_ps(a.R + 8 * int64_t(r2[c]));
      if (ST2 == 2) w2 = e8p_signed(a, e2[c]);
      for (int t = 0; t < M; ++t) {
        const __m256 xv = _mm256_loadu_ps(x + t * a.n + 8 * c);
        acc[0][t][0] = _mm256_fmadd_ps(w1, xv, acc[0][t][0]);
        if (ST2) acc[S - 1][t][0] = _mm256_fmadd_ps(w2, xv, acc[S - 1][t][0]);
      }
    }
    const __m256 q = _mm256_set1_ps(0.25f);
    for (int t = 0; t < M; ++t) {
      __m256 v0 = acc[0][t][0];
      for (int u = 1; u < U; ++u) v0 = _mm256_add_ps(v0, acc[0][t][u]);
      v0 = _mm256_fmadd_ps(q, shift_sum(c1, xs + t * ncp, nc), v0);
      float out = a.s0 * hsum8(v0);
      if (ST2) {
        __m256 v1 = acc[S - 1][t][0];
        for (int u = 1; u < U; ++u) v1 = _mm256_add_ps(v1, acc[S - 1][t][u]);
        if (ST2 == 2) v1 = _mm256_fmadd_ps(q, shift_sum(e2, xs + t * ncp, nc), v1);
        out += a.s1 * hsum8(v1);
      }
      y[t * a.m + i] = out;
    }
  }
}

// The full codeword (shift included) of E8P code c; the shift is looked up (no data-dependent branch).
inline __m256 e8p_full(const Args& a, uint32_t c) {
  return _mm256_add_ps(e8p_signed(a, c), _mm256_broadcast_ss(kShift + (c >> 15)));
}

// Row i of W~ = s0 * C0 (+ s1 * C1): one multiply, one add per element, as the reference.
template <int ST2>
void rotated_row_avx2(const Args& a, int64_t i, float* o) {
  const __m256 s0 = _mm256_set1_ps(a.s0), s1 = _mm256_set1_ps(a.s1);
  const int64_t nc = a.nc;
  const uint16_t* c1 = a.c1 + i * nc;
  const uint8_t* r2 = ST2 == 1 ? a.c2 + i * nc : nullptr;
  const uint16_t* e2 = ST2 == 2 ? reinterpret_cast<const uint16_t*>(a.c2) + i * nc : nullptr;
  for (int64_t c = 0; c < nc; ++c) {
    __m256 v = _mm256_mul_ps(s0, e8p_full(a, c1[c]));
    if (ST2 == 1) v = _mm256_add_ps(v, _mm256_mul_ps(s1, _mm256_loadu_ps(a.R + 8 * int64_t(r2[c]))));
    if (ST2 == 2) v = _mm256_add_ps(v, _mm256_mul_ps(s1, e8p_full(a, e2[c])));
    _mm256_storeu_ps(o + 8 * c, v);
  }
}

template <int M>
void rows_avx2_st(const Args& a, const float* x, const float* xs, int64_t ncp, float* y, int64_t i0, int64_t i1) {
  if (a.st2 == 0) rows_avx2<M, 0>(a, x, xs, ncp, y, i0, i1);
  else if (a.st2 == 1) rows_avx2<M, 1>(a, x, xs, ncp, y, i0, i1);
  else rows_avx2<M, 2>(a, x, xs, ncp, y, i0, i1);
}
#endif

Args make_args(const at::Tensor& codes, const at::Tensor& codes2, const at::Tensor& scales, int64_t n,
               const at::Tensor& A, const at::Tensor& S, const at::Tensor& R) {
  TORCH_CHECK(codes.dtype() == at::kShort && codes.is_contiguous() && codes.dim() == 2, "codes: int16 (m, n/8)");
  TORCH_CHECK(n % 8 == 0 && codes.size(1) == n / 8, "codes: (m, n/8) with n a multiple of 8");
  TORCH_CHECK(scales.dtype() == at::kFloat && scales.is_contiguous(), "scales: float32 (stages,)");
  TORCH_CHECK(A.dtype() == at::kFloat && A.is_contiguous() && A.numel() == 256 * 8, "A: float32 (256, 8)");
  TORCH_CHECK(S.dtype() == at::kInt && S.is_contiguous() && S.numel() == 128 * 8, "S: int32 (128, 8)");
  TORCH_CHECK(R.dtype() == at::kFloat && R.is_contiguous() && R.numel() == 256 * 8, "R: float32 (256, 8)");
  Args a{};
  a.m = codes.size(0); a.n = n; a.nc = n / 8;
  a.c1 = reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>());
  a.c2 = nullptr; a.st2 = 0;
  if (codes2.numel()) {
    TORCH_CHECK(codes2.is_contiguous() && codes2.dim() == 2 && codes2.size(0) == a.m && codes2.size(1) == a.nc,
                "codes2: (m, n/8)");
    if (codes2.dtype() == at::kByte) { a.st2 = 1; a.c2 = codes2.data_ptr<uint8_t>(); }
    else {
      TORCH_CHECK(codes2.dtype() == at::kShort, "codes2: uint8 (e8res) or int16 (e8p)");
      a.st2 = 2; a.c2 = reinterpret_cast<const uint8_t*>(codes2.data_ptr<int16_t>());
    }
  }
  TORCH_CHECK(scales.numel() == (a.st2 ? 2 : 1), "scales: one per stage");
  a.s0 = scales.data_ptr<float>()[0];
  a.s1 = a.st2 ? scales.data_ptr<float>()[1] : 0.f;
  a.A = A.data_ptr<float>(); a.S = reinterpret_cast<const uint32_t*>(S.data_ptr<int32_t>()); a.R = R.data_ptr<float>();
  return a;
}

}  // namespace

at::Tensor gemv(at::Tensor x, at::Tensor codes, at::Tensor codes2, at::Tensor scales,
                at::Tensor A, at::Tensor S, at::Tensor R, bool scalar) {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (M, n)");
  const Args a = make_args(codes, codes2, scales, x.size(1), A, S, R);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, a.m}, x.options());
  if (M == 0 || a.m == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#ifdef LOWBIT_QAVX2
  if (!scalar) {
  const int64_t ncp = (a.nc + 7) / 8 * 8;
  std::vector<float> xs(M * ncp, 0.f);  // chunk sums of x, per token
  for (int64_t t = 0; t < M; ++t)
    for (int64_t c = 0; c < a.nc; ++c) {
      float s = 0.f;
      for (int j = 0; j < 8; ++j) s += xp[t * a.n + 8 * c + j];
      xs[t * ncp + c] = s;
    }
  at::parallel_for(0, a.m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = 0; t0 < M; t0 += 4) {  // tokens in blocks of at most 4
      const int64_t T = std::min<int64_t>(4, M - t0);
      const float* xt = xp + t0 * a.n; const float* st = xs.data() + t0 * ncp; float* yt = yp + t0 * a.m;
      if (T == 1) rows_avx2_st<1>(a, xt, st, ncp, yt, begin, end);
      else if (T == 2) rows_avx2_st<2>(a, xt, st, ncp, yt, begin, end);
      else if (T == 3) rows_avx2_st<3>(a, xt, st, ncp, yt, begin, end);
      else rows_avx2_st<4>(a, xt, st, ncp, yt, begin, end);
    }
  });
  return y;
  }
#endif
  at::parallel_for(0, a.m, 16, [&](int64_t begin, int64_t end) { rows_scalar(a, xp, M, yp, begin, end); });
  return y;
}

at::Tensor rotated(at::Tensor codes, at::Tensor codes2, at::Tensor scales, int64_t n,
                   at::Tensor A, at::Tensor S, at::Tensor R, bool scalar) {
  const Args a = make_args(codes, codes2, scales, n, A, S, R);
  at::Tensor w = at::empty({a.m, n}, codes.options().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, a.m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* o = wp + i * n;
#ifdef LOWBIT_QAVX2
      if (!scalar) {
        if (a.st2 == 0) rotated_row_avx2<0>(a, i, o);
        else if (a.st2 == 1) rotated_row_avx2<1>(a, i, o);
        else rotated_row_avx2<2>(a, i, o);
        continue;
      }
#endif
      for (int64_t c = 0; c < a.nc; ++c) {
        const uint32_t k = a.c1[i * a.nc + c];
        for (int j = 0; j < 8; ++j) {
          float v = a.s0 * e8p_coord(a, k, j);
          if (a.st2) { const float p = a.s1 * stage2_coord(a, i, c, j); v = v + p; }
          o[8 * c + j] = v;
        }
      }
    }
  });
  return w;
}

// The orthonormal Hadamard transform of lowbit.packed.rht (n = K * P, P a power of two) over the rows of
// x (M, n) fp32, with the RHT signs: forward  T(s * x),  inverse  s * T^T x  (signs empty: no sign step).
// T x = (H_K (x) H_P) x / sqrt(n): fast Walsh-Hadamard butterflies within each block of P, then H_K (H^T for
// the inverse) across the K blocks.  The same operations as the torch version, in one call (the torch
// version issues ~6 small ops per butterfly level, which costs more than the whole decode for one token).
at::Tensor rht(at::Tensor x, at::Tensor signs, at::Tensor H, int64_t P, bool inverse) {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == at::kFloat, "x: float32 (M, n)");
  TORCH_CHECK(H.dtype() == at::kFloat && H.is_contiguous() && H.dim() == 2 && H.size(0) == H.size(1), "H: float32 (K, K)");
  x = x.contiguous();
  const int64_t M = x.size(0), n = x.size(1), K = H.size(0);
  TORCH_CHECK(P >= 1 && (P & (P - 1)) == 0 && K * P == n, "n must be K * P with P a power of two");
  const bool has_s = signs.numel() > 0;
  TORCH_CHECK(!has_s || (signs.dtype() == at::kFloat && signs.is_contiguous() && signs.numel() == n), "signs: float32 (n,)");
  at::Tensor y = at::empty({M, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* sp = has_s ? signs.data_ptr<float>() : nullptr;
  const float* hp = H.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float scale = float(1.0 / std::sqrt(double(n)));
  std::vector<float> tmp(K > 1 ? n : 0);
  for (int64_t t = 0; t < M; ++t) {
    const float* xr = xp + t * n;
    float* r = yp + t * n;
    if (has_s && !inverse) for (int64_t j = 0; j < n; ++j) r[j] = xr[j] * sp[j];
    else std::memcpy(r, xr, size_t(n) * sizeof(float));
    for (int64_t k = 0; k < K; ++k) {
      float* b = r + k * P;
      for (int64_t h = 1; h < P; h *= 2)
        for (int64_t i = 0; i < P; i += 2 * h)
          for (int64_t j = i; j < i + h; ++j) { const float u = b[j], v = b[j + h]; b[j] = u + v; b[j + h] = u - v; }
    }
    if (K > 1) {
      for (int64_t a = 0; a < K; ++a) {
        float* o = tmp.data() + a * P;
        for (int64_t p = 0; p < P; ++p) o[p] = 0.f;
        for (int64_t c = 0; c < K; ++c) {
          const float hac = inverse ? hp[c * K + a] : hp[a * K + c];
          const float* rc = r + c * P;
          for (int64_t p = 0; p < P; ++p) o[p] += hac * rc[p];
        }
      }
      std::memcpy(r, tmp.data(), size_t(n) * sizeof(float));
    }
    if (has_s && inverse) for (int64_t j = 0; j < n; ++j) r[j] = r[j] * scale * sp[j];
    else for (int64_t j = 0; j < n; ++j) r[j] = r[j] * scale;
  }
  return y;
}

bool has_avx2() {
#ifdef LOWBIT_QAVX2
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x @ W~^T for QuIP# E8P codes, decoded on the fly (fp32); scalar=True forces the portable path");
  m.def("rotated", &rotated, "W~ (m, n) fp32 from QuIP# E8P codes (bit-identical to the reference)");
  m.def("rht", &rht, "orthonormal Hadamard RHT over the rows of x (forward T(s*x), inverse s*T^T x)");
  m.def("has_avx2", &has_avx2, "whether the AVX2 path was compiled");
}
