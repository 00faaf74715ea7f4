// Small fused ops of a decode step. Their math is cheap; as separate torch ops from Python each
// costs microseconds of dispatch and a fresh tensor, which adds up to tens of milliseconds per
// token over 24 layers. Each op gives the same result as the torch expression it replaces (named
// in `layers.py`), rounding for rounding, except where noted.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include "bf16.h"
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// mxfp4_cpu.cpp
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor bf16_linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor moe_token(torch::Tensor x, torch::Tensor idx, torch::Tensor w,
                        torch::Tensor w1_blocks, torch::Tensor w1_scales, torch::Tensor w1_bias,
                        torch::Tensor w2_blocks, torch::Tensor w2_scales, torch::Tensor w2_bias,
                        double limit, double alpha);
torch::Tensor moe_rows(torch::Tensor x, torch::Tensor idx, torch::Tensor w,
                       torch::Tensor w1_blocks, torch::Tensor w1_scales, torch::Tensor w1_bias,
                       torch::Tensor w2_blocks, torch::Tensor w2_scales, torch::Tensor w2_bias,
                       double limit, double alpha);
torch::Tensor attn_decode(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots,
                          torch::Tensor sinks, double scale, c10::optional<torch::Tensor> offsets);
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws,
                        c10::optional<torch::Tensor> bias);

static const uint16_t* bf16_ptr(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

static uint16_t* bf16_ptr_mut(torch::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

// x [N, H] bf16 (plus r [N, H] when given: s = x + r, rounded to bf16 as torch's bf16 add),
// w [H] bf16 -> [s, bf16((s * (1 / sqrt(mean(s^2) + eps))) * w)], fp32 inside: `layers.rms_norm`
// of `x + r`. The sum of squares runs in another order than torch's reduction (fp32 rounding).
std::vector<torch::Tensor> rms_norm_bf16(torch::Tensor x, c10::optional<torch::Tensor> r,
                                         torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16 &&
              w.numel() == x.size(1), "x [N, H] and w [H] must be bfloat16");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t N = x.size(0), H = x.size(1);
  torch::Tensor s = x;
  if (r.has_value()) {
    TORCH_CHECK(r->sizes() == x.sizes() && r->scalar_type() == torch::kBFloat16, "r must be like x");
    torch::Tensor rc = r->contiguous();
    s = torch::empty_like(x);
    const uint16_t *xp = bf16_ptr(x), *rp = bf16_ptr(rc);
    uint16_t* sp = bf16_ptr_mut(s);
    for (int64_t i = 0; i < N * H; ++i) sp[i] = f32_to_bf16(bf16_to_f32(xp[i]) + bf16_to_f32(rp[i]));
  }
  auto y = torch::empty_like(x);
  const uint16_t *sp = bf16_ptr(s), *wp = bf16_ptr(w);
  uint16_t* yp = bf16_ptr_mut(y);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* row = sp + n * H;
      float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t i = 0;
      for (; i + 8 <= H; i += 8)
        for (int j = 0; j < 8; ++j) {
          const float v = bf16_to_f32(row[i + j]);
          part[j] += v * v;
        }
      for (; i < H; ++i) part[0] += bf16_to_f32(row[i]) * bf16_to_f32(row[i]);
      float ss = 0.f;
      for (int j = 0; j < 8; ++j) ss += part[j];
      const float rs = 1.f / std::sqrt(ss / static_cast<float>(H) + e);
      for (i = 0; i < H; ++i) {
        const float t = bf16_to_f32(row[i]) * rs;
        yp[n * H + i] = f32_to_bf16(t * bf16_to_f32(wp[i]));
      }
    }
  });
  return {s, y};
}

// In place on q [N, Hq, D] and k [N, Hkv, D] bf16 with cos, sin [N, D/2] fp32: the half-split
// rotation of `YarnRope.apply`, x1 c - x2 s and x2 c + x1 s, each product and sum rounded to fp32
// separately as torch's separate ops do (no fused multiply-add), then to bf16.
__attribute__((optimize("fp-contract=off")))
static void rope_rows(uint16_t* x, int64_t N, int64_t heads, int64_t D, const float* cp,
                      const float* sp) {
  const int64_t half = D / 2;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < heads; ++h) {
      uint16_t* v = x + (n * heads + h) * D;
      const float* c = cp + n * half;
      const float* s = sp + n * half;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = bf16_to_f32(v[i]), x2 = bf16_to_f32(v[half + i]);
        const float a = x1 * c[i], b = x2 * s[i], p = x2 * c[i], q = x1 * s[i];
        v[i] = f32_to_bf16(a - b);
        v[half + i] = f32_to_bf16(p + q);
      }
    }
}

void rope_bf16_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "q [N, Hq, D], k [N, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
              q.is_contiguous() && k.is_contiguous(), "q and k must be contiguous bfloat16");
  const int64_t N = q.size(0), D = q.size(2);
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
              cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == N &&
              cos.size(1) * 2 == D, "cos, sin must be [N, D/2] float32");
  cos = cos.contiguous();
  sin = sin.contiguous();
  rope_rows(bf16_ptr_mut(q), N, q.size(1), D, cos.data_ptr<float>(), sin.data_ptr<float>());
  rope_rows(bf16_ptr_mut(k), N, k.size(1), D, cos.data_ptr<float>(), sin.data_ptr<float>());
}

// The residual MoE step of N tokens: x [N, H] + moe(h [N, H]) in bf16, where moe is `layers.moe`
// without a router adjustment, for the N that `layers.linear` sends through the native GEMV:
// router logits in bf16 (`bf16_linear`), top-k by torch's topk (same tie order), softmax of those
// k in fp32 rounded to bf16, then `moe_token` (one token) or `moe_rows`.
torch::Tensor moe_decode(torch::Tensor x, torch::Tensor h, torch::Tensor router_w,
                         torch::Tensor router_b, int64_t top_k, torch::Tensor w1_blocks,
                         torch::Tensor w1_scales, torch::Tensor w1_bias, torch::Tensor w2_blocks,
                         torch::Tensor w2_scales, torch::Tensor w2_bias, double limit, double alpha) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.sizes() == h.sizes() &&
              x.scalar_type() == torch::kBFloat16 && h.scalar_type() == torch::kBFloat16,
              "x, h must be [N, H] bfloat16");
  auto logits = bf16_linear(h, router_w, router_b).to(torch::kBFloat16);  // [N, E]
  auto [top, idx] = at::topk(logits, top_k, -1);
  auto weights = at::softmax(top.to(torch::kFloat32), -1).to(torch::kBFloat16);
  auto y = h.size(0) == 1
               ? moe_token(h[0], idx[0], weights[0], w1_blocks, w1_scales, w1_bias, w2_blocks,
                           w2_scales, w2_bias, limit, alpha)  // [H] fp32
               : moe_rows(h, idx, weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales,
                          w2_bias, limit, alpha);  // [N, H] fp32
  x = x.contiguous();
  auto out = torch::empty_like(x);
  const uint16_t* xp = bf16_ptr(x);
  const float* yp = y.data_ptr<float>();
  uint16_t* op = bf16_ptr_mut(out);
  for (int64_t i = 0; i < x.numel(); ++i)
    op[i] = f32_to_bf16(bf16_to_f32(xp[i]) + bf16_to_f32(f32_to_bf16(yp[i])));
  return out;
}

// One decoder layer for N decode rows (one new token per sequence) over a paged KV cache, in
// one call: `model.Block.forward` with `PagedAttention`, no LoRA, every op the same native op
// it calls from Python, in the same order (so the same bits):
//   h = rms_norm(x); q, k, v = h W^T + b (bf16_linear_bf16); rope(q, k); write k, v into
//   kc, vc at write_slots; o = attn_decode(q, kc, vc, read_slots, offsets);
//   x, h = x + (o W_o^T + b_o), rms_norm of that; x + moe(h) (moe_decode).
// With 8-bit dense weights (`--dense-dtype int8`) the four projections are `q8_linear` rounded
// to bf16, as `layers.linear` does for a `Q8Weight`: w then holds their uint8 values in the
// weights' places and their scales as four more tensors (q, k, v, o) at the end.
// x [N, H] bf16; cos, sin [N, D/2] fp32; kc, vc [slots, Hkv, D] bf16 (written in place);
// write_slots [N], read_slots, offsets [N + 1] int64 as `attn_decode`'s -> [N, H] bf16.
torch::Tensor decode_layer(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                           const std::vector<torch::Tensor>& w, torch::Tensor kc,
                           torch::Tensor vc, torch::Tensor write_slots, torch::Tensor read_slots,
                           torch::Tensor offsets, int64_t top_k, double eps, double scale,
                           double limit, double alpha) {
  // w: attn_norm, q_w, q_b, k_w, k_b, v_w, v_b, sinks, o_w, o_b, mlp_norm, router_w, router_b,
  //    w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias[, q_s, k_s, v_s, o_s]
  TORCH_CHECK(w.size() == 19 || w.size() == 23,
              "decode_layer takes the layer's 19 tensors (23 with 8-bit projections)");
  const bool q8 = w.size() == 23;
  // projection j (q, k, v, o) of `in` by weight w[wi], bias w[wi + 1]
  auto proj = [&](const torch::Tensor& in, size_t wi, size_t j) {
    return q8 ? q8_linear(in, w[wi], w[19 + j], w[wi + 1]).to(torch::kBFloat16)
              : bf16_linear_bf16(in, w[wi], w[wi + 1]);
  };
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be [N, H] bfloat16");
  TORCH_CHECK(kc.dim() == 3 && vc.sizes() == kc.sizes() && kc.is_contiguous() &&
              vc.is_contiguous() && kc.scalar_type() == torch::kBFloat16 &&
              vc.scalar_type() == torch::kBFloat16, "kc, vc must be contiguous [slots, Hkv, D] bf16");
  const int64_t N = x.size(0), Hkv = kc.size(1), D = kc.size(2);
  TORCH_CHECK(write_slots.dim() == 1 && write_slots.numel() == N, "write_slots must be [N]");
  auto h = rms_norm_bf16(x, c10::nullopt, w[0], eps)[1];
  auto q = proj(h, 1, 0);
  auto k = proj(h, 3, 1);
  auto v = proj(h, 5, 2);
  TORCH_CHECK(q.size(1) % D == 0 && k.size(1) == Hkv * D && v.size(1) == Hkv * D,
              "q, k, v widths must match the cache's heads");
  q = q.view({N, q.size(1) / D, D});
  k = k.view({N, Hkv, D});
  v = v.view({N, Hkv, D});
  rope_bf16_(q, k, cos, sin);
  auto ws = write_slots.to(torch::kInt64).contiguous();
  const int64_t* wsp = ws.data_ptr<int64_t>();
  const int64_t row = Hkv * D, nslots = kc.size(0);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(wsp[n] >= 0 && wsp[n] < nslots, "write slot out of range");
    std::memcpy(bf16_ptr_mut(kc) + wsp[n] * row, bf16_ptr(k) + n * row, row * 2);
    std::memcpy(bf16_ptr_mut(vc) + wsp[n] * row, bf16_ptr(v) + n * row, row * 2);
  }
  auto o = attn_decode(q, kc, vc, read_slots, w[7], scale, offsets).reshape({N, -1});
  auto out = proj(o, 8, 3);
  auto xh = rms_norm_bf16(x, out, w[10], eps);
  return moe_decode(xh[0], xh[1], w[11], w[12], top_k, w[13], w[14], w[15], w[16], w[17], w[18],
                    limit, alpha);
}

// XOR of every 64-bit word of contiguous t (nbytes a multiple of 8), read in parallel with plain
// sequential loads and nothing else: the read rate a decode step can hope for, measured the way
// its kernels read (`membw.read_bandwidth` times it). The XOR makes the reads observable, so the
// compiler cannot drop them, and lets a test check that all were read.
int64_t read_xor(torch::Tensor t) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "t must be a contiguous CPU tensor");
  const int64_t nbytes = t.numel() * t.element_size();
  TORCH_CHECK(nbytes % 8 == 0, "t must hold a whole number of 8-byte words");
  const uint64_t* p = static_cast<const uint64_t*>(t.data_ptr());
  const int64_t words = nbytes / 8, chunk = 1 << 15;  // 256 KiB per task
  std::vector<uint64_t> part((words + chunk - 1) / chunk, 0);
  at::parallel_for(0, static_cast<int64_t>(part.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t w0 = c * chunk, w1 = std::min(words, w0 + chunk);
      int64_t w = w0;
      uint64_t acc = 0;
#if defined(__AVX512F__)
      __m512i a = _mm512_setzero_si512(), b = a, d = a, e = a;
      for (; w + 32 <= w1; w += 32) {
        a = _mm512_xor_si512(a, _mm512_loadu_si512(p + w));
        b = _mm512_xor_si512(b, _mm512_loadu_si512(p + w + 8));
        d = _mm512_xor_si512(d, _mm512_loadu_si512(p + w + 16));
        e = _mm512_xor_si512(e, _mm512_loadu_si512(p + w + 24));
      }
      alignas(64) uint64_t lanes[8];
      _mm512_store_si512(lanes, _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(d, e)));
      for (uint64_t l : lanes) acc ^= l;
#endif
      for (; w < w1; ++w) acc ^= p[w];
      part[c] = acc;
    }
  });
  uint64_t acc = 0;
  for (uint64_t v : part) acc ^= v;
  return static_cast<int64_t>(acc);
}

void register_decode_ops(pybind11::module& m) {
  m.def("decode_layer", &decode_layer, "one decoder layer of N decode rows, paged KV (CPU)");
  m.def("read_xor", &read_xor, "XOR of a tensor's 64-bit words, read in parallel (CPU)");
  m.def("rms_norm_bf16", &rms_norm_bf16, "(x + r, rms_norm(x + r)) in bf16 (CPU)",
        py::arg("x"), py::arg("r"), py::arg("w"), py::arg("eps"));
  m.def("rope_bf16_", &rope_bf16_, "half-split rotary embedding of q and k, in place (CPU)");
  m.def("bf16_linear_bf16", &bf16_linear_bf16, "bf16_linear rounded to bf16 (CPU)");
  m.def("moe_decode", &moe_decode, "x + moe(h) for a few tokens, router included (CPU)");
}
