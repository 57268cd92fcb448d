// Part of group_cpu.cpp (included there, not a standalone header): the int8-activation decode path
// (AVX2 integer dot products), compiled where the CPU has AVX2 + FMA (LOWBIT_Q8).
//
// The math, for one token x (n,) and one weight row i (codes q, group scales s_g, zeros z_g):
// x is cut into blocks of QB columns (32; 64 for 2-bit codes), each rounded to int8 with its own
// scale d_c = max|x_c| / 127, xq = round(x / d_c) (half to even), so x̂ = d_c·xq.  Then
//
//     y_i = Σ_g s_g · ( Σ_{c∈g} d_c · Σ_{j∈c} (q_ij − o)·xq_j  −  (z_g − o) · Σ_{c∈g} d_c Σ_{j∈c} xq_j )
//
// is exactly x̂ · Ŵ_i (the integer sums are exact; only the fp32 accumulation order differs), with
// o = 128 for 8-bit codes (so q − o fits int8) and o = 0 otherwise.  Σ (q − o)·xq runs
// on _mm256_maddubs_epi16 (u8 × s8 → pairs summed to int16, no overflow: 2·15·127, 2·7·127, 2·3·127,
// 2·128·127 < 2¹⁵) and _mm256_madd_epi16 with ones (→ int32).
//
// Unpacking without moving weights: 4-bit codes 2k, 2k+1 share byte k (low, high nibble), so the
// 16 low nibbles and the 16 high nibbles of a 16-byte load are codes 0, 2, …, 30 and 1, 3, …, 31; the
// activations of each block are permuted once per call to that order.  2-bit: the four 2-bit fields of
// byte k are codes 4k … 4k+3, so a block of 64 becomes four 16-lane vectors (codes 4r + f).
// 8-bit: bytes are codes.
// 3-bit: the 32 codes of a block are the 96-bit little-endian stream of its 3 words (12 bytes; code k at bits
// 3k … 3k+2, so at bit 3k mod 8 of byte 3k >> 3), broadcast to both 128-bit halves.  Without a
// shift, 20 codes (k mod 8 ∈ {0, 1, 3, 4, 6}: bit 0, 3, 1, 4, 2 of their byte) are a byte shuffle and a mask
// away, each left at bit t ≤ 4 of its byte (the mask 7 << t); the other 12 (bit 6, 7: straddling two
// bytes; bit 5) are moved by a second shuffle as 2-byte windows into 32-bit lanes (two per lane), shifted right
// by 5 (one immediate shift for all) and masked, which leaves them at t = 1, 2, 0.  Each pair of bytes that
// _mm256_maddubs_epi16 adds holds two codes with the same t (2·7·2⁴·127 < 2¹⁵), and the
// _mm256_madd_epi16 that sums the pairs multiplies them by 2^(4−t) instead of 1, so every block's sum
// comes out as exactly 16 · Σ q·xq (the row's float sum is multiplied by 1/16 at the end: exact).  The codes'
// order in the vector (Q3_PERM) is the activations' order.  The 16-byte load of a block reads 4 bytes past
// it: the last row is read from a padded copy.
#if defined(__AVX2__) && defined(__FMA__) && !defined(LOWBIT_NO_AVX2)
#include <cmath>
#define LOWBIT_Q8 1
namespace {
inline float hsum8_q8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline int q8_block(int bits) { return bits == 2 ? 64 : 32; }

// 3-bit: the code at each position of the unpacked vector (lanes 0-5: a windowed code and a direct code with the
// same bit t in each byte pair; lanes 6-7: direct codes), see block_dot<3>.
constexpr int Q3_PERM[32] = {2, 3, 10, 11, 18, 19, 26, 27, 5, 6, 13, 14, 21, 22, 29, 30,
                             7, 0, 15, 8, 23, 16, 31, 24, 1, 9, 17, 25, 4, 12, 20, 28};

// Position p of a block (after the permutation) holds column perm(p) of the block.
inline int q8_perm(int bits, int p) {
  if (bits == 4) return p < 16 ? 2 * p : 2 * (p - 16) + 1;
  if (bits == 2) return 4 * (p % 16) + p / 16;
  if (bits == 3) return Q3_PERM[p];
  return p;
}

// Σ over one block of (q - o) * xq as 8 int32 lanes.
template <int bits>
inline __m256i block_dot(const uint8_t* w, const int8_t* xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (bits == 4) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w)), m4 = _mm_set1_epi8(0x0F);
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))), ones);
  }
  if constexpr (bits == 2) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w)), m2 = _mm_set1_epi8(0x03);
    const __m256i a = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 2), m2), _mm_and_si128(raw, m2));
    const __m256i b = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 6), m2), _mm_and_si128(_mm_srli_epi16(raw, 4), m2));
    const __m256i pa = _mm256_maddubs_epi16(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
    const __m256i pb = _mm256_maddubs_epi16(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)));
    return _mm256_madd_epi16(_mm256_add_epi16(pa, pb), ones);
  }
  if constexpr (bits == 3) {  // returns 16 · Σ q·xq (see the module doc)
    // the block's 12 bytes (and 4 more, unused: the caller pads the last row) in both halves
    const __m256i r = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    // direct codes: the byte holding code Q3_PERM[p] (code at bit t ≤ 4 of it); -128: none (a windowed code)
    const __m256i cd = _mm256_setr_epi8(-128, 1, -128, 4, -128, 7, -128, 10, -128, 2, -128, 5, -128, 8, -128, 11,
                                        -128, 0, -128, 3, -128, 6, -128, 9, 0, 3, 6, 9, 1, 4, 7, 10);
    // windowed codes (bit 5, 6, 7 of byte b): bytes b, b+1 of the two codes of a lane; >> 5 puts each at bit 0-2
    // of its first byte (byte 12 is past the block: only bits of it that the mask drops are read)
    const __m256i cw = _mm256_setr_epi8(0, 1, 3, 4, 6, 7, 9, 10, 1, 2, 4, 5, 7, 8, 10, 11,
                                        2, 3, 5, 6, 8, 9, 11, 12, -128, -128, -128, -128, -128, -128, -128, -128);
    // 7 << t at each position, where the windowed / the direct vector holds the code
    const __m256i mw = _mm256_setr_epi8(14, 0, 14, 0, 14, 0, 14, 0, 28, 0, 28, 0, 28, 0, 28, 0,
                                        7, 0, 7, 0, 7, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i md = _mm256_setr_epi8(0, 14, 0, 14, 0, 14, 0, 14, 0, 28, 0, 28, 0, 28, 0, 28,
                                        0, 7, 0, 7, 0, 7, 0, 7, 56, 56, 56, 56, 112, 112, 112, 112);
    const __m256i pw = _mm256_setr_epi16(8, 8, 8, 8, 4, 4, 4, 4, 16, 16, 16, 16, 2, 2, 1, 1);  // 2^(4 - t) per pair
    const __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(_mm256_shuffle_epi8(r, cw), 5), mw),
                                      _mm256_and_si256(_mm256_shuffle_epi8(r, cd), md));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))), pw);
  }
  // 8-bit: q - 128 as int8; |q - 128| (u8) times xq with q - 128's sign moved onto xq
  const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), _mm256_set1_epi8(char(0x80)));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xv, q)), ones);
}
}  // namespace

// Round each row of x to int8 blocks (permuted for `bits`) -> xq (M, n), d (M, n/QB), xs (M, G) = Σ_{c∈g} d_c Σ xq.
void q8_quantize_rows(const float* x, int64_t M, int64_t n, int64_t gs, int bits, int8_t* xq, float* d, float* xs) {
  const int QB = q8_block(bits);
  const int64_t nb = n / QB, G = (n + gs - 1) / gs;
  for (int64_t t = 0; t < M; ++t) {
    const float* xt = x + t * n;
    for (int64_t g = 0; g < G; ++g) xs[t * G + g] = 0.f;
    for (int64_t c = 0; c < nb; ++c) {
      const float* xb = xt + c * QB;
      float amax = 0.f;
      for (int j = 0; j < QB; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float dc = amax / 127.f;
      int sum = 0;
      for (int p = 0; p < QB; ++p) {
        const int v = dc > 0.f ? int(std::nearbyint(xb[q8_perm(bits, p)] / dc)) : 0;
        xq[t * n + c * QB + p] = int8_t(v);
        sum += v;
      }
      d[t * nb + c] = dc;
      xs[t * G + c * QB / gs] += dc * float(sum);
    }
  }
}

// y (M, m) for the quantized activations (xq, d, xs): rows split across threads.
template <int bits>
void q8_rows(const Layout& L, const int8_t* xq, const float* d, const float* xs, int64_t M, float* yp) {
  constexpr int QB = bits == 2 ? 64 : 32;
  constexpr int64_t bpb = QB * bits / 8;  // bytes per block
  constexpr float off = bits == 8 ? 128.f : 0.f;
  constexpr float dot_scale = bits == 3 ? 1.f / 16 : 1.f;  // block_dot<3> returns 16× the sum (exact in fp32)
  const int64_t n = L.n, nb = n / QB, G = L.G, bpg = L.gs / QB;  // blocks per group
  std::vector<uint8_t> last;  // 3-bit: a copy of the last row with 4 bytes more (block_dot loads 16 bytes)
  if (bits == 3 && L.m > 0) {
    last.assign(L.qw + (L.m - 1) * L.row_bytes, L.qw + L.m * L.row_bytes);
    last.resize(L.row_bytes + 4, 0);
  }
  constexpr int64_t TILE = 32;  // rows whose scales and zeros are unpacked together (zeros are stored row-minor)
  at::parallel_for(0, L.m, TILE, [&](int64_t begin, int64_t end) {
    std::vector<float> sf(TILE * G), zf(TILE * G);
    for (int64_t i0 = begin; i0 < end; i0 += TILE) {
      const int64_t i1 = std::min(i0 + TILE, end);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t g = 0; g < G; ++g) sf[(i - i0) * G + g] = float(L.scales[i * G + g]);
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* zr = L.qz ? L.qz + g * L.zrow_bytes : nullptr;
        for (int64_t i = i0; i < i1; ++i)
          zf[(i - i0) * G + g] = (zr ? float(code_at(zr, L.zrow_bytes, i, bits)) : float(1 << (bits - 1))) - off;
      }
      for (int64_t i = i0; i < i1; ++i) {
        const uint8_t* row = bits == 3 && i == L.m - 1 ? last.data() : L.qw + i * L.row_bytes;
        const float* si = sf.data() + (i - i0) * G;
        const float* zi = zf.data() + (i - i0) * G;
        for (int64_t t = 0; t < M; ++t) {
          const int8_t* xt = xq + t * n;
          const float* dt = d + t * nb;
          const float* xst = xs + t * G;
          __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
          float corr = 0.f;
          for (int64_t g = 0, c = 0; g < G; ++g) {
            const int64_t ce = std::min(c + bpg, nb);
            for (; c + 1 < ce; c += 2) {
              a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<bits>(row + c * bpb, xt + c * QB)),
                                   _mm256_set1_ps(si[g] * dt[c]), a0);
              a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<bits>(row + (c + 1) * bpb, xt + (c + 1) * QB)),
                                   _mm256_set1_ps(si[g] * dt[c + 1]), a1);
            }
            for (; c < ce; ++c)
              a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<bits>(row + c * bpb, xt + c * QB)),
                                   _mm256_set1_ps(si[g] * dt[c]), a0);
            corr += si[g] * zi[g] * xst[g];
          }
          yp[t * L.m + i] = hsum8_q8(_mm256_add_ps(a0, a1)) * dot_scale - corr;
        }
      }
    }
  });
}

at::Tensor gemm_q8(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor qzeros, int64_t bits, int64_t gs) {
  TORCH_CHECK(x.dim() >= 1 && x.is_floating_point(), "x: float (..., n)");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "int8-activation path: 2, 3, 4 or 8 bits");
  const auto out_dtype = x.scalar_type();
  std::vector<int64_t> out_shape = x.sizes().vec();  // (..., n) -> (..., m)
  x = x.to(at::kFloat).reshape({-1, x.size(-1)}).contiguous();
  const Layout L = make_layout(qweight, scales, qzeros, at::empty({0}, qweight.options()), x.size(1), bits, gs);
  const int QB = q8_block(L.bits);
  TORCH_CHECK(L.n % QB == 0 && L.gs % QB == 0, "int8-activation path: n and the group size must be multiples of ", QB);
  const int64_t M = x.size(0), n = L.n, nb = n / QB, G = L.G;
  std::vector<int8_t> xq(M * n);
  std::vector<float> d(M * nb), xs(M * G);
  q8_quantize_rows(x.data_ptr<float>(), M, n, L.gs, L.bits, xq.data(), d.data(), xs.data());
  at::Tensor y = at::empty({M, L.m}, x.options());
  float* yp = y.data_ptr<float>();
  if (L.bits == 4) q8_rows<4>(L, xq.data(), d.data(), xs.data(), M, yp);
  else if (L.bits == 3) q8_rows<3>(L, xq.data(), d.data(), xs.data(), M, yp);
  else if (L.bits == 2) q8_rows<2>(L, xq.data(), d.data(), xs.data(), M, yp);
  else q8_rows<8>(L, xq.data(), d.data(), xs.data(), M, yp);
  out_shape.back() = L.m;
  return (out_dtype == at::kFloat ? y : y.to(out_dtype)).view(out_shape);
}
#endif
