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
#if defined(__AVX512F__)
#include <immintrin.h>
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
// With AVX512-BF16 each 32-wide step is one dot-product instruction per row of x, so reading
// w once dominates (bandwidth-bound); elsewhere it falls back to at::linear.
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16,
              "x and w must be bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
#if defined(__AVX512BF16__)
  if (K % 32 == 0) {
    x = x.contiguous();
    w = w.contiguous();
    auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
    float* yp = y.data_ptr<float>();
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    torch::Tensor b32;
    const float* bp = nullptr;
    if (bias.has_value()) {
      b32 = bias->to(torch::kFloat32).contiguous();
      bp = b32.data_ptr<float>();
    }
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint16_t* wr = wp + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
          const int64_t mc = std::min<int64_t>(8, M - m0);
          __m512 a[8];
          for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
          for (int64_t k = 0; k < K; k += 32) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
            for (int64_t i = 0; i < mc; ++i) {
              __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + (m0 + i) * K + k);
              a[i] = _mm512_dpbf16_ps(a[i], wv, xv);
            }
          }
          for (int64_t i = 0; i < mc; ++i)
            yp[(m0 + i) * N + n] = _mm512_reduce_add_ps(a[i]) + (bp ? bp[n] : 0.f);
        }
      }
    });
    return y;
  }
#endif
  return at::linear(x.to(torch::kFloat32), w.to(torch::kFloat32),
                    bias.has_value() ? c10::optional<torch::Tensor>(bias->to(torch::kFloat32))
                                     : c10::nullopt);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mxfp4_linear", &mxfp4_linear, "MXFP4 linear layer (CPU)");
  m.def("bf16_linear", &bf16_linear, "bf16 linear layer for few rows (CPU)");
}
