// Part of group_cpu.cpp (included there, not a standalone header): the AVX2 fp32 path of the group-wise
// int kernel for CPUs without AVX-512; compiled only where LOWBIT_AVX2 is defined.
#ifdef LOWBIT_AVX2
// 8 consecutive codes occupy exactly b bytes starting at byte b*c (c = chunk of 8 columns): one 16-byte
// load (copied through a buffer at the end of a row) + broadcast to both 128-bit lanes + in-lane byte
// shuffle + per-lane variable shift + AND gives them as int32 lanes, for every width b = 1..8.
struct Unpacker8 {
  __m256i idx, shift, mask; int bits; int64_t row_bytes;
  Unpacker8(int b, int64_t rb) : bits(b), row_bytes(rb) {
    alignas(32) int8_t ix[32]; alignas(32) int32_t sh[8];
    for (int l = 0; l < 8; ++l) {
      const int bit = l * b, byte = bit >> 3;
      for (int q = 0; q < 4; ++q) ix[4 * l + q] = int8_t(-128);
      ix[4 * l] = int8_t(byte); ix[4 * l + 1] = int8_t(byte + 1);
      sh[l] = bit & 7;
    }
    idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(ix));
    shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh));
    mask = _mm256_set1_epi32((1 << b) - 1);
  }
  inline __m256 unpack(__m128i raw) const {
    const __m256i v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(raw), idx);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shift), mask));
  }
  inline __m256 codes_fast(const uint8_t* row, int64_t c) const {  // chunk c when b*c + 16 <= row_bytes
    return unpack(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + int64_t(bits) * c)));
  }
  inline __m256 codes(const uint8_t* row, int64_t c) const {  // the 8 codes of chunk c as floats, any c
    const int64_t off = int64_t(bits) * c;
    if (off + 16 <= row_bytes) return codes_fast(row, c);
    alignas(16) uint8_t tmp[16] = {0};
    std::memcpy(tmp, row + off, size_t(row_bytes - off));
    return unpack(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
};

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// One weight row dot one token x: per group two accumulators of (q - z) * x, scaled once per group.
inline float row_dot8(const Layout& L, const Unpacker8& U, const uint8_t* row, const float* sf, const float* zf,
                      const float* x) {
  const int64_t nch = L.n / 8, cpg = L.gs / 8;
  const int64_t safe = std::max<int64_t>(0, std::min(nch, (L.row_bytes - 16) / U.bits + 1));  // chunks c < safe: no overread
  __m256 tot = _mm256_setzero_ps();
  int64_t c = 0;
  for (int64_t g = 0; c < nch; ++g) {
    const int64_t ce = std::min(c + cpg, nch), cf = std::min(ce, safe);
    const __m256 z = _mm256_set1_ps(zf[g]);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; c + 1 < cf; c += 2) {
      a0 = _mm256_fmadd_ps(_mm256_sub_ps(U.codes_fast(row, c), z), _mm256_loadu_ps(x + 8 * c), a0);
      a1 = _mm256_fmadd_ps(_mm256_sub_ps(U.codes_fast(row, c + 1), z), _mm256_loadu_ps(x + 8 * c + 8), a1);
    }
    for (; c < ce; ++c) a0 = _mm256_fmadd_ps(_mm256_sub_ps(U.codes(row, c), z), _mm256_loadu_ps(x + 8 * c), a0);
    tot = _mm256_fmadd_ps(_mm256_set1_ps(sf[g]), _mm256_add_ps(a0, a1), tot);
  }
  return hsum8(tot);
}
#endif
