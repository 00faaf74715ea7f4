"""gpt-oss layer math: RMSNorm, YaRN RoPE, attention with sinks and sliding windows, MoE.

Shapes: B batch, T new tokens, S keys, H hidden, Hq/Hkv query/KV heads, G = Hq/Hkv, D head dim,
E experts, K experts per token, I expert intermediate size, N = B*T tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import cpu_gemm, kernels
from .cpu_gemm import linear_f32, mxfp4_linear_f32, scratch, use_f32
from .config import GptOssConfig, yarn_low_high
from .mxfp4 import dequantize
from .q8 import Q8Weight

_ATTN_SCORES_BUDGET = 1 << 25  # fp32 score elements per query chunk
_MOE_ROWS_MAX = 128  # up to this many tokens, the whole MoE is one native call (moe_rows);
# measured at the 20b shape on Zen 4 (AVX512-BF16), 2 threads: a 128-token forward 4.6-4.9 s
# vs 5.1-5.5 s per expert through dequantize + GEMM, 512 tokens 19.4 s vs 13.7-15.8 s
_KERNEL_MAX_ROWS = 4  # up to this many tokens per expert, read MXFP4 directly (GEMV regime);
# more, and the expert is dequantized to bf16 for torch's GEMM (measured crossover: 4-8 rows)
_KERNEL_MAX_ROWS_F32 = 24  # the same where the GEMMs run in fp32 (cpu_gemm): measured on Zen 1,
# W [5760, 2880], 24 rows 28 ms native vs 42 ms fp32 GEMM, 32 rows 39 ms both
_GEMV_MAX_ROWS = 8  # bf16 dense layers with this few rows use the native GEMV (measured at the
# 20b shape, weights in huge pages: 8 rows 117 ms/step native vs 135 ms torch)
_Q8_GEMV_MAX_ROWS = 16  # 8-bit dense layers: native GEMV up to this many rows, then bf16 GEMM
_GEMV_MAX_ROWS_F32 = 32  # the same where GEMMs run in fp32 (cpu_gemm): measured on Zen 1,
# W [16384, 2880], 8 rows 16 ms native vs 51 ms fp32, 32 rows 69 vs 111 ms


def _gemv_max_rows() -> int:
    """Most bf16 rows `linear` sends through the native GEMV on this CPU."""
    return _GEMV_MAX_ROWS_F32 if cpu_gemm.bf16_via_f32() else _GEMV_MAX_ROWS


def decode_layer_max_rows(int8: bool = False) -> int:
    """Most decode rows `kernels.decode_layer` takes: as many as `linear` (native GEMV; with
    `int8` 8-bit projections, the 8-bit one as well) and `moe_add` (one native MoE call, its
    router through the bf16 GEMV) take, so that its ops are theirs."""
    rows = min(_gemv_max_rows(), _MOE_ROWS_MAX)
    return min(rows, _Q8_GEMV_MAX_ROWS) if int8 else rows


def linear(x: torch.Tensor, w: torch.Tensor | Q8Weight, b: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T + b -> [..., N] in `out_dtype` (default x's dtype).

    Up to `_GEMV_MAX_ROWS` bf16 rows on the CPU (decode; `_GEMV_MAX_ROWS_F32` where GEMMs run
    in fp32) go through the native GEMV, which reads the weight at memory bandwidth; everything
    else through a GEMM: torch's, or `cpu_gemm.linear_f32` on CPUs without bf16 matrix
    instructions. An 8-bit `Q8Weight` goes through the native 8-bit GEMV for up to
    `_Q8_GEMV_MAX_ROWS` rows, else it is expanded to bf16 for the GEMM (prefill). The native
    GEMVs have no backward: with autograd recording, torch's product is used.
    """
    rows = x.numel() // x.shape[-1]
    grad = torch.is_grad_enabled() and (x.requires_grad or (  # the native GEMVs have no backward
        isinstance(w, torch.Tensor) and w.requires_grad) or (b is not None and b.requires_grad))
    native = x.device.type == "cpu" and kernels.available()
    gemv = native and not grad
    if isinstance(w, Q8Weight):
        if x.dtype == torch.bfloat16 and 0 < rows <= _Q8_GEMV_MAX_ROWS and gemv:
            y = kernels.q8_linear(x.reshape(rows, -1), w.q, w.scale, b)
            return y.view(*x.shape[:-1], w.shape[0]).to(out_dtype or x.dtype)
        if native and x.dtype == torch.bfloat16:
            wd = kernels.q8_dequant_bf16(w.q, w.scale, scratch(2, w.q.numel(), w.q.shape))
        else:
            wd = w.dequantize(x.dtype)
        if use_f32(x, wd):
            return linear_f32(x, wd, b, out_dtype)
        y = F.linear(x, wd, b)
        return y if out_dtype is None else y.to(out_dtype)
    if (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and gemv
            and 0 < rows <= _gemv_max_rows()):
        if out_dtype in (None, torch.bfloat16):
            return kernels.bf16_linear_bf16(x.reshape(rows, -1), w, b).view(*x.shape[:-1], -1)
        y = kernels.bf16_linear(x.reshape(rows, -1), w, b).view(*x.shape[:-1], w.shape[0])
        return y.to(out_dtype)
    if use_f32(x, w):  # no bf16 matrix instructions: the same products, in fp32 (cpu_gemm)
        return linear_f32(x, w, b, out_dtype)
    y = F.linear(x, w, b)
    return y if out_dtype is None else y.to(out_dtype)


def _native_bf16(*ts: torch.Tensor) -> bool:
    """All CPU bf16 tensors outside autograd (the native ops have no backward), and the native
    kernels are there."""
    return (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))
            and kernels.available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] -> same dtype; computed in fp32 (`rms_norm_reference`, in one native call for
    bf16 on the CPU)."""
    if x.dim() == 2 and _native_bf16(x, weight):
        return kernels.rms_norm_bf16(x, None, weight, eps)[1]
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) for the residual sum s = x + r [N, H]."""
    if x.dim() == 2 and _native_bf16(x, r, weight):
        return kernels.rms_norm_bf16(x, r, weight, eps)
    s = x + r
    return s, rms_norm_reference(s, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] -> same dtype; computed in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


class YarnRope(torch.nn.Module):
    """YaRN-scaled rotary embedding, half-split (not interleaved), computed in fp32."""

    def __init__(self, cfg: GptOssConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        d, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor
        freq = base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)  # [D/2]
        low, high = yarn_low_high(cfg)
        if high == low:
            high += 1e-3
        ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low)
                / (high - low)).clamp(0, 1)  # [D/2]: 0 keeps the original frequency
        inv_freq = (1 - ramp) / freq + ramp / (factor * freq)  # [D/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, D/2] fp32, attention scaling folded in."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None]
        return angles.cos() * self.mscale, angles.sin() * self.mscale

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., T, heads, D] -> rotated, same dtype; cos/sin [T, D/2]."""
        x1, x2 = x.float().chunk(2, dim=-1)  # [..., T, heads, D/2] each
        c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    @staticmethod
    def apply_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`apply` on q [N, Hq, D] and k [N, Hkv, D]; contiguous CPU bf16 ones are rotated in
        place by one native call (bit for bit the same)."""
        if (q.is_contiguous() and k.is_contiguous() and cos.dtype == torch.float32
                and _native_bf16(q, k)):
            kernels.rope_bf16_(q, k, cos, sin)
            return q, k
        return YarnRope.apply(q, cos, sin), YarnRope.apply(k, cos, sin)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
           q_pos0: int, k_pos0: int, window: int | None, scale: float) -> torch.Tensor:
    """Causal attention with sinks: `attend_reference`'s contract, computed the fastest
    verified way. Full-attention layers whose keys end with the queries (the KV-cache case) use
    torch's fused flash kernel; sliding layers read at most the window, so the reference is
    already cheap for them."""
    if (hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and q.device.type == "cpu" and q_pos0 + q.shape[1] == k_pos0 + k.shape[1]):
        if window is None:
            return attend_flash(q, k, v, sinks, scale)
        if q.shape[1] > 1:
            return attend_flash_window(q, k, v, sinks, q_pos0, k_pos0, window, scale)
    return attend_reference(q, k, v, sinks, q_pos0, k_pos0, window, scale)


def attend_flash_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                        q_pos0: int, k_pos0: int, window: int, scale: float) -> torch.Tensor:
    """Sliding-window causal attention with sinks through torch's fused flash kernel, where the
    keys end with the queries: `attend_reference`'s contract.

    Queries go in chunks of `window`; each chunk reads only the keys its window reaches
    (< 2 * window) under an additive mask, so the cost grows linearly with T, not as T^2.
    q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D].
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    out = torch.empty_like(q)
    sink = sinks.float().view(1, hq, 1)
    for t0 in range(0, t, window):
        t1 = min(t, t0 + window)
        lo = max(0, q_pos0 + t0 - window + 1 - k_pos0)
        hi = q_pos0 + t1 - k_pos0
        qp = torch.arange(q_pos0 + t0, q_pos0 + t1, device=q.device)[:, None]  # [tc, 1]
        kp = torch.arange(k_pos0 + lo, k_pos0 + hi, device=q.device)[None, :]  # [1, sc]
        mask = torch.zeros(qp.shape[0], kp.shape[1], dtype=q.dtype, device=q.device)
        mask.masked_fill_((kp > qp) | (kp <= qp - window), float("-inf"))  # [tc, sc]
        qh = q[:, t0:t1].transpose(1, 2)  # [B, Hq, tc, D]
        kh = k[:, lo:hi].transpose(1, 2).repeat_interleave(g, dim=1)  # [B, Hq, sc, D]
        vh = v[:, lo:hi].transpose(1, 2).repeat_interleave(g, dim=1)
        o, lse = flash(qh, kh, vh, 0.0, False, attn_mask=mask, scale=scale)
        o = o.float() * torch.sigmoid(lse.float() - sink)[..., None]  # the sink's share
        out[:, t0:t1] = o.to(v.dtype).transpose(1, 2)
    return out


def attend_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Full causal attention with sinks, where the last T keys belong to the T queries.

    q [B, T, Hq, D], k/v [B, S, Hkv, D], S >= T -> [B, T, Hq, D]. Keys before the last T are
    visible to every query; the last T causally. The kernel returns each row's log-sum-exp, so
    the two parts merge exactly, and the sink joins the denominator as
    out * sigmoid(lse - sink).
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qh = q.transpose(1, 2)  # [B, Hq, T, D]
    kh = k.transpose(1, 2).repeat_interleave(g, dim=1)  # [B, Hq, S, D]
    vh = v.transpose(1, 2).repeat_interleave(g, dim=1)
    own, lse = flash(qh, kh[:, :, s_len - t:], vh[:, :, s_len - t:], 0.0, True, scale=scale)
    out, lse = own.float(), lse.float()  # [B, Hq, T, D], [B, Hq, T]
    if s_len > t:
        past, lse_p = flash(qh, kh[:, :, :s_len - t], vh[:, :, :s_len - t], 0.0, False,
                            scale=scale)
        total = torch.logaddexp(lse, lse_p.float())
        out = out * torch.exp(lse - total)[..., None] + past.float() * torch.exp(
            lse_p.float() - total)[..., None]
        lse = total
    out = out * torch.sigmoid(lse - sinks.float().view(1, hq, 1))[..., None]
    return out.to(v.dtype).transpose(1, 2)  # [B, T, Hq, D]


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                     q_pos0: int, k_pos0: int, window: int | None, scale: float) -> torch.Tensor:
    """Causal attention with sinks, reference implementation.

    q [B, T, Hq, D] at positions q_pos0..; k, v [B, S, Hkv, D] at positions k_pos0..; sinks
    [Hq]. Key j is visible to query i iff j <= i and (no window or i - j < window). Each head's
    sink logit joins the softmax denominator only. Returns [B, T, Hq, D].
    Queries are processed in chunks so that scores stay within a fixed memory budget, and each
    chunk of a sliding layer reads only the keys its window can reach.
    """
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qh = q.view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    kh = k.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, S, D]
    vh = v.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, S, D]
    sink = sinks.float().view(1, hkv, g, 1, 1)
    out = torch.empty(b, hkv, g, t, d, dtype=v.dtype, device=q.device)
    span = min(s_len, window) if window else s_len
    chunk = max(1, _ATTN_SCORES_BUDGET // max(1, b * hq * (span + t)))
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        lo = 0 if window is None else max(0, q_pos0 + t0 - window + 1 - k_pos0)
        hi = min(s_len, q_pos0 + t1 - k_pos0)
        qp = torch.arange(q_pos0 + t0, q_pos0 + t1, device=q.device)[:, None]  # [tc, 1]
        kp = torch.arange(k_pos0 + lo, k_pos0 + hi, device=q.device)[None, :]  # [1, sc]
        visible = kp <= qp
        if window is not None:
            visible &= kp > qp - window
        scores = (qh[:, :, :, t0:t1] @ kh[:, :, :, lo:hi].transpose(-1, -2)).float() * scale
        scores = scores.masked_fill(~visible, float("-inf"))  # [B, Hkv, G, tc, sc]
        m = torch.maximum(scores.amax(-1, keepdim=True), sink)
        e = torch.exp(scores - m)
        p = e / (e.sum(-1, keepdim=True) + torch.exp(sink - m))
        out[:, :, :, t0:t1] = p.to(v.dtype) @ vh[:, :, :, lo:hi]
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, hq, d)


def swiglu(h: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """h [n, 2I] interleaved (even = gate, odd = linear) -> [n, I]."""
    gate = h[:, 0::2].clamp(max=limit)
    lin = h[:, 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1)


def _dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, native: bool,
                slot: int) -> torch.Tensor:
    """One expert matrix in `dtype`: on the CPU in bf16, the native kernel writes it into the
    scratch buffer `slot`, bit-identical to `dequantize`."""
    if not (native and dtype == torch.bfloat16):
        return dequantize(blocks, scales, dtype)
    shape = (*scales.shape[:-1], scales.shape[-1] * 32)
    return kernels.dequant_bf16(blocks, scales, scratch(slot, scales.numel() * 32, shape))


def moe_add(x: torch.Tensor, h: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor,
            top_k: int, w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
            w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor,
            limit: float, alpha: float,
            router_adjust: Callable[[torch.Tensor, torch.Tensor], None] | None = None
            ) -> torch.Tensor:
    """The residual MoE step x + moe(h, ...), x and h [N, H]; one native call, router
    included, for CPU bf16 decode rows without a router adjustment (as many as `linear` takes
    through the native GEMV, so that the router's logits round the same)."""
    if (router_adjust is None and 0 < h.shape[0] <= decode_layer_max_rows()
            and _native_bf16(x, h, router_w, router_b)):
        return kernels.moe_decode(x, h, router_w, router_b, top_k, w1_blocks, w1_scales,
                                  w1_bias, w2_blocks, w2_scales, w2_bias, limit, alpha)
    return x + moe(h, router_w, router_b, top_k, w1_blocks, w1_scales, w1_bias, w2_blocks,
                   w2_scales, w2_bias, limit, alpha, router_adjust)


def moe(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor, top_k: int,
        w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
        w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor,
        limit: float, alpha: float,
        router_adjust: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        ) -> torch.Tensor:
    """x [N, H] -> [N, H]. Experts stay MXFP4: for a few tokens the native kernel reads the
    packed bytes directly; for many, each expert is dequantized for this call only.

    Router: top-k of `x W_r^T + b_r`, softmax over those k. Expert e: W1_e [2I, H] from
    blocks [E, 2I, H/32, 16]; W2_e [H, I].
    """
    n, _ = x.shape
    logits = linear(x, router_w, router_b)  # [N, E]
    if router_adjust is not None:  # e.g. LoRA on the router: adds to logits in place
        router_adjust(x, logits)
    top, idx = torch.topk(logits, top_k, dim=-1)  # [N, K]
    weights = torch.softmax(top.float(), dim=-1).to(x.dtype)  # [N, K]
    if (n == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and kernels.available()):  # single-sequence decode: one native call, no loop
        return kernels.moe_token(x[0], idx[0], weights[0], w1_blocks, w1_scales, w1_bias,
                                 w2_blocks, w2_scales, w2_bias, limit, alpha
                                 ).to(x.dtype).view(1, -1)
    if (1 < n <= _MOE_ROWS_MAX and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and kernels.available()):  # batched decode: one native call, grouped by expert
        return kernels.moe_rows(x, idx, weights, w1_blocks, w1_scales, w1_bias,
                                w2_blocks, w2_scales, w2_bias, limit, alpha).to(x.dtype)
    native = x.device.type == "cpu" and kernels.available()
    f32 = native and use_f32(x, w1_bias)  # no bf16 matrix instructions: GEMMs in fp32
    flat = idx.flatten()  # [N*K]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1_blocks.shape[0]).tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sel = order[start:start + c]  # positions in [N*K]
        start += c
        rows = sel // top_k  # [c] token indices
        xe = x[rows]  # [c, H]
        if c <= (_KERNEL_MAX_ROWS_F32 if f32 else _KERNEL_MAX_ROWS) and native:
            a = swiglu(kernels.mxfp4_linear(xe, w1_blocks[e], w1_scales[e], w1_bias[e]),
                       limit, alpha)  # [c, I]
            y = kernels.mxfp4_linear(a, w2_blocks[e], w2_scales[e], w2_bias[e])  # [c, H]
        elif f32:  # cpu_gemm: each GEMM in fp32 over cache-sized dequantized chunks
            a = swiglu(mxfp4_linear_f32(xe, w1_blocks[e], w1_scales[e], w1_bias[e]),
                       limit, alpha)  # [c, I]
            y = mxfp4_linear_f32(a, w2_blocks[e], w2_scales[e], w2_bias[e])  # [c, H]
        else:
            w1 = _dequantize(w1_blocks[e], w1_scales[e], x.dtype, native, 0)  # [2I, H]
            a = swiglu(F.linear(xe, w1, w1_bias[e]), limit, alpha)  # [c, I]
            w2 = _dequantize(w2_blocks[e], w2_scales[e], x.dtype, native, 1)  # [H, I]
            y = F.linear(a, w2, w2_bias[e])  # [c, H]
        out.index_add_(0, rows, y * weights.flatten()[sel, None])
    return out
