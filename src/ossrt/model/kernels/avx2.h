// AVX2 + FMA decode kernels (for CPUs without AVX512-BF16, e.g. AMD Zen 1-3, most Intel client
// chips). Plain functions over raw pointers, no torch: `mxfp4_cpu.cpp` dispatches to them.
//
// bf16 weights: each 16-value chunk (one 256-bit load) becomes two fp32 vectors without a
// shuffle, even values by a 16-bit left shift and odd values by masking the low half; x is
// prepared once per call in the same order (`bf16_prep_x`), so every product is exact and the
// sums are fp32, as on the AVX512-BF16 path.
//
// MXFP4 weights: E2M1 values times 2 are the integers 0..12 with a sign, so one byte shuffle
// decodes 32 of them to int8 and a sign extension to int16; x is quantized per 32-block to int16
// (`mxfp4_prep_x`: q = round(x / d), d = max|x| / 32767, values split even / odd to match the
// nibbles) and the dot products are exact 32-bit integer sums (vpmaddwd), scaled per block in
// fp32 by 2^(s-127) / 2 * d. The only approximation is x's quantization: |x - d q| <= d / 2,
// i.e. at most 2^-16 of the block's largest |x|, far below the bf16 rounding of every output.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

namespace ossrt_avx2 {

// ---- bf16 weights ---------------------------------------------------------------------------

// x [K] bf16 -> out [K] fp32, per 16 values: the 8 even ones, then the 8 odd ones. K % 16 == 0.
inline void bf16_prep_x(const uint16_t* x, int64_t K, float* out) {
  for (int64_t c = 0; c < K; c += 16)
    for (int i = 0; i < 8; ++i) {
      const uint32_t e = static_cast<uint32_t>(x[c + 2 * i]) << 16;
      const uint32_t o = static_cast<uint32_t>(x[c + 2 * i + 1]) << 16;
      std::memcpy(out + c + i, &e, 4);
      std::memcpy(out + c + 8 + i, &o, 4);
    }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// sum_d q[d] k[d] for fp32 q and bf16 k, D % 16 == 0 (two accumulator chains)
inline float dot_f32_bf16(const float* q, const uint16_t* k, int64_t D) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load_bf16x8(k + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load_bf16x8(k + d + 8), a1);
  }
  return hsum(_mm256_add_ps(a0, a1));
}

// acc[d] += e * v[d] for bf16 v, D % 8 == 0
inline void axpy_bf16(float e, const uint16_t* v, float* acc, int64_t D) {
  const __m256 ev = _mm256_set1_ps(e);
  for (int64_t d = 0; d < D; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(ev, load_bf16x8(v + d), _mm256_loadu_ps(acc + d)));
}

// One bf16 weight row w [K] against R prepared rows of x (xs + i * K): out[i] = sum w x_i.
// U chunks of 16 per step, so that each row has 2U independent accumulator chains.
template <int R, int U>
inline void bf16_dot_rows(const uint16_t* w, const float* xs, int64_t K, float* out) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 a[R][2 * U];
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < 2 * U; ++u) a[i][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16 * u));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
      for (int i = 0; i < R; ++i) {
        const float* x = xs + i * K + k + 16 * u;
        a[i][2 * u] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x), a[i][2 * u]);
        a[i][2 * u + 1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + 8), a[i][2 * u + 1]);
      }
    }
  }
  for (; k < K; k += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
    for (int i = 0; i < R; ++i) {
      a[i][0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xs + i * K + k), a[i][0]);
      a[i][1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xs + i * K + k + 8), a[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    __m256 s = a[i][0];
    for (int u = 1; u < 2 * U; ++u) s = _mm256_add_ps(s, a[i][u]);
    out[i] = hsum(s);
  }
}

// out[i] = w . x_i for M prepared rows (any M), in groups of at most 4 rows per pass over w.
inline void bf16_dot(const uint16_t* w, const float* xs, int64_t K, int64_t M, float* out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) bf16_dot_rows<4, 1>(w, xs + m * K, K, out + m);
  switch (M - m) {
    case 3: bf16_dot_rows<3, 1>(w, xs + m * K, K, out + m); break;
    case 2: bf16_dot_rows<2, 2>(w, xs + m * K, K, out + m); break;
    case 1: bf16_dot_rows<1, 4>(w, xs + m * K, K, out + m); break;
    default: break;
  }
}

// ---- MXFP4 weights ----------------------------------------------------------------------------

// Prepared x of K values (G = K / 32 blocks): int16 q [K] followed by G fp32 scales d;
// `mxfp4_prep_len` uint16 words in all. q is laid out for `mxfp4_dot` in units of two blocks
// (a, b): 4 vectors of [8 values of a | 8 of b], vector t holding quarter t of both blocks:
// t = 0, 1 the even values j = 0..7, 8..15 (x[2j]), t = 2, 3 the odd ones (x[2j + 1]), the
// order in which the decoded nibbles come out. Blocks 8c..8c+7 of each whole group of 8 form
// the units (8c + i, 8c + 4 + i), i = 0..3, so that the sums come out in block order; the
// blocks after the last whole group pair up in turn (a lone last block: 4 x 8 values).
inline int64_t mxfp4_prep_len(int64_t K) { return K + 2 * (K / 32); }

// block g -> (its unit, its lane in the unit, lanes in the unit)
inline void mxfp4_unit_of(int64_t g, int64_t G, int64_t& unit, int64_t& lane, int64_t& lanes) {
  const int64_t whole = G / 8 * 8;
  if (g < whole) {
    unit = g / 8 * 4 + g % 4, lane = g % 8 / 4, lanes = 2;
  } else {
    unit = (whole + (g - whole) / 2 * 2) / 2, lane = (g - whole) % 2;
    lanes = (g == G - 1 && (G - whole) % 2) ? 1 : 2;
  }
}

inline void mxfp4_prep_x(const uint16_t* x, int64_t K, uint16_t* out) {
  const int64_t G = K / 32;
  int16_t* q = reinterpret_cast<int16_t*>(out);
  for (int64_t g = 0; g < G; ++g) {
    float v[32], amax = 0.f;
    for (int j = 0; j < 32; ++j) {
      const uint32_t u = static_cast<uint32_t>(x[g * 32 + j]) << 16;
      std::memcpy(v + j, &u, 4);
      amax = std::fmax(amax, std::fabs(v[j]));
    }
    const bool finite = std::isfinite(amax);  // inf / NaN in the block: d = NaN, as the sum
    const float d = finite ? amax / 32767.f : NAN;
    const float inv = (finite && amax > 0.f) ? 32767.f / amax : 0.f;
    int64_t unit, lane, lanes;
    mxfp4_unit_of(g, G, unit, lane, lanes);
    for (int t = 0; t < 4; ++t)
      for (int i = 0; i < 8; ++i) {
        const int j = 8 * (t % 2) + i;  // the j-th even (t < 2) or odd value
        const float r = std::nearbyint(v[2 * j + t / 2] * inv);
        q[unit * 64 + t * 8 * lanes + lane * 8 + i] =
            static_cast<int16_t>(std::fmin(32767.f, std::fmax(-32767.f, r)));
      }
    std::memcpy(out + K + 2 * g, &d, 4);
  }
}

// 2 * E2M1 as int8, indexed by the nibble
inline __m256i e2m1x2_lut() {
  return _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                          0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
}

// The largest scale byte of a row (0 if none), or -1 if any is 255 (a NaN block: the row's dot
// product is NaN whatever x is).
inline int mxfp4_row_max_scale(const uint8_t* s, int64_t G) {
  int64_t g = 0;
  __m256i mv = _mm256_setzero_si256(), nan = _mm256_setzero_si256();
  const __m256i all = _mm256_set1_epi8(-1);
  for (; g + 32 <= G; g += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g));
    mv = _mm256_max_epu8(mv, v);
    nan = _mm256_or_si256(nan, _mm256_cmpeq_epi8(v, all));
  }
  if (g < G && G >= 32) {  // the last 32 bytes, overlapping the ones already seen
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + G - 32));
    mv = _mm256_max_epu8(mv, v);
    nan = _mm256_or_si256(nan, _mm256_cmpeq_epi8(v, all));
    g = G;
  }
  if (!_mm256_testz_si256(nan, nan)) return -1;
  __m128i m = _mm_max_epu8(_mm256_castsi256_si128(mv), _mm256_extracti128_si256(mv, 1));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
  int r = _mm_cvtsi128_si32(m) & 0xFF;
  for (; g < G; ++g) {
    if (s[g] == 255) return -1;
    r = s[g] > r ? s[g] : r;
  }
  return r;
}

// The factor of one block against x: 2^(s - m) * d / 512 (m: the row's largest scale byte,
// s != 255; the 1/512 undoes the table's factor 2 and the weights' place in the high byte of
// each 16-bit word, x 256). Scaling by 2^(m - 127) once per row, last, keeps these factors
// normal fp32 even for scale byte 0; a block whose scale is below 2^-117 of the row's largest
// counts as zero.
// 2^e for -149 <= e <= 127 (denormal below -126), built from its bits: std::ldexp is a libm
// call, and K = 2,880 leaves two blocks per row to the scalar tail (~10% of a row's time).
inline float pow2i(int e) {
  const uint32_t u = e >= -126 ? static_cast<uint32_t>(e + 127) << 23
                               : (e >= -149 ? 1u << (e + 149) : 0u);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float mxfp4_factor(uint8_t s, int m, float d) {
  const int ex = s + 118 - m;
  return (ex > 0 ? pow2i(ex - 127) : 0.f) * d;
}

// The same for 8 blocks (scale bytes s[0..7], x scales d[0..7]), in block order.
inline __m256 mxfp4_factors8(const uint8_t* s, __m256i bias, const float* d) {
  const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
  const __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_max_epi32(_mm256_add_epi32(e, bias), _mm256_setzero_si256()), 23));
  return _mm256_mul_ps(f, _mm256_loadu_ps(d));
}

// Two blocks' integer dot products (block a's 16 bytes in the low 128 bits of v: 4 partial
// sums; block b's in the high 128 bits): weights decoded to int8 by one byte shuffle, placed in
// the high byte of 16-bit words (so x 256: |w| <= 12 * 256, four vpmaddwd sums stay below
// 2^30), times x by vpmaddwd.
inline __m256i mxfp4_pair(__m256i v, const __m256i* x, __m256i lut, __m256i low4) {
  const __m256i we = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
  const __m256i wo = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
  const __m256i z = _mm256_setzero_si256();
  __m256i p = _mm256_madd_epi16(_mm256_unpacklo_epi8(z, we), _mm256_loadu_si256(x));
  p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_unpackhi_epi8(z, we), _mm256_loadu_si256(x + 1)));
  p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_unpacklo_epi8(z, wo), _mm256_loadu_si256(x + 2)));
  return _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_unpackhi_epi8(z, wo), _mm256_loadu_si256(x + 3)));
}

// blocks a (low 128 bits) and b (high) of a packed row
inline __m256i mxfp4_load2(const uint8_t* a, const uint8_t* b) {
  return _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1);
}

// One packed row (G blocks: brow [G, 16] bytes, srow [G] scale bytes) against one prepared x.
// Per 8 blocks, two rounds of vphaddd leave one int32 per block, in block order, scaled by its
// factor (exact integer sums, fp32 from there on).
inline float mxfp4_dot(const uint8_t* brow, const uint8_t* srow, int64_t G, const uint16_t* xprep,
                       int64_t K) {
  const __m256i lut = e2m1x2_lut(), low4 = _mm256_set1_epi8(0x0F);
  const __m256i* xq = reinterpret_cast<const __m256i*>(xprep);
  const float* dx = reinterpret_cast<const float*>(xprep + K);
  const int m = mxfp4_row_max_scale(srow, G);
  if (m < 0) return NAN;
  const __m256i bias = _mm256_set1_epi32(118 - m);
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const uint8_t* b = brow + g * 16;
    const __m256i* x = xq + g * 2;
    const __m256i h01 = _mm256_hadd_epi32(mxfp4_pair(mxfp4_load2(b, b + 64), x, lut, low4),
                                          mxfp4_pair(mxfp4_load2(b + 16, b + 80), x + 4, lut, low4));
    const __m256i h23 = _mm256_hadd_epi32(mxfp4_pair(mxfp4_load2(b + 32, b + 96), x + 8, lut, low4),
                                          mxfp4_pair(mxfp4_load2(b + 48, b + 112), x + 12, lut, low4));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(h01, h23)),
                          mxfp4_factors8(srow + g, bias, dx + g), acc);
  }
  float total = hsum(acc);
  for (; g + 2 <= G; g += 2) {
    const __m256i p = mxfp4_pair(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(brow + g * 16)), xq + g * 2, lut, low4);
    const __m128i lo = _mm256_castsi256_si128(p), hi = _mm256_extracti128_si256(p, 1);
    __m128i h = _mm_hadd_epi32(lo, hi);
    h = _mm_hadd_epi32(h, h);  // [block g, block g + 1, ...]
    total += static_cast<float>(_mm_cvtsi128_si32(h)) * mxfp4_factor(srow[g], m, dx[g]) +
             static_cast<float>(_mm_extract_epi32(h, 1)) * mxfp4_factor(srow[g + 1], m, dx[g + 1]);
  }
  if (g < G) {  // a lone last block, 128 bits wide
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(brow + g * 16));
    const __m128i l4 = _mm_set1_epi8(0x0F), lut128 = _mm256_castsi256_si128(lut);
    const __m128i z = _mm_setzero_si128();
    const __m128i we = _mm_shuffle_epi8(lut128, _mm_and_si128(v, l4));
    const __m128i wo = _mm_shuffle_epi8(lut128, _mm_and_si128(_mm_srli_epi16(v, 4), l4));
    const __m128i* x = reinterpret_cast<const __m128i*>(xq + g * 2);
    __m128i p = _mm_madd_epi16(_mm_unpacklo_epi8(z, we), _mm_loadu_si128(x));
    p = _mm_add_epi32(p, _mm_madd_epi16(_mm_unpackhi_epi8(z, we), _mm_loadu_si128(x + 1)));
    p = _mm_add_epi32(p, _mm_madd_epi16(_mm_unpacklo_epi8(z, wo), _mm_loadu_si128(x + 2)));
    p = _mm_add_epi32(p, _mm_madd_epi16(_mm_unpackhi_epi8(z, wo), _mm_loadu_si128(x + 3)));
    p = _mm_hadd_epi32(p, p);
    p = _mm_hadd_epi32(p, p);
    total += static_cast<float>(_mm_cvtsi128_si32(p)) * mxfp4_factor(srow[g], m, dx[g]);
  }
  return total * pow2i(m - 127);
}

}  // namespace ossrt_avx2
