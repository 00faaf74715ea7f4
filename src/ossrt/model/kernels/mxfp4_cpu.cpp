// MXFP4 linear layer for the CPU, reading the packed expert weights directly.
//
// y[m, n] = bias[n] + sum_g 2^(scales[n, g] - 127) * sum_{j<32} e2m1(w[n, g, j]) * x[m, 32 g + j]
// where w[n, g, 2k] is the low nibble of blocks[n, g, k] and w[n, g, 2k+1] its high nibble.
// Shapes: x [M, K] float32, blocks [N, K/32, 16] uint8, scales [N, K/32] uint8, bias [N] f32.
// Each weight block is decoded once per call and used for all M rows of x, so the cost is one
// pass over the packed bytes: the decode regime (small M) is bound by memory bandwidth.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include "bf16.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)
#define OSSRT_AVX2 1  // no AVX512-BF16: the AVX2 + FMA kernels of avx2.h
#include "avx2.h"
#endif
#ifndef OSSRT_PF
#define OSSRT_PF 2048  // bytes ahead in the packed MXFP4 rows; measured 1-2 KiB best here
#endif
#ifndef OSSRT_PF_BF16
#define OSSRT_PF_BF16 4096  // bytes ahead in the bf16 weight rows (measured)

#endif

static const float kE2M1[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

torch::Tensor mxfp4_linear(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales,
                           c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [M, K] float32");
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kUInt8,
              "blocks and scales must be uint8");
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0), G = blocks.size(1);
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == 16 && G * 32 == K, "blocks must be [N, K/32, 16]");
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G, "scales must be [N, K/32]");
  x = x.contiguous();
  blocks = blocks.contiguous();
  scales = scales.contiguous();
  // x de-interleaved per block: xe[m, g, k] = x[m, 32 g + 2k], xo[m, g, k] = x[m, 32 g + 2k + 1]
  auto xd = x.view({M, G, 16, 2}).permute({3, 0, 1, 2}).contiguous();  // [2, M, G, 16]
  const float* xe = xd.data_ptr<float>();
  const float* xo = xe + M * G * 16;
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  const float* biasp = bias.has_value() ? bias->contiguous().data_ptr<float>() : nullptr;
  float scale_of[256];
  for (int s = 0; s < 256; ++s) scale_of[s] = s == 255 ? NAN : std::ldexp(1.0f, s - 127);

  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<float> acc(M);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint8_t* brow = bp + n * G * 16;
      const uint8_t* srow = sp + n * G;
#if defined(__AVX512F__)
      const __m512 lut = _mm512_loadu_ps(kE2M1);
      const __m512i low4 = _mm512_set1_epi32(15);
      // Up to 8 rows of x accumulate in registers; more rows loop over chunks of 8.
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t mc = std::min<int64_t>(8, M - m0);
        __m512 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(brow + g * 16));
          __m512i idx = _mm512_cvtepu8_epi32(bytes);
          __m512 s = _mm512_set1_ps(scale_of[srow[g]]);
          __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(idx, low4), lut), s);
          __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), lut), s);
          for (int64_t i = 0; i < mc; ++i) {
            const int64_t off = ((m0 + i) * G + g) * 16;
            a[i] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xe + off), a[i]);
            a[i] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xo + off), a[i]);
          }
        }
        for (int64_t i = 0; i < mc; ++i) acc[m0 + i] = _mm512_reduce_add_ps(a[i]);
      }
#else
      for (int64_t g = 0; g < G; ++g) {
        float lo[16], hi[16];
        const float s = scale_of[srow[g]];
        for (int k = 0; k < 16; ++k) {
          const uint8_t b = brow[g * 16 + k];
          lo[k] = kE2M1[b & 15] * s;
          hi[k] = kE2M1[b >> 4] * s;
        }
        for (int64_t m = 0; m < M; ++m) {
          const float* e = xe + (m * G + g) * 16;
          const float* o = xo + (m * G + g) * 16;
          float t = 0.f;
          for (int k = 0; k < 16; ++k) t += lo[k] * e[k] + hi[k] * o[k];
          acc[m] += t;
        }
      }
#endif
      const float b = biasp ? biasp[n] : 0.f;
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = acc[m] + b;
    }
  });
  return y;
}

// bf16 linear layer for a few rows: y[m, n] = bias[n] + sum_k w[n, k] x[m, k], fp32 accumulation.
// x [M, K] bf16, w [N, K] bf16 (row-major), bias [N] or none; returns [M, N] float32.
// With AVX512-BF16 each 32-wide step is one dot-product instruction per row of x, and each weight
// row is read once for up to 8 rows of x (R accumulator pairs in registers: R is a template
// argument so that they never spill), so reading w dominates (bandwidth-bound); elsewhere it
// falls back to at::linear.
#if defined(__AVX512BF16__)
template <int R>
static inline void bf16_row_dot(const uint16_t* wr, const uint16_t* x, int64_t K, float* out) {
  __m512 a0[R], a1[R];
  for (int i = 0; i < R; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(wr + k) + OSSRT_PF_BF16, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wr + k) + OSSRT_PF_BF16 + 64, _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
    for (int i = 0; i < R; ++i) {
      a0[i] = _mm512_dpbf16_ps(a0[i], w0, (__m512bh)_mm512_loadu_si512(x + i * K + k));
      a1[i] = _mm512_dpbf16_ps(a1[i], w1, (__m512bh)_mm512_loadu_si512(x + i * K + k + 32));
    }
  }
  for (; k < K; k += 32) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);
    for (int i = 0; i < R; ++i)
      a0[i] = _mm512_dpbf16_ps(a0[i], w0, (__m512bh)_mm512_loadu_si512(x + i * K + k));
  }
  for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
}

// NW consecutive weight rows (w, w + K, ...) against R rows of x given interleaved per 32-wide
// step (xi [K/32][R][32]: the R rows' values k..k+31 lie together, all in L1 for R <= 4) ->
// out[r * R + i] = row r . x row i. One accumulator per (r, i), summed in k order, so each result
// is the same whatever NW and R are. While the tile is read, `ahead` (a later tile, laid out as
// one span) is prefetched into L2, nl lines per step: with the weights streamed from memory
// and ~NW*R dot products per line, the hardware prefetcher alone leaves the loads waiting.
template <int NW, int R>
static inline void bf16_tile(const uint16_t* w, const uint16_t* xi, int64_t K, float* out,
                             const char* ahead, int nl) {
  __m512 a[NW][R];
  for (int r = 0; r < NW; ++r)
    for (int i = 0; i < R; ++i) a[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0, s = 0; k < K; k += 32, ++s) {
    for (int j = 0; j < nl; ++j) _mm_prefetch(ahead + (s * nl + j) * 64, _MM_HINT_T1);
    __m512bh wv[NW];
    for (int r = 0; r < NW; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    const uint16_t* xk = xi + k * R;
    for (int i = 0; i < R; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xk + i * 32);
      for (int r = 0; r < NW; ++r) a[r][i] = _mm512_dpbf16_ps(a[r][i], wv[r], xv);
    }
  }
  for (int r = 0; r < NW; ++r)
    for (int i = 0; i < R; ++i) out[r * R + i] = _mm512_reduce_add_ps(a[r][i]);
}

#endif

// Where bf16_linear writes y[i] = v: fp32, or rounded to bf16 (as torch's .to(bfloat16)).
struct LinOut {
  float* f;
  uint16_t* h;
  void set(int64_t i, float v) const {
    if (h != nullptr) h[i] = f32_to_bf16(v);
    else f[i] = v;
  }
};

#if defined(__AVX512BF16__)
// One tile of NW weight rows against all M rows of x, in groups of 4 (xi: one interleaved
// [K/32][R][32] block per group, R = min(4, rows left)) -> y[m, n0 + r].
template <int NW>
static inline void bf16_tile_rows(const uint16_t* w, const uint16_t* xi, int64_t M, int64_t K,
                                  int64_t N, int64_t n0, const float* bp, const LinOut& y,
                                  const char* ahead, int nl) {
  float o[NW * 4];
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int R = static_cast<int>(std::min<int64_t>(4, M - m0));
    const uint16_t* xg = xi + m0 * K;
    const int pl = m0 == 0 ? nl : 0;  // the next tile is prefetched once, by the first group
    switch (R) {
      case 1: bf16_tile<NW, 1>(w, xg, K, o, ahead, pl); break;
      case 2: bf16_tile<NW, 2>(w, xg, K, o, ahead, pl); break;
      case 3: bf16_tile<NW, 3>(w, xg, K, o, ahead, pl); break;
      default: bf16_tile<NW, 4>(w, xg, K, o, ahead, pl); break;
    }
    for (int r = 0; r < NW; ++r)
      for (int i = 0; i < R; ++i)
        y.set((m0 + i) * N + n0 + r, o[r * R + i] + (bp ? bp[n0 + r] : 0.f));
  }
}
#endif

// y = x w^T + bias in fp32, or (bf16_out) rounded to bf16 as it is written.
static torch::Tensor bf16_linear_impl(torch::Tensor x, torch::Tensor w,
                                      c10::optional<torch::Tensor> bias, bool bf16_out) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16,
              "x and w must be bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  x = x.contiguous();
  w = w.contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  const LinOut out{bf16_out ? nullptr : y.data_ptr<float>(),
                   bf16_out ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr};
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  torch::Tensor b32;
  const float* bp = nullptr;
  if (bias.has_value()) {
    b32 = bias->to(torch::kFloat32).contiguous();
    bp = b32.data_ptr<float>();
  }
#if defined(__AVX512BF16__)
  if (K % 32 == 0) {
    if (M >= 3) {  // tiles of 4 weight rows x groups of up to 4 rows of x (bf16_tile)
      std::vector<uint16_t> xi(M * K);  // per group of 4 rows: [K/32][R][32]
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t R = std::min<int64_t>(4, M - m0);
        for (int64_t i = 0; i < R; ++i)
          for (int64_t k = 0; k < K; k += 32)
            std::memcpy(&xi[m0 * K + k * R + i * 32], xp + (m0 + i) * K + k, 64);
      }
      // a tile is 4 rows x K bf16 = K/8 cache lines, read in K/32 steps: 4 lines a step
      const int64_t T = N / 4, nl = 4;
      at::parallel_for(0, T + (N % 4 ? 1 : 0), 4, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n0 = 4 * t;
          const char* ahead = reinterpret_cast<const char*>(wp + std::min(n0 + 8, N - 1) * K);
          const int pl = n0 + 8 + 4 <= N ? static_cast<int>(nl) : 0;
          const uint16_t* w = wp + n0 * K;
          switch (std::min<int64_t>(4, N - n0)) {
            case 1: bf16_tile_rows<1>(w, xi.data(), M, K, N, n0, bp, out, ahead, 0); break;
            case 2: bf16_tile_rows<2>(w, xi.data(), M, K, N, n0, bp, out, ahead, 0); break;
            case 3: bf16_tile_rows<3>(w, xi.data(), M, K, N, n0, bp, out, ahead, 0); break;
            default: bf16_tile_rows<4>(w, xi.data(), M, K, N, n0, bp, out, ahead, pl); break;
          }
        }
      });
      return y;
    }
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      float dot[8];
      for (int64_t n = n0; n < n1; ++n) {
        const uint16_t* wr = wp + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
          const int64_t mc = std::min<int64_t>(8, M - m0);
          const uint16_t* xr = xp + m0 * K;
          switch (mc) {
            case 1: bf16_row_dot<1>(wr, xr, K, dot); break;
            case 2: bf16_row_dot<2>(wr, xr, K, dot); break;
            case 3: bf16_row_dot<3>(wr, xr, K, dot); break;
            case 4: bf16_row_dot<4>(wr, xr, K, dot); break;
            case 5: bf16_row_dot<5>(wr, xr, K, dot); break;
            case 6: bf16_row_dot<6>(wr, xr, K, dot); break;
            case 7: bf16_row_dot<7>(wr, xr, K, dot); break;
            default: bf16_row_dot<8>(wr, xr, K, dot); break;
          }
          for (int64_t i = 0; i < mc; ++i) out.set((m0 + i) * N + n, dot[i] + (bp ? bp[n] : 0.f));
        }
      }
    });
    return y;
  }
#endif
#if defined(OSSRT_AVX2)
  if (K % 16 == 0) {  // x converted to fp32 once, each weight row read once per 4 rows of x
    std::vector<float> xs(M * K);
    for (int64_t m = 0; m < M; ++m) ossrt_avx2::bf16_prep_x(xp + m * K, K, xs.data() + m * K);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      std::vector<float> dot(M);
      for (int64_t n = n0; n < n1; ++n) {
        ossrt_avx2::bf16_dot(wp + n * K, xs.data(), K, M, dot.data());
        for (int64_t m = 0; m < M; ++m) out.set(m * N + n, dot[m] + (bp ? bp[n] : 0.f));
      }
    });
    return y;
  }
#endif
  auto y32 = at::linear(x.to(torch::kFloat32), w.to(torch::kFloat32),
                        bias.has_value() ? c10::optional<torch::Tensor>(bias->to(torch::kFloat32))
                                         : c10::nullopt);
  return bf16_out ? y32.to(torch::kBFloat16) : y32;
}

torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  return bf16_linear_impl(x, w, bias, false);
}

// `bf16_linear(x, w, bias)` rounded to bf16 (what `layers.linear` returns for bf16 x).
torch::Tensor bf16_linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  return bf16_linear_impl(x, w, bias, true);
}

// ---- bf16 activations: the decode path ---------------------------------------------------------
// Same y = x W^T + bias for MXFP4 W, with x in bfloat16 (the model's compute dtype). Blocks are
// decoded straight to bf16 (one vpermw through the E2M1 table per 32 weights), dotted with x by
// vdpbf16ps (fp32 accumulation), then scaled by 2^(s-127) in fp32: the E2M1 values are exact in
// bf16 and the scale never enters a bf16 number, so there is no rounding beyond fp32
// accumulation. Each dot-product chain starts from zero per step of 4 blocks, so the FMA
// latency stays off the critical path.
static float g_scale_of[256];
static bool g_scale_init = [] {
  for (int s = 0; s < 256; ++s) g_scale_of[s] = s == 255 ? NAN : std::ldexp(1.0f, s - 127);
  return true;
}();


// x in the order the four-block step reads it (`wrows_dot4`, `tile_dot4`): per 4 blocks (128
// values), out[32 t + w] = x[4 w + t]; values past the last multiple of 4 blocks are left
// unwritten.
static inline void permute_x4(const uint16_t* x, int64_t G, uint16_t* out) {
  for (int64_t c = 0; c < G / 4; ++c)
    for (int t = 0; t < 4; ++t)
      for (int w = 0; w < 32; ++w) out[c * 128 + t * 32 + w] = x[c * 128 + 4 * w + t];
}

// x prepared for `row_dot` (the `xperm` argument of the MXFP4 kernels), per ISA: permuted
// bf16 (AVX512-BF16), int16 with block scales (AVX2), unused (scalar). prep_len(K) words per row.
static inline int64_t prep_len(int64_t K) {
#if defined(OSSRT_AVX2)
  return ossrt_avx2::mxfp4_prep_len(K);
#else
  return K;
#endif
}

static inline void prep_x(const uint16_t* x, int64_t G, uint16_t* out) {
#if defined(OSSRT_AVX2)
  ossrt_avx2::mxfp4_prep_x(x, G * 32, out);
#else
  permute_x4(x, G, out);
#endif
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define OSSRT_BF16_MXFP4 1
static inline __m512i decode_block_bf16(const uint8_t* b16, __m512i lut) {
  // dword k = byte k; word 2k = its low nibble, word 2k+1 its high nibble: weight order.
  __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b16)));
  __m512i nib = _mm512_ternarylogic_epi32(idx, _mm512_slli_epi32(idx, 12),
                                          _mm512_set1_epi32(0x000F000F), 0xA8);  // (a|b)&c
  return _mm512_permutexvar_epi16(nib, lut);
}

static inline __m512i e2m1_bf16_lut() {
  alignas(64) static const uint16_t t[32] = {
      0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
      0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0,
      0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,  // repeated: index bit 4
      0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0}; // is ignored
  return _mm512_load_si512(t);
}

// Four blocks (64 packed bytes) per step, with no byte shuffles: read as 32 16-bit words, word w
// holds nibbles 4w..4w+3 of the row in its bits 0-3, 4-7, 8-11, 12-15. Shifting by 0, 4, 8, 12
// and one vpermw each (the table repeats after 16 entries, so the bits above the nibble do not
// matter) gives four vectors of 32 bf16 weights; vector t, word w is weight 4w + t. Word w lies
// in block w/8, so 128-bit lane L of every vector belongs to block L, and one vector of four
// scales (one per lane) scales the sum of the four dot products.
// x must be given permuted to match (`permute_x4`): per 4 blocks, x'[32 t + w] = x[4 w + t].
// Blocks past the last multiple of 4 use `decode_block_bf16`.

static inline __m512 scales4(const uint8_t* s) {  // 2^(s-127) per lane; s=0: 2^-127, 255: NaN
  int32_t raw;
  std::memcpy(&raw, s, 4);
  const __m128i e = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(raw));
  __m128 f = _mm_castsi128_ps(_mm_slli_epi32(e, 23));
  f = _mm_mask_blend_ps(_mm_cmpeq_epi32_mask(e, _mm_setzero_si128()), f,
                        _mm_set1_ps(g_scale_of[0]));
  f = _mm_mask_blend_ps(_mm_cmpeq_epi32_mask(e, _mm_set1_epi32(255)), f, _mm_set1_ps(NAN));
  return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                               _mm512_castps128_ps512(f));
}

// 2^(s-127) for the G scale bytes of a row, 16 at a time (s=0: 2^-127, 255: NaN) -> out [G].
static inline void row_scales(const uint8_t* s, int64_t G, float* out) {
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 m = G - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - g)) - 1);
    const __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, s + g));
    __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
    f = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), f,
                             _mm512_set1_ps(g_scale_of[0]));
    f = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255)), f,
                             _mm512_set1_ps(NAN));
    _mm512_mask_storeu_ps(out + g, m, f);
  }
}

// One packed row against one x: per step of 4 blocks the decode below, 4 dot products and the
// scale, alternately into two accumulators (two chains); the tail blocks one at a time. The
// reference arithmetic of the multi-row kernels (`wrows_dot4`, `tile_dot4`).
static inline float row_dot4(const uint8_t* brow, const uint8_t* srow, int64_t G,
                             const uint16_t* x, const uint16_t* xperm, __m512i lut) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 a0 = zero, a1 = zero;
  const int64_t C = G / 4;
  float sf[G];  // G <= a few hundred (K / 32)
  row_scales(srow, G, sf);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int64_t c = 0; c < C; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(brow + c * 64 + OSSRT_PF), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(brow + c * 64);
    const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(v, lut);
    const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
    const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut);
    const __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut);
    const __m512 sv = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(sf + 4 * c)));
    const uint16_t* xc = xperm + c * 128;
    __m512 p = _mm512_dpbf16_ps(zero, w0, (__m512bh)_mm512_loadu_si512(xc));
    p = _mm512_dpbf16_ps(p, w1, (__m512bh)_mm512_loadu_si512(xc + 32));
    p = _mm512_dpbf16_ps(p, w2, (__m512bh)_mm512_loadu_si512(xc + 64));
    p = _mm512_dpbf16_ps(p, w3, (__m512bh)_mm512_loadu_si512(xc + 96));
    if (c & 1) a1 = _mm512_fmadd_ps(p, sv, a1);
    else a0 = _mm512_fmadd_ps(p, sv, a0);
  }
  for (int64_t g = 4 * C; g < G; ++g) {
    const __m512bh wb = (__m512bh)decode_block_bf16(brow + g * 16, lut);
    const __m512 p = _mm512_dpbf16_ps(zero, wb, (__m512bh)_mm512_loadu_si512(x + g * 32));
    a0 = _mm512_fmadd_ps(p, _mm512_set1_ps(sf[g]), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// NR consecutive packed rows (brow, brow + G*16, ...; scales likewise) against one x: each x
// vector is loaded once per step for all NR rows, which leaves the decode and the dot products
// as the cost (measured in L2: 2.68 ns per 64 packed bytes for 1 row, 2.34 for 4). Per row the
// arithmetic is exactly `row_dot4`'s, so results do not depend on NR.
template <int NR>
static inline void wrows_dot4(const uint8_t* brow, const uint8_t* srow, int64_t G,
                              const uint16_t* x, const uint16_t* xperm, __m512i lut, float* out) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) a0[r] = a1[r] = zero;
  const int64_t C = G / 4, RB = G * 16;
  // the rows after these NR lie next in memory: prefetch three groups on, NR lines a step,
  // as one sequential stream
  const uint8_t* ahead = brow + 3 * NR * RB;
  float sf[NR][G];
  for (int r = 0; r < NR; ++r) row_scales(srow + r * G, G, sf[r]);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int64_t c = 0; c < C; ++c) {
    const uint16_t* xc = xperm + c * 128;
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xc);
    const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xc + 32);
    const __m512bh x2 = (__m512bh)_mm512_loadu_si512(xc + 64);
    const __m512bh x3 = (__m512bh)_mm512_loadu_si512(xc + 96);
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b = brow + r * RB + c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(ahead + c * NR * 64 + r * 64), _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512(b);
      const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(v, lut);
      const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
      const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut);
      const __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut);
      const __m512 sv = _mm512_permutexvar_ps(spread,
                                              _mm512_castps128_ps512(_mm_loadu_ps(sf[r] + 4 * c)));
      __m512 p = _mm512_dpbf16_ps(zero, w0, x0);
      p = _mm512_dpbf16_ps(p, w1, x1);
      p = _mm512_dpbf16_ps(p, w2, x2);
      p = _mm512_dpbf16_ps(p, w3, x3);
      if (c & 1) a1[r] = _mm512_fmadd_ps(p, sv, a1[r]);
      else a0[r] = _mm512_fmadd_ps(p, sv, a0[r]);
    }
  }
  for (int64_t g = 4 * C; g < G; ++g) {
    const __m512bh xb = (__m512bh)_mm512_loadu_si512(x + g * 32);
    for (int r = 0; r < NR; ++r) {
      const __m512bh wb = (__m512bh)decode_block_bf16(brow + r * RB + g * 16, lut);
      const __m512 p = _mm512_dpbf16_ps(zero, wb, xb);
      a0[r] = _mm512_fmadd_ps(p, _mm512_set1_ps(sf[r][g]), a0[r]);
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}

// NW consecutive packed rows (brow, brow + G*16, ...; scales likewise) against R rows of x:
// out[r * R + i] = row r . x[i]. Each step of 4 blocks is decoded once per row and dotted with
// every x; per (row, x) the arithmetic is exactly `row_dot4`'s, so results depend on
// neither NW nor R. The rows after these lie next in memory: three tiles on is prefetched into
// L2, NW lines a step, as one sequential stream (the hardware prefetcher alone leaves the
// loads waiting). Cost per 64 packed bytes and core, in L2 on Zen 4: ~8.5 cycles for one x (the
// decode's 3 shifts and 4 vpermw), ~4 more per further x (its 4 vdpbf16ps).
template <int NW, int R>
static inline void tile_dot4(const uint8_t* brow, const uint8_t* srow, int64_t G,
                             const uint16_t* const* x, const uint16_t* const* xperm, __m512i lut,
                             float* out) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 a0[NW][R], a1[NW][R];
  for (int r = 0; r < NW; ++r)
    for (int i = 0; i < R; ++i) a0[r][i] = a1[r][i] = zero;
  const int64_t C = G / 4, RB = G * 16;
  const uint8_t* ahead = brow + 3 * NW * RB;
  float sfv[NW * G];  // G <= a few hundred (K / 32)
  float* sf = sfv;  // row r's scales at sf + r * G
  for (int r = 0; r < NW; ++r) row_scales(srow + r * G, G, sf + r * G);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  // step c of 4 blocks into acc (even steps into a0, odd into a1: two chains per dot product)
  auto step = [&](int64_t c, __m512 (&acc)[NW][R]) {
    for (int r = 0; r < NW; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + c * NW * 64 + r * 64), _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512(brow + r * RB + c * 64);
      const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(v, lut);
      const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
      const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut);
      const __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut);
      const __m512 s4 = _mm512_castps128_ps512(_mm_loadu_ps(sf + r * G + 4 * c));
      const __m512 sv = _mm512_permutexvar_ps(spread, s4);
      for (int i = 0; i < R; ++i) {
        const uint16_t* xc = xperm[i] + c * 128;
        auto xv = [&](int k) { return (__m512bh)_mm512_loadu_si512(xc + 32 * k); };
        __m512 p = _mm512_dpbf16_ps(zero, w0, xv(0));
        p = _mm512_dpbf16_ps(p, w1, xv(1));
        p = _mm512_dpbf16_ps(p, w2, xv(2));
        p = _mm512_dpbf16_ps(p, w3, xv(3));
        acc[r][i] = _mm512_fmadd_ps(p, sv, acc[r][i]);
      }
    }
  };
  int64_t c = 0;
  for (; c + 1 < C; c += 2) {
    step(c, a0);
    step(c + 1, a1);
  }
  if (c < C) step(c, a0);
  for (int64_t g = 4 * C; g < G; ++g)
    for (int r = 0; r < NW; ++r) {
      const __m512bh wb = (__m512bh)decode_block_bf16(brow + r * RB + g * 16, lut);
      const __m512 s = _mm512_set1_ps(sf[r * G + g]);
      for (int i = 0; i < R; ++i) {
        const __m512 p = _mm512_dpbf16_ps(zero, wb, (__m512bh)_mm512_loadu_si512(x[i] + g * 32));
        a0[r][i] = _mm512_fmadd_ps(p, s, a0[r][i]);
      }
    }
  for (int r = 0; r < NW; ++r)
    for (int i = 0; i < R; ++i)
      out[r * R + i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r][i], a1[r][i]));
}

// out[r * M + i] = row r . x[i] for NW consecutive rows and M rows of x, x in groups of up to 4.
template <int NW>
static inline void tile_group(const uint8_t* brow, const uint8_t* srow, int64_t G, int64_t M,
                              const uint16_t* const* x, const uint16_t* const* xperm, __m512i lut,
                              float* out) {
  float t[NW * 4];
  for (int64_t i = 0; i < M; i += 4) {
    const int64_t R = std::min<int64_t>(4, M - i);
    switch (R) {
      case 1: tile_dot4<NW, 1>(brow, srow, G, x + i, xperm + i, lut, t); break;
      case 2: tile_dot4<NW, 2>(brow, srow, G, x + i, xperm + i, lut, t); break;
      case 3: tile_dot4<NW, 3>(brow, srow, G, x + i, xperm + i, lut, t); break;
      default: tile_dot4<NW, 4>(brow, srow, G, x + i, xperm + i, lut, t); break;
    }
    for (int r = 0; r < NW; ++r)
      for (int64_t j = 0; j < R; ++j) out[r * M + i + j] = t[r * R + j];
  }
}

#endif

// Scalar reference of the same contract (no AVX512-BF16): used as the fallback.
static inline float row_dot1_scalar(const uint8_t* brow, const uint8_t* srow, int64_t G,
                                    const uint16_t* x) {
  float acc = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    float t = 0.f;
    for (int k = 0; k < 16; ++k) {
      const uint8_t b = brow[g * 16 + k];
      t += kE2M1[b & 15] * bf16_to_f32(x[g * 32 + 2 * k]) +
           kE2M1[b >> 4] * bf16_to_f32(x[g * 32 + 2 * k + 1]);
    }
    acc += t * g_scale_of[srow[g]];
  }
  return acc;
}

static inline float row_dot(const uint8_t* brow, const uint8_t* srow, int64_t G,
                            const uint16_t* x, const uint16_t* xperm) {
#if defined(OSSRT_BF16_MXFP4)
  return row_dot4(brow, srow, G, x, xperm, e2m1_bf16_lut());
#elif defined(OSSRT_AVX2)
  (void)x;
  return ossrt_avx2::mxfp4_dot(brow, srow, G, xperm, G * 32);
#else
  (void)xperm;
  return row_dot1_scalar(brow, srow, G, x);
#endif
}

// out[r * M + i] = row_dot(row r, x[i], xperm[i]) for r < NR consecutive rows (brow, brow +
// G*16, ...) and i < M. One x: rows in groups of 8 (`wrows_dot4`); more: tiles of NW rows x up
// to 4 rows of x, NW = 4 for two x and 2 for more (at most 16 accumulators), so each packed row
// is decoded once per 4 rows of x.
static inline void row_dot_tiles(const uint8_t* brow, const uint8_t* srow, int64_t G, int64_t NR,
                                 int64_t M, const uint16_t* const* x,
                                 const uint16_t* const* xperm, float* out) {
  int64_t r = 0;
  const int64_t RB = G * 16;
#if defined(OSSRT_BF16_MXFP4)
  const __m512i lut = e2m1_bf16_lut();
  if (M == 1) {
    for (; r + 8 <= NR; r += 8)
      wrows_dot4<8>(brow + r * RB, srow + r * G, G, x[0], xperm[0], lut, out + r);
    for (; r + 4 <= NR; r += 4)
      wrows_dot4<4>(brow + r * RB, srow + r * G, G, x[0], xperm[0], lut, out + r);
  }
  auto tiles = [&](auto nw) {
    constexpr int NW = decltype(nw)::value;
    for (; r + NW <= NR; r += NW)
      tile_group<NW>(brow + r * RB, srow + r * G, G, M, x, xperm, lut, out + r * M);
  };
  if (M == 2) tiles(std::integral_constant<int, 4>{});
  tiles(std::integral_constant<int, 2>{});
  tiles(std::integral_constant<int, 1>{});
#else
  for (; r < NR; ++r)
    for (int64_t i = 0; i < M; ++i)
      out[r * M + i] = row_dot(brow + r * RB, srow + r * G, G, x[i], xperm[i]);
#endif
}

static void check_packed(const torch::Tensor& blocks, const torch::Tensor& scales, int64_t K) {
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kUInt8,
              "blocks and scales must be uint8");
  TORCH_CHECK(blocks.size(-1) == 16 && blocks.size(-2) * 32 == K, "blocks must be [..., K/32, 16]");
  TORCH_CHECK(blocks.is_contiguous() && scales.is_contiguous(), "blocks/scales must be contiguous");
}

// x [M, K] bf16, blocks [N, K/32, 16], scales [N, K/32], bias [N] (any float dtype) or none
// -> [M, N] float32. Each block is decoded once per row of x (M is small here: decode).
torch::Tensor mxfp4_linear_bf16(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales,
                                c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be [M, K] bfloat16");
  TORCH_CHECK(blocks.dim() == 3 && scales.dim() == 2, "blocks [N, K/32, 16], scales [N, K/32]");
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0), G = blocks.size(1);
  blocks = blocks.contiguous();
  scales = scales.contiguous();
  check_packed(blocks, scales, K);
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G, "scales must be [N, K/32]");
  x = x.contiguous();
  torch::Tensor b32;
  const float* biasp = nullptr;
  if (bias.has_value()) {
    b32 = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(b32.numel() == N, "bias must be [N]");
    biasp = b32.data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  const int64_t L = prep_len(K);
  std::vector<uint16_t> xperm(M * L);
  for (int64_t m = 0; m < M; ++m) prep_x(xp + m * K, G, xperm.data() + m * L);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m)
        yp[m * N + n] = row_dot(bp + n * G * 16, sp + n * G, G, xp + m * K,
                                xperm.data() + m * L) + (biasp ? biasp[n] : 0.f);
  });
  return y;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// e^x in fp32 (relative error ~1e-7): x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for
// e^r, times 2^n by vscalefps. x must lie in [-104, 100] (n finite): 0 below about -104,
// +inf above about 89.
static inline __m512 exp_core(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 y = _mm512_set1_ps(1.f / 5040.f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 720.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 120.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 24.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 6.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

// e^x for x <= 0 (the attention's softmax; NaN is taken as -104: e^x = 0).
static inline __m512 exp_nonpos(__m512 x) {
  return exp_core(_mm512_max_ps(x, _mm512_set1_ps(-104.f)));
}

// e^x for any x; NaN stays NaN (vmaxps / vminps return their second operand if either is NaN).
static inline __m512 exp_any(__m512 x) {
  return exp_core(_mm512_min_ps(_mm512_set1_ps(100.f), _mm512_max_ps(_mm512_set1_ps(-104.f), x)));
}

// fp32 rounded to bf16 (nearest even) and back, 16 lanes (denormals flushed to zero).
static inline __m512 round_bf16(__m512 v) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// The whole MoE feed-forward of one token: sum_j w[j] * (W2_e swiglu(W1_e x + b1_e) + b2_e),
// e = idx[j], straight from the packed experts, in two parallel passes (all K gate/up rows, then
// all H output rows, each summing its K experts). x [H] bf16; idx [K] int64; w [K] float32;
// w1_blocks [E, 2I, H/32, 16], w1_scales [E, 2I, H/32], w1_bias [E, 2I];
// w2_blocks [E, H, I/32, 16], w2_scales [E, H, I/32], w2_bias [E, H] -> [H] float32.
// The SwiGLU input is rounded to bf16 (as the torch path does), the rest stays fp32.
// rows x [2I] fp32 gate/up (interleaved: even = gate, odd = linear; each rounded to bf16 as
// torch's bf16 path does) -> act rows x [I] bf16 = clamped SwiGLU, plus each row permuted for
// row_dot (aperm). Same math as `swiglu` in layers.py, in fp32 with one rounding at the end;
// with AVX512-BF16, 16 at a time with a polynomial e^x (~1e-7 relative; the scalar tail uses
// std::exp). Parallel over (row, quarter of a row): each element is computed alone.
static void swiglu_rows(const float* hp, int64_t rows, int64_t I, int64_t G2, float lim,
                        float alp, uint16_t* ap, uint16_t* aperm) {
  const int64_t Q = 4, span = (I + Q - 1) / Q;
  at::parallel_for(0, rows * Q, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / Q, j0 = r * I + (t % Q) * span, j1 = std::min(j0 + span, (r + 1) * I);
      int64_t j = j0;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
      const __m512i even =
          _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
      const __m512 limv = _mm512_set1_ps(lim), nlim = _mm512_set1_ps(-lim);
      const __m512 nalp = _mm512_set1_ps(-alp), one = _mm512_set1_ps(1.f);
      for (; j + 16 <= j1; j += 16) {  // the scalar loop's steps, 16 at a time (NaN kept NaN)
        const __m512 v0 = _mm512_loadu_ps(hp + 2 * j), v1 = _mm512_loadu_ps(hp + 2 * j + 16);
        const __m512 gate = _mm512_min_ps(limv, round_bf16(_mm512_permutex2var_ps(v0, even, v1)));
        const __m512 lin = _mm512_max_ps(
            nlim, _mm512_min_ps(limv, round_bf16(_mm512_permutex2var_ps(v0, odd, v1))));
        const __m512 e = exp_any(_mm512_mul_ps(nalp, gate));
        const __m512 sig = _mm512_div_ps(gate, _mm512_add_ps(one, e));
        const __m512 out = _mm512_mul_ps(sig, _mm512_add_ps(lin, one));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ap + j), (__m256i)_mm512_cvtneps_pbh(out));
      }
#endif
      for (; j < j1; ++j) {
        const float gate = std::min(bf16_to_f32(f32_to_bf16(hp[2 * j])), lim);
        const float lin = std::max(std::min(bf16_to_f32(f32_to_bf16(hp[2 * j + 1])), lim), -lim);
        ap[j] = f32_to_bf16(gate / (1.f + std::exp(-alp * gate)) * (lin + 1.f));
      }
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) prep_x(ap + r * I, G2, aperm + r * prep_len(I));
  });
}

torch::Tensor moe_token(torch::Tensor x, torch::Tensor idx, torch::Tensor w,
                        torch::Tensor w1_blocks, torch::Tensor w1_scales, torch::Tensor w1_bias,
                        torch::Tensor w2_blocks, torch::Tensor w2_scales, torch::Tensor w2_bias,
                        double limit, double alpha) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "x must be bfloat16");
  x = x.contiguous().view({-1});
  idx = idx.to(torch::kInt64).contiguous().view({-1});
  w = w.to(torch::kFloat32).contiguous().view({-1});
  const int64_t H = x.numel(), K = idx.numel(), E = w1_blocks.size(0);
  const int64_t I2 = w1_blocks.size(1), I = I2 / 2, G1 = w1_blocks.size(2), G2 = w2_blocks.size(2);
  TORCH_CHECK(w1_blocks.dim() == 4 && w2_blocks.dim() == 4 && w.numel() == K, "bad shapes");
  TORCH_CHECK(w2_blocks.size(0) == E && w2_blocks.size(1) == H && G2 * 32 == I && I2 % 2 == 0,
              "w2 must be [E, H, I/32, 16]");
  check_packed(w1_blocks, w1_scales, H);
  check_packed(w2_blocks, w2_scales, I);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < K; ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < E, "expert index out of range");
  auto b1 = w1_bias.index_select(0, idx).to(torch::kFloat32).contiguous();  // [K, 2I]
  auto b2 = w2_bias.index_select(0, idx).to(torch::kFloat32).contiguous();  // [K, H]
  auto h = torch::empty({K, I2}, x.options().dtype(torch::kFloat32));
  auto act = torch::empty({K, I}, x.options());
  auto out = torch::empty({H}, x.options().dtype(torch::kFloat32));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const float* wp = w.data_ptr<float>();
  const float* b1p = b1.data_ptr<float>();
  const float* b2p = b2.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  uint16_t* ap = reinterpret_cast<uint16_t*>(act.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const uint8_t* bp1 = w1_blocks.data_ptr<uint8_t>();
  const uint8_t* sp1 = w1_scales.data_ptr<uint8_t>();
  const uint8_t* bp2 = w2_blocks.data_ptr<uint8_t>();
  const uint8_t* sp2 = w2_scales.data_ptr<uint8_t>();
  std::vector<uint16_t> xperm(prep_len(H)), aperm(K * prep_len(I));
  prep_x(xp, G1, xperm.data());
  const uint16_t* xq = xperm.data();
  // Pass 1 in groups of 8 consecutive gate/up rows of one expert (x loaded once per group; 8
  // rows streamed 7-10% faster than 4 at the 20b shape on Zen 4, same results: `wrows_dot4`).
  const int64_t Q1 = (I2 + 7) / 8;  // groups per expert
  at::parallel_for(0, K * Q1, 4, [&](int64_t g0, int64_t g1) {
    float dot[8];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t j = g / Q1, i0 = (g % Q1) * 8, nr = std::min<int64_t>(8, I2 - i0);
      const int64_t n = ip[j] * I2 + i0;
      row_dot_tiles(bp1 + n * G1 * 16, sp1 + n * G1, G1, nr, 1, &xp, &xq, dot);
      for (int64_t r = 0; r < nr; ++r) hp[j * I2 + i0 + r] = dot[r] + b1p[j * I2 + i0 + r];
    }
  });
  const float lim = static_cast<float>(limit), alp = static_cast<float>(alpha);
  swiglu_rows(hp, K, I, G2, lim, alp, ap, aperm.data());
  // Pass 2 in groups of 8 consecutive output rows, each summing its K experts in order.
  at::parallel_for(0, (H + 7) / 8, 2, [&](int64_t g0, int64_t g1) {
    float dot[8];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * 8, nr = std::min<int64_t>(8, H - n0);
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int64_t j = 0; j < K; ++j) {
        const int64_t row = ip[j] * H + n0;
        const uint16_t* aj = ap + j * I;
        const uint16_t* ajp = aperm.data() + j * prep_len(I);
        row_dot_tiles(bp2 + row * G2 * 16, sp2 + row * G2, G2, nr, 1, &aj, &ajp, dot);
        for (int64_t r = 0; r < nr; ++r) acc[r] += wp[j] * (dot[r] + b2p[j * H + n0 + r]);
      }
      for (int64_t r = 0; r < nr; ++r) op[n0 + r] = acc[r];
    }
  });
  return out;
}

// The MoE feed-forward of N tokens (batched decode) in one call: the N*K (token, expert) pairs
// are grouped by expert here, and each used expert's packed rows are read once for all of its
// pairs (every packed row is dotted with each of that expert's tokens while it is in cache).
// Pass 1, parallel over (used expert, gate/up row): h[p] = W1_e x[t_p] + b1_e for pair p;
// SwiGLU (input rounded to bf16, as in moe_token); pass 2, parallel over (used expert, down
// row): y[p] = w_p (W2_e a_p + b2_e); then out[t] = sum of its pairs' y, in fp32.
// x [N, H] bf16; idx [N, K] int64; w [N, K]; weights as in moe_token -> [N, H] float32.
torch::Tensor moe_rows(torch::Tensor x, torch::Tensor idx, torch::Tensor w,
                       torch::Tensor w1_blocks, torch::Tensor w1_scales, torch::Tensor w1_bias,
                       torch::Tensor w2_blocks, torch::Tensor w2_scales, torch::Tensor w2_bias,
                       double limit, double alpha) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be [N, H] bfloat16");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && w.sizes() == idx.sizes(),
              "idx, w must be [N, K]");
  x = x.contiguous();
  idx = idx.to(torch::kInt64).contiguous();
  w = w.to(torch::kFloat32).contiguous();
  const int64_t N = x.size(0), H = x.size(1), K = idx.size(1), P = N * K, E = w1_blocks.size(0);
  const int64_t I2 = w1_blocks.size(1), I = I2 / 2, G1 = w1_blocks.size(2), G2 = w2_blocks.size(2);
  TORCH_CHECK(w1_blocks.dim() == 4 && w2_blocks.dim() == 4, "bad shapes");
  TORCH_CHECK(w2_blocks.size(0) == E && w2_blocks.size(1) == H && G2 * 32 == I && I2 % 2 == 0,
              "w2 must be [E, H, I/32, 16]");
  check_packed(w1_blocks, w1_scales, H);
  check_packed(w2_blocks, w2_scales, I);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) TORCH_CHECK(ip[p] >= 0 && ip[p] < E, "expert index out of range");
  // Group pairs by expert (stable): pairs[start[u] .. start[u+1]) use expert used[u].
  std::vector<int64_t> count(E, 0);
  for (int64_t p = 0; p < P; ++p) ++count[ip[p]];
  std::vector<int64_t> used, start{0}, pos(E, 0);
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) {
      pos[e] = start.back();
      used.push_back(e);
      start.push_back(start.back() + count[e]);
    }
  const int64_t U = static_cast<int64_t>(used.size());
  std::vector<int64_t> tok(P), src(P);  // sorted pair -> token, original pair index
  for (int64_t p = 0; p < P; ++p) {
    const int64_t q = pos[ip[p]]++;
    tok[q] = p / K;
    src[q] = p;
  }
  // the used experts' biases only, in fp32: b1 [U, 2I], b2 [U, H]
  const auto used_t = torch::from_blob(used.data(), {U}, torch::kInt64);
  auto b1 = w1_bias.index_select(0, used_t).to(torch::kFloat32).contiguous();
  auto b2 = w2_bias.index_select(0, used_t).to(torch::kFloat32).contiguous();
  auto h = torch::empty({P, I2}, x.options().dtype(torch::kFloat32));
  auto act = torch::empty({P, I}, x.options());
  auto out = torch::zeros({N, H}, x.options().dtype(torch::kFloat32));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const float* wp = w.data_ptr<float>();
  const float* b1p = b1.data_ptr<float>();
  const float* b2p = b2.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  uint16_t* ap = reinterpret_cast<uint16_t*>(act.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const uint8_t* bp1 = w1_blocks.data_ptr<uint8_t>();
  const uint8_t* sp1 = w1_scales.data_ptr<uint8_t>();
  const uint8_t* bp2 = w2_blocks.data_ptr<uint8_t>();
  const uint8_t* sp2 = w2_scales.data_ptr<uint8_t>();
  const int64_t LH = prep_len(H), LI = prep_len(I);
  std::vector<uint16_t> xperm(N * LH), aperm(P * LI);
  for (int64_t t = 0; t < N; ++t) prep_x(xp + t * H, G1, xperm.data() + t * LH);
  std::vector<const uint16_t*> xs(P), xps(P), as(P), aps(P);  // per sorted pair: its inputs
  for (int64_t q = 0; q < P; ++q) {
    xs[q] = xp + tok[q] * H;
    xps[q] = xperm.data() + tok[q] * LH;
    as[q] = ap + q * I;
    aps[q] = aperm.data() + q * LI;
  }
  // One pass: every used expert's R packed rows (blocks bp, scales sp, G blocks a row) in units
  // of 8 consecutive rows, parallel over the units, each dotted with that expert's pairs'
  // inputs (in[q], inp[q]) by `row_dot_tiles` -> put(u, q, n, dot) for row n of expert used[u].
  auto pass = [&](int64_t R, const uint8_t* bp, const uint8_t* sp, int64_t G,
                  const std::vector<const uint16_t*>& in, const std::vector<const uint16_t*>& inp,
                  auto put) {
    const int64_t Q = (R + 7) / 8;  // units per expert
    at::parallel_for(0, U * Q, 2, [&](int64_t g0, int64_t g1) {
      std::vector<float> dot(8 * P);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t u = g / Q, n0 = (g % Q) * 8, nr = std::min<int64_t>(8, R - n0);
        const int64_t row = used[u] * R + n0, q0 = start[u], c = start[u + 1] - q0;
        row_dot_tiles(bp + row * G * 16, sp + row * G, G, nr, c, in.data() + q0,
                      inp.data() + q0, dot.data());
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t q = q0; q < q0 + c; ++q) put(u, q, n0 + r, dot[r * c + q - q0]);
      }
    });
  };
  pass(I2, bp1, sp1, G1, xs, xps, [&](int64_t u, int64_t q, int64_t n, float d) {
    hp[q * I2 + n] = d + b1p[u * I2 + n];
  });
  const float lim = static_cast<float>(limit), alp = static_cast<float>(alpha);
  swiglu_rows(hp, P, I, G2, lim, alp, ap, aperm.data());
  // Pass 2 into y [P, H], then each token sums its K pairs in fp32, parallel over the H columns
  // (each column owned by one thread).
  std::vector<float> y(P * H);
  pass(H, bp2, sp2, G2, as, aps, [&](int64_t u, int64_t q, int64_t n, float d) {
    y[q * H + n] = wp[src[q]] * (d + b2p[u * H + n]);
  });
  at::parallel_for(0, H, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t q = 0; q < P; ++q) {
      float* o = op + tok[q] * H;
      const float* yq = y.data() + q * H;
      for (int64_t n = n0; n < n1; ++n) o[n] += yq[n];
    }
  });
  return out;
}

// ---- whole-matrix dequantization: the prefill path ----------------------------------------------
// Checks blocks [..., G, 16] / scales [..., G] (made contiguous in place) and returns the
// [..., G*32] output: the caller's `out` (reused across calls: no fresh pages) or a new tensor.
static torch::Tensor dequant_out(torch::Tensor& blocks, torch::Tensor& scales,
                                 const c10::optional<torch::Tensor>& out_opt,
                                 torch::ScalarType dtype, const char* dtype_name) {
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kUInt8,
              "blocks and scales must be uint8");
  TORCH_CHECK(blocks.dim() >= 2 && blocks.size(-1) == 16 &&
              blocks.sizes().slice(0, blocks.dim() - 1) == scales.sizes(),
              "blocks [..., G, 16] and scales [..., G] must match");
  blocks = blocks.contiguous();
  scales = scales.contiguous();
  if (out_opt.has_value()) {
    TORCH_CHECK(out_opt->scalar_type() == dtype && out_opt->is_contiguous() &&
                out_opt->numel() == scales.numel() * 32,
                "out must be a contiguous ", dtype_name, " tensor of [..., G*32]");
    return *out_opt;
  }
  std::vector<int64_t> shape(scales.sizes().begin(), scales.sizes().end());
  shape.back() *= 32;
  return torch::empty(shape, blocks.options().dtype(dtype));
}

// blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G*32] bf16, bit-identical to
// `mxfp4.dequantize` (each value is E2M1 * 2^(s-127), exact in bf16 for every scale byte, so
// the fp32 product's top 16 bits are the bf16 value; byte 255 gives NaN). Prefill then runs
// torch's GEMM on the result: with tens of tokens per expert the matrix product, not the
// decode of the packed bytes, is the cost, and oneDNN's bf16 GEMM is near this CPU's peak.
torch::Tensor dequant_bf16(torch::Tensor blocks, torch::Tensor scales,
                           c10::optional<torch::Tensor> out_opt) {
  torch::Tensor out = dequant_out(blocks, scales, out_opt, torch::kBFloat16, "bf16");
  const int64_t nblk = scales.numel();
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  uint32_t* op = reinterpret_cast<uint32_t*>(out.data_ptr<at::BFloat16>());  // 2 values per word
  at::parallel_for(0, nblk, 2048, [&](int64_t b0, int64_t b1) {
#if defined(__AVX512F__)
    const __m512 lut = _mm512_loadu_ps(kE2M1);
    const __m512i low4 = _mm512_set1_epi32(15);
    const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t b = b0; b < b1; ++b) {
      const __m512i idx = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + b * 16)));
      const __m512 s = _mm512_set1_ps(g_scale_of[sp[b]]);
      const __m512i lo = _mm512_castps_si512(
          _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(idx, low4), lut), s));
      const __m512i hi = _mm512_castps_si512(
          _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), lut), s));
      // dword k = value 2k (low word, from lo's top half) | value 2k+1 (high word)
      const __m512i w = _mm512_ternarylogic_epi32(hi, hi16, _mm512_srli_epi32(lo, 16), 0xEA);
      _mm512_storeu_si512(op + b * 16, w);  // (a & b) | c
    }
#else
    for (int64_t b = b0; b < b1; ++b) {
      const float s = g_scale_of[sp[b]];
      for (int k = 0; k < 16; ++k) {
        const uint8_t v = bp[b * 16 + k];
        float lo = kE2M1[v & 15] * s, hi = kE2M1[v >> 4] * s;
        uint32_t ul, uh;
        std::memcpy(&ul, &lo, 4);
        std::memcpy(&uh, &hi, 4);
        op[b * 16 + k] = (uh & 0xFFFF0000u) | (ul >> 16);
      }
    }
#endif
  });
  return out;
}

// blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G*32] float32, bit-identical to
// `mxfp4.dequantize(..., float32)`. For CPUs without bf16 matrix instructions, where prefill's
// GEMM runs in fp32 (torch's bf16 GEMM there is ~5x slower than its fp32 one).
torch::Tensor dequant_f32(torch::Tensor blocks, torch::Tensor scales,
                          c10::optional<torch::Tensor> out_opt) {
  torch::Tensor out = dequant_out(blocks, scales, out_opt, torch::kFloat32, "float32");
  const int64_t nblk = scales.numel();
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, nblk, 2048, [&](int64_t b0, int64_t b1) {
#if defined(__AVX2__)
    // nibble -> |E2M1| by its low 3 bits through one 8-entry permute, the sign from bit 3
    const __m256 mag = _mm256_loadu_ps(kE2M1);
    const __m256i low3 = _mm256_set1_epi32(7), bit3 = _mm256_set1_epi32(8);
    for (int64_t b = b0; b < b1; ++b) {
      const __m256 s = _mm256_set1_ps(g_scale_of[sp[b]]);
      for (int h = 0; h < 2; ++h) {  // bytes 8h..8h+7 -> values 16h..16h+15
        const __m256i v = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bp + b * 16 + 8 * h)));
        const __m256i vh = _mm256_srli_epi32(v, 4);
        const __m256 lo = _mm256_xor_ps(
            _mm256_permutevar8x32_ps(mag, _mm256_and_si256(v, low3)),
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(v, bit3), 28)));
        const __m256 hi = _mm256_xor_ps(
            _mm256_permutevar8x32_ps(mag, _mm256_and_si256(vh, low3)),
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(vh, bit3), 28)));
        // lo = values 0,2,..,14 of this half, hi = 1,3,..,15: interleave them
        const __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi);
        float* o = op + b * 32 + 16 * h;
        _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_permute2f128_ps(a, c, 0x20), s));
        _mm256_storeu_ps(o + 8, _mm256_mul_ps(_mm256_permute2f128_ps(a, c, 0x31), s));
      }
    }
#else
    for (int64_t b = b0; b < b1; ++b) {
      const float s = g_scale_of[sp[b]];
      for (int k = 0; k < 16; ++k) {
        const uint8_t v = bp[b * 16 + k];
        op[b * 32 + 2 * k] = kE2M1[v & 15] * s;
        op[b * 32 + 2 * k + 1] = kE2M1[v >> 4] * s;
      }
    }
#endif
  });
  return out;
}

// ---- 8-bit dense weights (opt-in `--dense-dtype int8`) -------------------------------------------
// A weight W [N, K] is kept as wq [N, K] uint8 = round(W / d) + 128 and ws [N, K/32] fp32 = d,
// one scale per 32-block (d = max|W_block| / 127): llama.cpp's q8_0 with an fp32 scale and the
// values offset by 128, so that they are the unsigned operand of vpdpbusd. Within each run of 16
// blocks (512 values) the bytes are interleaved (`layers.Q8Weight`): byte 64 t + 4 l + i is value
// 4 t + i of block l, so that after 8 vpdpbusd steps lane l of the accumulator holds block l's
// whole integer dot product, and one multiply by 16 scales finishes 16 blocks. Blocks after the
// last whole run of 16 keep the plain order. x is quantized the same way (signed, scale dx):
//   y[n] = bias[n] + sum_b ws[n, b] dx_b (sum_j wq[n, 32b+j] xq[32b+j] - 128 sum_j xq[32b+j]).
// x [M, K] bf16 -> [M, N] float32. Each block's integer dot is exact; the rest is fp32.
struct Q8Act {  // one row of x, quantized in the weights' byte order
  std::vector<int8_t> q;
  std::vector<float> d;      // [K/32] dx per block
  std::vector<int32_t> c;    // [K/32] -128 * sum(xq of the block)
};

static inline int64_t q8_pos(int64_t k, int64_t G16) {  // value k -> its byte in a row
  const int64_t b = k / 32, j = k % 32;
  if (b >= 16 * G16) return k;
  return (b / 16) * 512 + (j / 4) * 64 + (b % 16) * 4 + j % 4;
}

static void quantize_act(const uint16_t* x, int64_t K, Q8Act& a) {
  const int64_t G = K / 32, G16 = G / 16;
  a.q.resize(K);
  a.d.resize(G);
  a.c.resize(G);
  for (int64_t b = 0; b < G; ++b) {
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(bf16_to_f32(x[b * 32 + j])));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int v = static_cast<int>(std::nearbyint(bf16_to_f32(x[b * 32 + j]) * inv));
      const int8_t q = static_cast<int8_t>(std::max(-127, std::min(127, v)));
      a.q[q8_pos(b * 32 + j, G16)] = q;
      sum += q;
    }
    a.d[b] = d;
    a.c[b] = -128 * sum;
  }
}

// total + the blocks b..G-1 of a row taken one at a time in plain order. Not inlined, so that
// every caller gets the same fp32 rounding (no caller-dependent fused multiply-adds).
__attribute__((noinline)) static float q8_plain_tail(const uint8_t* w, const float* ws,
                                                     const Q8Act& a, int64_t b, int64_t G,
                                                     float total) {
  for (; b < G; ++b) {
    // sum w*x - 128 sum x, as the vector path does. (Written as sum (w - 128) x, GCC 12 turned
    // such a loop into vpdpbusd with w - 128 wrapped to an unsigned byte: wrong for w < 128.)
    int32_t dot = 0;
    for (int j = 0; j < 32; ++j) dot += static_cast<int32_t>(w[b * 32 + j]) * a.q[b * 32 + j];
    total += ws[b] * a.d[b] * static_cast<float>(dot + a.c[b]);
  }
  return total;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One weight row against R quantized rows of x -> out[i] (`q8_row_dot` is R = 1): per 16 blocks
// the integer dots, then one fp32 multiply-add by the block scales; the 2-block tail likewise,
// then the sum of the lanes and the 1-block tail. Each 64-byte weight vector is loaded once for
// the R rows (batched decode), and every row's result is the same whatever R is. With `ahead`
// (not null), the same bytes of a later row are prefetched into L2 while this one is read (a
// line per 64-byte step; its scales `ahead_s` first): at a few rows of x the dot products take
// long enough that the hardware prefetcher alone leaves the loads waiting.
template <int R>
static inline void q8_rows_dot(const uint8_t* w, const float* ws, int64_t K,
                               const Q8Act* const* a, float* out,
                               const uint8_t* ahead = nullptr, const float* ahead_s = nullptr) {
  const int64_t G = K / 32, G16 = G / 16;
  auto pf = [ahead](int64_t off) {
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T1);
  };
  if (ahead_s)
    for (int64_t j = 0; j < G; j += 16)
      _mm_prefetch(reinterpret_cast<const char*>(ahead_s + j), _MM_HINT_T1);
  __m512 tot[R];
  for (int i = 0; i < R; ++i) tot[i] = _mm512_setzero_ps();
  int64_t b = 0;
  for (int64_t g = 0; g < G16; ++g, b += 16) {
    const uint8_t* wg = w + g * 512;
    // one row of x: two chains of four (vpdpbusd's latency, not its throughput, bounds one
    // chain of eight); integer sums, so the split is exact
    __m512i acc[R], odd[R];
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm512_loadu_si512(a[i]->c.data() + b);
      odd[i] = _mm512_setzero_si512();
    }
    for (int t = 0; t < 8; ++t) {
      const __m512i wv = _mm512_loadu_si512(wg + 64 * t);
      pf(g * 512 + 64 * t);
      for (int i = 0; i < R; ++i) {
        const __m512i xv = _mm512_loadu_si512(a[i]->q.data() + g * 512 + 64 * t);
        if (R == 1 && (t & 1)) odd[i] = _mm512_dpbusd_epi32(odd[i], wv, xv);
        else acc[i] = _mm512_dpbusd_epi32(acc[i], wv, xv);
      }
    }
    if (R == 1) acc[0] = _mm512_add_epi32(acc[0], odd[0]);
    const __m512 sw = _mm512_loadu_ps(ws + b);
    for (int i = 0; i < R; ++i)
      tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]),
                               _mm512_mul_ps(sw, _mm512_loadu_ps(a[i]->d.data() + b)), tot[i]);
  }
  // the plain-order tail, two blocks (64 bytes) per step: int32 lanes 0-7 hold block b's
  // partial sums (and its -128 sum(x) term in lane 0), lanes 8-15 block b + 1's
  for (; b + 2 <= G; b += 2) {
    const __m512i wv = _mm512_loadu_si512(w + b * 32);
    pf(b * 32);
    for (int i = 0; i < R; ++i) {
      const Q8Act& x = *a[i];
      __m512i acc = _mm512_mask_set1_epi32(_mm512_setzero_si512(), 0x0001, x.c[b]);
      acc = _mm512_mask_set1_epi32(acc, 0x0100, x.c[b + 1]);
      acc = _mm512_dpbusd_epi32(acc, wv, _mm512_loadu_si512(x.q.data() + b * 32));
      const __m512 sv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(ws[b] * x.d[b]),
                                             _mm512_set1_ps(ws[b + 1] * x.d[b + 1]));
      tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sv, tot[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    const float total = _mm512_reduce_add_ps(tot[i]);
    out[i] = b < G ? q8_plain_tail(w, ws, *a[i], b, G, total) : total;
  }
}
#endif

static inline float q8_row_dot(const uint8_t* w, const float* ws, int64_t K, const Q8Act& a) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const Q8Act* ap = &a;
  float out;
  q8_rows_dot<1>(w, ws, K, &ap, &out);
  return out;
#else
  const int64_t G = K / 32, G16 = G / 16;
  const int8_t* xq = a.q.data();
  const float* dx = a.d.data();
  int64_t b = 0;
  float total = 0.f;
#if defined(OSSRT_AVX2)
  // the weight bytes made signed (v = wq - 128) and multiplied through vpmaddubsw as |v| times
  // x with v's sign (|v|, |x| <= 127: no 16-bit saturation); dword l of each 32-byte step is
  // block l's partial dot, so the -128 sum(x) term is not needed
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  __m256 tot = _mm256_setzero_ps();
  for (int64_t g = 0; g < G16; ++g, b += 16) {
    const uint8_t* wg = w + g * 512;
    const int8_t* xg = xq + g * 512;
    __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int t = 0; t < 16; ++t) {
      const __m256i wv = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * t)), flip);
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 32 * t));
      acc[t & 1] = _mm256_add_epi32(acc[t & 1], _mm256_madd_epi16(
          _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones));
    }
    tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[0]),
                          _mm256_mul_ps(_mm256_loadu_ps(ws + b), _mm256_loadu_ps(dx + b)), tot);
    tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[1]),
                          _mm256_mul_ps(_mm256_loadu_ps(ws + b + 8), _mm256_loadu_ps(dx + b + 8)), tot);
  }
  total = ossrt_avx2::hsum(tot);
#else
  const int32_t* cx = a.c.data();
  for (; b < 16 * G16; ++b) {  // interleaved runs, scalar
    int32_t dot = 0;
    for (int j = 0; j < 32; ++j) {
      const int64_t p = q8_pos(b * 32 + j, G16);
      dot += static_cast<int32_t>(w[p]) * xq[p];
    }
    total += ws[b] * dx[b] * static_cast<float>(dot + cx[b]);
  }
#endif
  return b < G ? q8_plain_tail(w, ws, a, b, G, total) : total;
#endif
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws,
                        c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be [M, K] bfloat16");
  TORCH_CHECK(wq.dim() == 2 && wq.scalar_type() == torch::kUInt8 && wq.is_contiguous(),
              "wq must be a contiguous [N, K] uint8");
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  TORCH_CHECK(wq.size(1) == K && K % 32 == 0, "wq must be [N, K] with K a multiple of 32");
  TORCH_CHECK(ws.scalar_type() == torch::kFloat32 && ws.is_contiguous() && ws.dim() == 2 &&
              ws.size(0) == N && ws.size(1) == K / 32, "ws must be a contiguous [N, K/32] float32");
  x = x.contiguous();
  torch::Tensor b32;
  const float* bp = nullptr;
  if (bias.has_value()) {
    b32 = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(b32.numel() == N, "bias must be [N]");
    bp = b32.data_ptr<float>();
  }
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  std::vector<Q8Act> acts(M);
  for (int64_t m = 0; m < M; ++m) quantize_act(xp + m * K, K, acts[m]);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  const float* sp = ws.data_ptr<float>();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (M > 1) {  // each weight row read once per 4 rows of x (q8_rows_dot): same results
    std::vector<const Q8Act*> ap(M);
    for (int64_t m = 0; m < M; ++m) ap[m] = &acts[m];
    // rows in chunks of 32 (in L2 after the first group of 4 rows of x has read them), each
    // group's x staying in L1 while it runs over the chunk: at 8 rows of x, 9 -> 13-14 GB/s
    // (20b shape, one A/B), 4 rows 19 -> 22-24. The first group prefetches the next chunk into
    // L2 (rows n + 32): 20b-shape matrices streamed, 2 threads, old vs new kernel alternating
    // in one process: 8 rows 11.4 -> 14.3 GB/s, 4 rows 16.7 -> 24.1, 2 rows 24.1 -> 27.5.
    constexpr int64_t kChunk = 32;
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      float o[4];
      for (int64_t c0 = n0; c0 < n1; c0 += kChunk)
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          const int64_t R = std::min<int64_t>(4, M - m0);
          for (int64_t n = c0; n < std::min<int64_t>(n1, c0 + kChunk); ++n) {
            const uint8_t* wr = wp + n * K;
            const float* sr = sp + n * (K / 32);
            const bool ahead = m0 == 0 && n + kChunk < N;
            const uint8_t* aw = ahead ? wr + kChunk * K : nullptr;
            const float* as = ahead ? sr + kChunk * (K / 32) : nullptr;
            switch (R) {
              case 1: q8_rows_dot<1>(wr, sr, K, ap.data() + m0, o, aw, as); break;
              case 2: q8_rows_dot<2>(wr, sr, K, ap.data() + m0, o, aw, as); break;
              case 3: q8_rows_dot<3>(wr, sr, K, ap.data() + m0, o, aw, as); break;
              default: q8_rows_dot<4>(wr, sr, K, ap.data() + m0, o, aw, as); break;
            }
            for (int64_t i = 0; i < R; ++i) yp[(m0 + i) * N + n] = o[i] + (bp ? bp[n] : 0.f);
          }
        }
    });
    return y;
  }
#endif
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m)
        yp[m * N + n] = q8_row_dot(wp + n * K, sp + n * (K / 32), K, acts[m]) + (bp ? bp[n] : 0.f);
  });
  return y;
}

// wq [N, K] uint8, ws [N, K/32] -> W [N, K] bf16 (for torch's GEMM on many rows: prefill).
torch::Tensor q8_dequant_bf16(torch::Tensor wq, torch::Tensor ws, c10::optional<torch::Tensor> out_opt) {
  TORCH_CHECK(wq.dim() == 2 && wq.scalar_type() == torch::kUInt8 && wq.is_contiguous() &&
              ws.scalar_type() == torch::kFloat32 && ws.is_contiguous() &&
              ws.numel() * 32 == wq.numel(), "wq [N, K] uint8, ws [N, K/32] float32");
  torch::Tensor out = out_opt.has_value() ? *out_opt
                                          : torch::empty(wq.sizes(), wq.options().dtype(torch::kBFloat16));
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && out.is_contiguous() &&
              out.numel() == wq.numel(), "out must be a contiguous bf16 tensor of wq's size");
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  const float* sp = ws.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t N = wq.size(0), K = wq.size(1), G = K / 32, G16 = G / 16;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k)
        op[n * K + k] = f32_to_bf16(
            static_cast<float>(static_cast<int>(wp[n * K + q8_pos(k, G16)]) - 128) * sp[n * G + k / 32]);
  });
  return out.view(wq.sizes());
}

// ---- decode attention over a paged cache ---------------------------------------------------------
// One query token per sequence attending over keys gathered by slot (no copy of the cache):
// q [Hq, D] bf16; kc, vc [slots, Hkv, D] bf16; slots [S] int64 (all visible); sinks [Hq];
// out [Hq, D] bf16 = softmax([q k_s * scale]_s, sink) v, the sink only in the denominator.
// Scores, softmax and the weighted sum stay in fp32. Head size 64 (gpt-oss) with AVX512-BF16:
// `attn_decode_d64`, parallel over KV heads; otherwise a plain loop, parallel over query heads.
#if defined(__AVX512F__)
static inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)

// Lane t of the result = the sum of v[t]'s 16 lanes (a transposing add tree: 45 operations for
// 16 sums, against ~8 for each one alone).
static inline __m512 sum16(const __m512* v) {
  __m512 u[8], w[4];
  for (int t = 0; t < 8; ++t)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    u[t] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * t], v[2 * t + 1]),
                         _mm512_unpackhi_ps(v[2 * t], v[2 * t + 1]));
  for (int t = 0; t < 4; ++t)  // per 128-bit lane L: the lane-L sums of v[4t..4t+3]
    w[t] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * t], u[2 * t + 1], 0x44),
                         _mm512_shuffle_ps(u[2 * t], u[2 * t + 1], 0xEE));
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88),
                                  _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88),
                                  _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD));
}

// q . k for D = 64 (q as two bf16 vectors), left as 16 fp32 partial sums.
static inline __m512 qk_lanes(__m512bh q0, __m512bh q1, const uint16_t* kr) {
  const __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), q0, (__m512bh)_mm512_loadu_si512(kr));
  return _mm512_dpbf16_ps(a, q1, (__m512bh)_mm512_loadu_si512(kr + 32));
}

// D == 64: the G query heads of KV head `kvh` together, keys in chunks of kChunk, so that a
// chunk's K and V rows are read from memory once and reused from L1 by every head. Scores are
// vdpbf16ps dot products (bf16 q and k, exact products, fp32 sums); softmax and the weighted
// sum of V in fp32, exp vectorized. p [G * S] scratch.
static void attn_decode_d64(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp,
                            const int64_t* sl, int64_t S, int64_t Hkv, int64_t kvh, int64_t G,
                            const float* skp, float sc, uint16_t* op, float* p) {
  constexpr int64_t D = 64, kChunk = 128;
  for (int64_t i0 = 0; i0 < S; i0 += kChunk) {
    const int64_t i1 = std::min(S, i0 + kChunk);
    for (int64_t j = 0; j < G; ++j) {
      const uint16_t* qh = qp + (kvh * G + j) * D;
      const __m512bh q0 = (__m512bh)_mm512_loadu_si512(qh);
      const __m512bh q1 = (__m512bh)_mm512_loadu_si512(qh + 32);
      float* pj = p + j * S;
      int64_t i = i0;
      for (; i + 16 <= i1; i += 16) {  // 16 keys: their dot products summed together
        __m512 sv[16];
        for (int t = 0; t < 16; ++t) sv[t] = qk_lanes(q0, q1, kp + (sl[i + t] * Hkv + kvh) * D);
        _mm512_storeu_ps(pj + i, _mm512_mul_ps(sum16(sv), _mm512_set1_ps(sc)));
      }
      for (; i < i1; ++i) {
        const __m512 a = qk_lanes(q0, q1, kp + (sl[i] * Hkv + kvh) * D);
        pj[i] = _mm512_reduce_add_ps(a) * sc;
      }
    }
  }
  std::vector<float> denom(G);
  for (int64_t j = 0; j < G; ++j) {  // p <- exp(p - max), denom = sum + the sink's share
    float* pj = p + j * S;
    const float sink = skp[kvh * G + j];
    __m512 mv = _mm512_set1_ps(sink);
    int64_t i = 0;
    for (; i + 16 <= S; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(pj + i));
    float m = _mm512_reduce_max_ps(mv);
    for (; i < S; ++i) m = std::max(m, pj[i]);
    const __m512 m16 = _mm512_set1_ps(m);
    __m512 sv = _mm512_setzero_ps();
    for (i = 0; i + 16 <= S; i += 16) {
      const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(pj + i), m16));
      _mm512_storeu_ps(pj + i, e);
      sv = _mm512_add_ps(sv, e);
    }
    if (i < S) {
      const __mmask16 k = static_cast<__mmask16>((1u << (S - i)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(
          k, exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, pj + i), m16)));
      _mm512_mask_storeu_ps(pj + i, k, e);
      sv = _mm512_add_ps(sv, e);
    }
    denom[j] = _mm512_reduce_add_ps(sv) + std::exp(sink - m);
  }
  alignas(64) float vf[kChunk * D];
  std::vector<float> acc(G * D, 0.f);
  for (int64_t i0 = 0; i0 < S; i0 += kChunk) {
    const int64_t i1 = std::min(S, i0 + kChunk);
    for (int64_t i = i0; i < i1; ++i) {  // the chunk's V rows, once, in fp32
      const uint16_t* vr = vp + (sl[i] * Hkv + kvh) * D;
      for (int t = 0; t < 4; ++t) _mm512_store_ps(vf + (i - i0) * D + 16 * t, load_bf16x16(vr + 16 * t));
    }
    for (int64_t j = 0; j < G; ++j) {
      const float* pj = p + j * S;
      float* aj = acc.data() + j * D;
      __m512 a0 = _mm512_loadu_ps(aj), a1 = _mm512_loadu_ps(aj + 16);
      __m512 a2 = _mm512_loadu_ps(aj + 32), a3 = _mm512_loadu_ps(aj + 48);
      for (int64_t i = i0; i < i1; ++i) {
        const __m512 e = _mm512_set1_ps(pj[i]);
        const float* v = vf + (i - i0) * D;
        a0 = _mm512_fmadd_ps(e, _mm512_load_ps(v), a0);
        a1 = _mm512_fmadd_ps(e, _mm512_load_ps(v + 16), a1);
        a2 = _mm512_fmadd_ps(e, _mm512_load_ps(v + 32), a2);
        a3 = _mm512_fmadd_ps(e, _mm512_load_ps(v + 48), a3);
      }
      _mm512_storeu_ps(aj, a0);
      _mm512_storeu_ps(aj + 16, a1);
      _mm512_storeu_ps(aj + 32, a2);
      _mm512_storeu_ps(aj + 48, a3);
    }
  }
  for (int64_t j = 0; j < G; ++j) {
    const float inv = 1.f / denom[j];
    for (int64_t d = 0; d < D; ++d) op[(kvh * G + j) * D + d] = f32_to_bf16(acc[j * D + d] * inv);
  }
}
#endif

// q [Hq, D] (one sequence), or q [B, Hq, D] with offsets [B + 1]: sequence b's keys are the
// slots [offsets[b], offsets[b + 1]) -> [Hq, D] / [B, Hq, D]. Parallel over (sequence, head):
// one call for all the decode sequences of a step's layer.
torch::Tensor attn_decode(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots,
                          torch::Tensor sinks, double scale, c10::optional<torch::Tensor> offsets) {
  TORCH_CHECK(kc.dim() == 3 && vc.sizes() == kc.sizes(), "kc/vc [slots, Hkv, D]");
  TORCH_CHECK(q.dim() == 2 || (q.dim() == 3 && offsets.has_value()),
              "q [Hq, D], or q [B, Hq, D] with offsets [B + 1]");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && kc.scalar_type() == torch::kBFloat16 &&
              vc.scalar_type() == torch::kBFloat16, "q, k, v must be bfloat16");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous(), "the cache must be contiguous");
  const int64_t B = q.dim() == 3 ? q.size(0) : 1;
  const int64_t Hq = q.size(-2), D = q.size(-1), Hkv = kc.size(1), nslots = kc.size(0);
  TORCH_CHECK(kc.size(2) == D && Hq % Hkv == 0, "head shapes");
  q = q.contiguous();
  slots = slots.to(torch::kInt64).contiguous();
  auto sk = sinks.to(torch::kFloat32).contiguous();
  const int64_t G = Hq / Hkv;
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < nslots, "slot out of range");
  std::vector<int64_t> off{0, slots.numel()};
  if (q.dim() == 3) {
    auto o = offsets->to(torch::kInt64).contiguous();
    TORCH_CHECK(o.dim() == 1 && o.numel() == B + 1, "offsets must be [B + 1]");
    off.assign(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + B + 1);
    TORCH_CHECK(off[0] == 0 && off[B] == slots.numel(), "offsets must run from 0 to len(slots)");
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(off[b] <= off[b + 1], "offsets must not decrease");
  }
  int64_t Smax = 0;
  for (int64_t b = 0; b < B; ++b) Smax = std::max(Smax, off[b + 1] - off[b]);
  auto out = torch::empty_like(q);
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(vc.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float* skp = sk.data_ptr<float>();
  const float sc = static_cast<float>(scale);
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (D == 64) {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> p(G * Smax);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hkv;
        attn_decode_d64(qp + b * Hq * D, kp, vp, sl + off[b], off[b + 1] - off[b], Hkv,
                        t % Hkv, G, skp, sc, op + b * Hq * D, p.data());
      }
    });
    return out;
  }
#endif
  at::parallel_for(0, B * Hq, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(Smax), qf(D), acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hq, h = t % Hq, kvh = h / G, S = off[b + 1] - off[b];
      const int64_t* sb = sl + off[b];
      const uint16_t* qh = qp + t * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = bf16_to_f32(qh[d]);
      float m = skp[h];
      for (int64_t i = 0; i < S; ++i) {
        const uint16_t* kr = kp + (sb[i] * Hkv + kvh) * D;
        float v = 0.f;
        int64_t d = 0;
#if defined(__AVX512F__)
        __m512 a = _mm512_setzero_ps();
        for (; d + 16 <= D; d += 16)
          a = _mm512_fmadd_ps(_mm512_loadu_ps(qf.data() + d), load_bf16x16(kr + d), a);
        v = _mm512_reduce_add_ps(a);
#elif defined(OSSRT_AVX2)
        d = D - D % 16;
        v = ossrt_avx2::dot_f32_bf16(qf.data(), kr, d);
#endif
        for (; d < D; ++d) v += qf[d] * bf16_to_f32(kr[d]);
        p[i] = v * sc;
        m = std::max(m, p[i]);
      }
      float denom = std::exp(skp[h] - m);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < S; ++i) {
        const float e = std::exp(p[i] - m);
        denom += e;
        const uint16_t* vr = vp + (sb[i] * Hkv + kvh) * D;
        int64_t d = 0;
#if defined(__AVX512F__)
        const __m512 ev = _mm512_set1_ps(e);
        for (; d + 16 <= D; d += 16)
          _mm512_storeu_ps(acc.data() + d,
                           _mm512_fmadd_ps(ev, load_bf16x16(vr + d), _mm512_loadu_ps(acc.data() + d)));
#elif defined(OSSRT_AVX2)
        d = D - D % 8;
        ossrt_avx2::axpy_bf16(e, vr, acc.data(), d);
#endif
        for (; d < D; ++d) acc[d] += e * bf16_to_f32(vr[d]);
      }
      const float inv = 1.f / denom;
      for (int64_t d = 0; d < D; ++d) op[t * D + d] = f32_to_bf16(acc[d] * inv);
    }
  });
  return out;
}

// Which kernels this build runs: "avx512bf16", "avx2" (x quantized to int16 in the MXFP4 dot
// products, see avx2.h) or "portable".
static std::string isa() {
#if defined(OSSRT_BF16_MXFP4)
  return "avx512bf16";
#elif defined(OSSRT_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

void register_decode_ops(pybind11::module& m);  // decode_ops.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the instruction set the kernels were built for");
  register_decode_ops(m);
  m.def("mxfp4_linear", &mxfp4_linear, "MXFP4 linear layer (CPU)");
  m.def("bf16_linear", &bf16_linear, "bf16 linear layer for few rows (CPU)");
  m.def("mxfp4_linear_bf16", &mxfp4_linear_bf16, "MXFP4 linear layer, bf16 activations (CPU)");
  m.def("attn_decode", &attn_decode, "decode attention over a paged KV cache (CPU)",
        py::arg("q"), py::arg("kc"), py::arg("vc"), py::arg("slots"), py::arg("sinks"),
        py::arg("scale"), py::arg("offsets") = py::none());
  m.def("moe_token", &moe_token, "MoE feed-forward of one token from packed experts (CPU)");
  m.def("dequant_bf16", &dequant_bf16, "MXFP4 -> bf16, whole matrices (CPU)",
        py::arg("blocks"), py::arg("scales"), py::arg("out") = py::none());
  m.def("dequant_f32", &dequant_f32, "MXFP4 -> float32, whole matrices (CPU)",
        py::arg("blocks"), py::arg("scales"), py::arg("out") = py::none());
  m.def("q8_linear", &q8_linear, "8-bit dense linear layer for few rows (CPU)");
  m.def("q8_dequant_bf16", &q8_dequant_bf16, "8-bit dense weight -> bf16 (CPU)",
        py::arg("wq"), py::arg("ws"), py::arg("out") = py::none());
  m.def("moe_rows", &moe_rows, "MoE feed-forward of a few tokens, grouped by expert (CPU)");
}
