// Part of group_cpu.cpp (included there, not a standalone header): the AVX-512 BF16 decode path.
//
// For b ≤ 7 bits and contiguous groups of a multiple of 32 columns every 32 codes become the exact
// bf16 values 1 + q/2^b and meet x (split into 1–3 bf16 parts that sum to it exactly) in
// vdpbf16ps, 32 multiply-adds per instruction, fp32 accumulation.
#ifdef LOWBIT_BF16
// 32 codes (b <= 7 bits) of chunk c (columns 32c…32c+31, exactly 4b bytes) as the exact bf16 values
// 1 + q/2^b: the bit pattern is 0x3F80 | q << (7 - b) (q fills the top of the 7-bit mantissa), so no
// conversion instruction is needed and the offset 1 is no larger than the codes' range.
struct Unpacker32 {
  __m512i idx, shift, mask, magic; __m128i up; __mmask32 load_mask; int bits;
  explicit Unpacker32(int b) : bits(b) {
    alignas(64) uint8_t ix[64]; alignas(64) uint16_t sh[32];
    for (int k = 0; k < 32; ++k) { const int bit = k * b; ix[2 * k] = uint8_t(bit >> 3); ix[2 * k + 1] = uint8_t((bit >> 3) + 1); sh[k] = uint16_t(bit & 7); }
    idx = _mm512_load_si512(ix); shift = _mm512_load_si512(sh);
    mask = _mm512_set1_epi16(short((1 << b) - 1)); magic = _mm512_set1_epi16(0x3F80); up = _mm_cvtsi32_si128(7 - b);
    load_mask = __mmask32(4 * b >= 32 ? 0xFFFFFFFFu : (1u << (4 * b)) - 1u);
  }
  inline __m512bh codes(const uint8_t* row, int64_t c) const {
    const __m256i raw = _mm256_maskz_loadu_epi8(load_mask, row + 4 * bits * c);
    const __m512i v = _mm512_permutexvar_epi8(idx, _mm512_zextsi256_si512(raw));
    return (__m512bh)_mm512_or_si512(_mm512_sll_epi16(_mm512_and_si512(_mm512_srlv_epi16(v, shift), mask), up), magic);
  }
};

// y = sum_g s_g * (2^b sum_j (1 + q_j/2^b) x_j  -  (2^b + z_g) X_g),  X_g = sum of x over group g,
// for contiguous groups of gs % 32 == 0 columns (k = gs/32 chunks each; the last may be partial) and
// b <= 7.  x is given as S bf16 parts (x = x_0 + x_1 + x_2 exactly for fp32, S = 1 for bf16 inputs),
// so every product with the exact bf16 value 1 + q/2^b is exact; accumulation is fp32.
// R = 1 or 2 weight rows at once (row r: codes rw[r], scales sf + r*Gp, zeros zf + r*Gp), which
// shares the x loads and the loop control and gives two independent dot-product chains.
template <int S, int R>
inline void rows_dot_groups(const Unpacker32& U32, const uint8_t* const* rw, const float* sf, const float* zf,
                            int64_t Gp, int64_t G, int64_t k, int64_t nch, const uint16_t* xb, int64_t ldb,
                            const float* Xg, float* out, int64_t ldo) {
  const float p2 = float(1 << U32.bits);
  const __m512 zero = _mm512_setzero_ps();
  __m512 t0 = zero, t1 = zero;
  int64_t c = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t ce = std::min(c + k, nch);
    __m512 a0 = zero, a1 = zero, b0 = zero, b1 = zero;  // row 0: a0 (+a1 for part 2), row 1: b0 (+b1)
    for (; c < ce; ++c) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb + 32 * c);
      const __m512bh w0 = U32.codes(rw[0], c);
      a0 = _mm512_dpbf16_ps(a0, w0, x0);
      __m512bh w1;
      if (R == 2) { w1 = U32.codes(rw[1], c); b0 = _mm512_dpbf16_ps(b0, w1, x0); }
      if (S > 1) {
        const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xb + ldb + 32 * c);
        a1 = _mm512_dpbf16_ps(a1, w0, x1);
        if (R == 2) b1 = _mm512_dpbf16_ps(b1, w1, x1);
      }
      if (S > 2) {
        const __m512bh x2 = (__m512bh)_mm512_loadu_si512(xb + 2 * ldb + 32 * c);
        a0 = _mm512_dpbf16_ps(a0, w0, x2);
        if (R == 2) b0 = _mm512_dpbf16_ps(b0, w1, x2);
      }
    }
    t0 = _mm512_fmadd_ps(_mm512_set1_ps(sf[g] * p2), S > 1 ? _mm512_add_ps(a0, a1) : a0, t0);
    if (R == 2) t1 = _mm512_fmadd_ps(_mm512_set1_ps(sf[Gp + g] * p2), S > 1 ? _mm512_add_ps(b0, b1) : b0, t1);
  }
  for (int r = 0; r < R; ++r) {
    float corr = 0.f;
    for (int64_t g = 0; g < G; ++g) corr += sf[r * Gp + g] * (p2 + zf[r * Gp + g]) * Xg[g];
    out[r] = _mm512_reduce_add_ps(r == 0 ? t0 : t1) - corr;
  }
}

// x (n floats, zero-padded to npad) -> S bf16 parts (stride npad): part k = bf16(x - parts before).
inline void split_bf16(const float* x, int64_t npad, int S, uint16_t* out) {
  for (int64_t j = 0; j < npad; j += 16) {
    __m512 r = _mm512_loadu_ps(x + j);
    for (int k = 0; k < S; ++k) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(r);
      _mm256_storeu_si256((__m256i*)(out + k * npad + j), h);
      r = _mm512_sub_ps(r, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
  }
}
#endif
