"""Triton kernels for batched LoRA: BGMV (gathered, decode) and SGMV (segmented, prefill).

Shapes used throughout (``N`` slots, ``R`` the slots' maximum rank, ``r`` the rank group):

    x      [T, d_in]      token rows of one rank group, sorted by slot
    a      [N, R, d_in]   LoRA A per slot; rows >= an adapter's rank are zero
    b      [N, R, d_out]  scale · Bᵀ per slot
    h      [T, r]         fp32 shrink result
    y      [T, d_out]     expand result, in x's dtype

Shrink: ``h[t] = a[s_t, :r] @ x[t]``; expand: ``y[t] = h[t] @ b[s_t, :r]``. BGMV gives every
token its own slot index ``s_t``; SGMV walks segments ``[start, start + len)`` of rows that
share one slot, so each program reads its adapter's weights once per tile of rows.
On machines without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests compare them with :func:`~quiver.backend.engine.lora.lora_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["bgmv_shrink", "bgmv_expand", "sgmv_shrink", "sgmv_expand"]


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, idx_ptr, h_ptr, d_in, rank,
                        stride_xt, stride_an, stride_ar, stride_ht,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(idx_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + t * stride_xt + offs_k, mask=offs_k < d_in, other=0.0)
        a = tl.load(a_ptr + slot * stride_an + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=(offs_r[:, None] < rank) & (offs_k[None, :] < d_in), other=0.0)
        acc += tl.sum(a.to(tl.float32) * xk.to(tl.float32)[None, :], axis=1)
    tl.store(h_ptr + t * stride_ht + offs_r, acc, mask=offs_r < rank)


@triton.jit
def _bgmv_expand_kernel(h_ptr, b_ptr, idx_ptr, y_ptr, d_out, rank,
                        stride_ht, stride_bn, stride_br, stride_yt,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    slot = tl.load(idx_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    h = tl.load(h_ptr + t * stride_ht + offs_r, mask=offs_r < rank, other=0.0)
    b = tl.load(b_ptr + slot * stride_bn + offs_r[:, None] * stride_br + offs_n[None, :],
                mask=(offs_r[:, None] < rank) & (offs_n[None, :] < d_out), other=0.0)
    y = tl.sum(h[:, None] * b.to(tl.float32), axis=0)
    tl.store(y_ptr + t * stride_yt + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < d_out)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, h_ptr,
                        d_in, rank, stride_xt, stride_an, stride_ar, stride_ht,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    length = tl.load(seg_len_ptr + seg)
    if m0 < length:
        start = tl.load(seg_start_ptr + seg).to(tl.int64)
        slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + (start + offs_m)[:, None] * stride_xt + offs_k[None, :],
                        mask=(offs_m[:, None] < length) & (offs_k[None, :] < d_in), other=0.0)
            a = tl.load(a_ptr + slot * stride_an + offs_r[None, :] * stride_ar
                        + offs_k[:, None],
                        mask=(offs_r[None, :] < rank) & (offs_k[:, None] < d_in), other=0.0)
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        tl.store(h_ptr + (start + offs_m)[:, None] * stride_ht + offs_r[None, :], acc,
                 mask=(offs_m[:, None] < length) & (offs_r[None, :] < rank))


@triton.jit
def _sgmv_expand_kernel(h_ptr, b_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, y_ptr,
                        d_out, rank, stride_ht, stride_bn, stride_br, stride_yt,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    n0 = tl.program_id(2) * BLOCK_N
    length = tl.load(seg_len_ptr + seg)
    if m0 < length:
        start = tl.load(seg_start_ptr + seg).to(tl.int64)
        slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        h = tl.load(h_ptr + (start + offs_m)[:, None] * stride_ht + offs_r[None, :],
                    mask=(offs_m[:, None] < length) & (offs_r[None, :] < rank), other=0.0)
        b = tl.load(b_ptr + slot * stride_bn + offs_r[:, None] * stride_br + offs_n[None, :],
                    mask=(offs_r[:, None] < rank) & (offs_n[None, :] < d_out), other=0.0)
        y = tl.dot(h, b.to(tl.float32), input_precision="ieee")
        tl.store(y_ptr + (start + offs_m)[:, None] * stride_yt + offs_n[None, :],
                 y.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < length) & (offs_n[None, :] < d_out))


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _check_weights(w: torch.Tensor, rank: int, dim: int, name: str) -> None:
    assert w.dim() == 3, f"{name} must be [slots, max_rank, features], got {tuple(w.shape)}"
    assert w.stride(2) == 1, f"{name}'s feature dimension must be contiguous"
    assert 0 < rank <= w.shape[1], f"rank {rank} outside (0, {w.shape[1]}]"
    assert w.shape[2] == dim, f"{name} has {w.shape[2]} features, expected {dim}"


def bgmv_shrink(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, rank: int) -> torch.Tensor:
    """h [T, rank] fp32 with ``h[t] = a[idx[t], :rank] @ x[t]``.

    x: [T, d_in] contiguous rows; a: [N, R, d_in]; idx: [T] int slot per token.
    """
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [T, d_in] with contiguous rows"
    _check_weights(a, rank, x.shape[1], "a")
    assert x.dtype == a.dtype, f"x is {x.dtype}, a is {a.dtype}"
    assert idx.shape == (x.shape[0],) and not idx.is_floating_point()
    assert x.device == a.device == idx.device
    h = torch.empty(x.shape[0], rank, device=x.device, dtype=torch.float32)
    if x.shape[0]:
        _bgmv_shrink_kernel[(x.shape[0],)](
            x, a, idx, h, x.shape[1], rank, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
            BLOCK_R=_block_r(rank), BLOCK_K=min(128, triton.next_power_of_2(x.shape[1])))
    return h


def bgmv_expand(h: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, rank: int) -> torch.Tensor:
    """y [T, d_out] in b's dtype with ``y[t] = h[t] @ b[idx[t], :rank]``.

    h: [T, rank] fp32 contiguous; b: [N, R, d_out]; idx: [T] int slot per token.
    """
    assert h.dim() == 2 and h.is_contiguous() and h.dtype == torch.float32
    assert h.shape[1] == rank
    assert b.dim() == 3
    _check_weights(b, rank, b.shape[2], "b")
    assert idx.shape == (h.shape[0],) and not idx.is_floating_point()
    d_out = b.shape[2]
    y = torch.empty(h.shape[0], d_out, device=b.device, dtype=b.dtype)
    block_n = min(256, triton.next_power_of_2(d_out))
    if h.shape[0]:
        _bgmv_expand_kernel[(h.shape[0], triton.cdiv(d_out, block_n))](
            h, b, idx, y, d_out, rank, h.stride(0), b.stride(0), b.stride(1), y.stride(0),
            BLOCK_R=_block_r(rank), BLOCK_N=block_n)
    return y


def _check_segments(seg_start: torch.Tensor, seg_len: torch.Tensor,
                    seg_slot: torch.Tensor) -> None:
    assert seg_start.dim() == 1 and seg_start.shape == seg_len.shape == seg_slot.shape
    for t in (seg_start, seg_len, seg_slot):
        assert t.dtype == torch.int32 and t.is_contiguous(), "segment tensors must be int32"


def sgmv_shrink(x: torch.Tensor, a: torch.Tensor, seg_start: torch.Tensor,
                seg_len: torch.Tensor, seg_slot: torch.Tensor, rank: int,
                max_seg: int) -> torch.Tensor:
    """h [T, rank] fp32; rows ``seg_start[s] .. + seg_len[s]`` use slot ``seg_slot[s]``.

    x: [T, d_in] contiguous rows, sorted so segments are contiguous; a: [N, R, d_in];
    seg_*: [S] int32; max_seg: the longest segment (sizes the grid).
    """
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [T, d_in] with contiguous rows"
    _check_weights(a, rank, x.shape[1], "a")
    assert x.dtype == a.dtype, f"x is {x.dtype}, a is {a.dtype}"
    _check_segments(seg_start, seg_len, seg_slot)
    h = torch.zeros(x.shape[0], rank, device=x.device, dtype=torch.float32)
    block_m = 16 if max_seg <= 16 else 32
    if seg_len.numel() and max_seg:
        _sgmv_shrink_kernel[(seg_len.numel(), triton.cdiv(max_seg, block_m))](
            x, a, seg_start, seg_len, seg_slot, h, x.shape[1], rank, x.stride(0), a.stride(0),
            a.stride(1), h.stride(0), BLOCK_M=block_m, BLOCK_R=_block_r(rank),
            BLOCK_K=min(64, max(16, triton.next_power_of_2(x.shape[1]))))
    return h


def sgmv_expand(h: torch.Tensor, b: torch.Tensor, seg_start: torch.Tensor,
                seg_len: torch.Tensor, seg_slot: torch.Tensor, rank: int,
                max_seg: int) -> torch.Tensor:
    """y [T, d_out] in b's dtype; ``y[t] = h[t] @ b[seg_slot[s], :rank]`` for t in segment s.

    h: [T, rank] fp32 contiguous; b: [N, R, d_out]; seg_*: [S] int32.
    """
    assert h.dim() == 2 and h.is_contiguous() and h.dtype == torch.float32
    assert h.shape[1] == rank
    _check_weights(b, rank, b.shape[2], "b")
    _check_segments(seg_start, seg_len, seg_slot)
    d_out = b.shape[2]
    y = torch.zeros(h.shape[0], d_out, device=b.device, dtype=b.dtype)
    block_m = 16 if max_seg <= 16 else 32
    block_n = min(128, max(16, triton.next_power_of_2(d_out)))
    if seg_len.numel() and max_seg:
        _sgmv_expand_kernel[(seg_len.numel(), triton.cdiv(max_seg, block_m),
                             triton.cdiv(d_out, block_n))](
            h, b, seg_start, seg_len, seg_slot, y, d_out, rank, h.stride(0), b.stride(0),
            b.stride(1), y.stride(0), BLOCK_M=block_m, BLOCK_R=_block_r(rank),
            BLOCK_N=block_n)
    return y
