r"""The fused log-prob head's two elementwise passes, as Triton kernels (GPU) or plain torch (anywhere).

Per chunk of logits ``z`` (``[rows, cols]``, bf16 on a GPU) the head needs, in fp32:

* forward:  ``S_i = sum_j exp(z_ij - M_i)`` for a given row maximum ``M``;
* backward: ``g_ij = -grad_out_i * (exp(z_ij - lse_i) - [j == y_i])``, written over ``z`` in place.

With final logit soft-capping (``softcap`` = c, Gemma-2) the softmax is over ``c * tanh(z / c)`` instead of
``z``: both passes cap each element as they read it (``M`` and ``lse`` are then of the capped logits), and the
backward multiplies by the cap's derivative ``1 - tanh(z / c)^2`` (as ``4 e^-2|u| / (1 + e^-2|u|)^2``,
``u = z / c``, which keeps its relative accuracy where the difference would cancel), so ``z`` stays the
raw logits throughout.

In torch each is a chain of kernels with fp32 temporaries (cast + subtract, exp, sum; or cast + subtract,
exp, scatter, multiply, cast): about 16 bytes of memory traffic per element forward and 20 backward, on
``tokens x vocab`` elements. The Triton kernels read the bf16 logits once (and, backward, write them once):
2 and 4 bytes per element, and no fp32 temporary at all. The arithmetic is the same fp32 arithmetic
(``exp`` of ``z - M`` after an exact cast), so the two implementations agree to a few fp32 ulps.

``kernel`` selects: ``"auto"`` (Triton for CUDA tensors when Triton imports, else torch), ``"torch"``, or
``"triton"`` (an error where it cannot run; on a CPU it runs under ``TRITON_INTERPRET=1``, which the tests use).
"""

from __future__ import annotations

import functools

import torch

KERNELS = ("auto", "torch", "triton")

# The torch fallback's fp32 temporaries cover 1/_FP32_BLOCKS of a chunk at a time: blocks stay large enough
# (a quarter of 4096 x 128256 in fp32 is 0.5 GiB) for elementwise kernels to run at memory bandwidth.
_FP32_BLOCKS = 4

# Columns per Triton program step: 8 KiB of bf16 per load.
_BLOCK = 4096


@functools.cache
def _triton():
    """The Triton kernels, compiled lazily; ``None`` when Triton does not import."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton (or a broken one): the torch path is used
        return None

    # A module global, not a local: Triton's interpreter runs kernels against their module's globals only.
    global _tanh

    @triton.jit
    def _tanh(x):
        # From exp (the interpreter runs no libdevice): an odd Taylor polynomial below |x| = 1/4 (relative
        # error < 1e-8 there, where 1 - e^-2|x| would cancel), (1 - e^-2|x|) / (1 + e^-2|x|) above.
        a = tl.abs(x)
        a2 = a * a
        small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
        t = tl.exp(-2.0 * a)
        th = tl.where(a < 0.25, small, (1.0 - t) / (1.0 + t))
        return tl.where(x < 0, -th, th)

    @triton.jit
    def sum_exp_kernel(z_ptr, stride_row, n_cols, row_max_ptr, out_ptr, softcap, BLOCK: tl.constexpr,
                       SOFTCAP: tl.constexpr):
        # One program per row: out[row] = sum_j exp(y[row, j] - row_max[row]) in fp32,
        # y = z, or softcap * tanh(z / softcap) with SOFTCAP.
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_row
        m = tl.load(row_max_ptr + row)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                z = softcap * _tanh(z / softcap)
            acc += tl.where(mask, tl.exp(z - m), 0.0)
        tl.store(out_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def softmax_grad_kernel(z_ptr, stride_row, n_cols, lse_ptr, scale_ptr, target_ptr, softcap, BLOCK: tl.constexpr,
                            ROUND_TO_BF16: tl.constexpr, SOFTCAP: tl.constexpr):
        # Program (row, column block): z <- scale[row] * (exp(y - lse[row]) - [col == target[row]]) * dy/dz,
        # y = z and dy/dz = 1, or y = softcap * tanh(u) with u = z / softcap and dy/dz = 1 - tanh(u)^2,
        # computed as 4 e^-2|u| / (1 + e^-2|u|)^2: 1 - tanh^2 would round to 0 in fp32 once |u| > 9.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        ptrs = z_ptr + row * stride_row + cols
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            u = z / softcap
            z = softcap * _tanh(u)
        p = tl.exp(z - tl.load(lse_ptr + row))
        p = tl.where(cols == tl.load(target_ptr + row), p - 1.0, p)
        g = p * tl.load(scale_ptr + row)
        if SOFTCAP:
            t = tl.exp(-2.0 * tl.abs(u))
            g = g * (4.0 * t / ((1.0 + t) * (1.0 + t)))
        if ROUND_TO_BF16:
            # Round to nearest even on the bits, as torch casts (Triton's interpreter would truncate).
            bits = g.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(ptrs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptrs, g.to(z_ptr.dtype.element_ty), mask=mask)

    return triton, sum_exp_kernel, softmax_grad_kernel


def resolve(kernel: str, tensor: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for work on ``tensor``."""
    if kernel not in KERNELS:
        raise ValueError(f"head kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel == "auto":
        return "triton" if tensor.is_cuda and _triton() is not None else "torch"
    if kernel == "triton" and _triton() is None:
        raise RuntimeError("head kernel 'triton' asked for, but Triton does not import")
    return kernel


def softcap_fp32(z: torch.Tensor, softcap: float) -> torch.Tensor:
    """``softcap * tanh(z / softcap)`` in fp32 (HF Gemma-2's order of operations), a new tensor."""
    return torch.tanh(z.float() / softcap) * softcap


def sum_exp(z: torch.Tensor, row_max: torch.Tensor, kernel: str = "auto", overwrite: bool = False,
            softcap: float | None = None) -> torch.Tensor:
    """``[rows]`` fp32 ``sum_j exp(y[i, j] - row_max[i])`` for logits ``z [rows, cols]`` (any float dtype)
    and fp32 ``row_max [rows]``, where ``y = z``, or ``softcap * tanh(z / softcap)`` with ``softcap``.
    ``z`` is left as it was unless ``overwrite`` allows the torch path to use an fp32 ``z`` as its scratch
    space."""
    rows, cols = z.shape
    if resolve(kernel, z) == "torch":
        out = torch.empty(rows, dtype=torch.float32, device=z.device)
        for r0, r1 in _row_blocks(rows):
            if softcap is None:
                shifted = _minus_rows_fp32(z[r0:r1], row_max[r0:r1], in_place=overwrite)  # [rows, cols] fp32
            else:
                shifted = softcap_fp32(z[r0:r1], softcap).sub_(row_max[r0:r1, None])  # [rows, cols] fp32
            out[r0:r1] = shifted.exp_().sum(dim=-1)
            del shifted
        return out
    _, sum_exp_kernel, _ = _triton()
    z = _row_major(z)
    out = torch.empty(rows, dtype=torch.float32, device=z.device)
    if rows:
        sum_exp_kernel[(rows,)](z, z.stride(0), cols, row_max.float().contiguous(), out, float(softcap or 1.0),
                                BLOCK=_BLOCK, SOFTCAP=softcap is not None, num_warps=8)
    return out


def softmax_grad_(z: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor, target: torch.Tensor,
                  kernel: str = "auto", softcap: float | None = None) -> torch.Tensor:
    """In place: ``z[i, j] <- scale[i] * (exp(z[i, j] - lse[i]) - [j == target[i]])``, in fp32, rounded
    once to ``z``'s dtype. ``target[i] < 0`` (or ``>= cols``) marks a row with no target column here.

    With ``scale = -grad_out`` this is the gradient of ``grad_out * log_softmax(z)[target]`` w.r.t. ``z``.
    ``p - 1`` is formed in fp32 before any rounding, so it stays accurate as ``p -> 1``.

    With ``softcap`` the softmax is over ``y = softcap * tanh(z / softcap)`` (``lse`` of ``y``) and the
    result is the gradient w.r.t. the raw ``z``: the above in ``y``, times ``1 - tanh(z / softcap)^2``.
    """
    rows, cols = z.shape
    impl = resolve(kernel, z)
    if z.numel() == 0:  # a TP rank whose shard is all padding: nothing to write
        return z
    if impl == "torch":
        has_target = (target >= 0) & (target < cols)  # [rows]
        col = target.clamp(0, cols - 1)[:, None]  # [rows, 1]
        minus_onehot = torch.where(has_target, -1.0, 0.0)[:, None]  # [rows, 1]; a scatter of 0 elsewhere
        for r0, r1 in _row_blocks(rows):
            if softcap is None:
                block = _minus_rows_fp32(z[r0:r1], lse[r0:r1], in_place=z.dtype == torch.float32)  # z - lse
            else:
                u = z[r0:r1].float() / softcap  # [rows, cols] fp32
                block = torch.tanh(u).mul_(softcap).sub_(lse[r0:r1, None])  # y - lse
            block.exp_()  # p
            block.scatter_add_(1, col[r0:r1], minus_onehot[r0:r1])  # p - onehot
            if softcap is not None:
                # * dy/dz = 1 - tanh(u)^2 = 4 e^-2|u| / (1 + e^-2|u|)^2 (no cancellation as |u| grows)
                t = u.abs_().mul_(-2.0).exp_()
                block.mul_(t.mul(4.0).div_(t.add_(1.0).square_()))
                del u, t
            torch.mul(block, scale[r0:r1, None], out=z[r0:r1])  # cast on write
            del block
        return z
    _, _, softmax_grad_kernel = _triton()
    if z.stride(1) != 1:
        raise ValueError("softmax_grad_ works in place: z must have unit column stride")
    grid = (rows, -(-cols // _BLOCK))
    softmax_grad_kernel[grid](z, z.stride(0), cols, lse.float().contiguous(), scale.float().contiguous(),
                              target.to(torch.int64).contiguous(), float(softcap or 1.0), BLOCK=_BLOCK,
                              ROUND_TO_BF16=z.dtype == torch.bfloat16, SOFTCAP=softcap is not None, num_warps=8)
    return z


def _row_major(z: torch.Tensor) -> torch.Tensor:
    return z if z.stride(1) == 1 else z.contiguous()


def _row_blocks(num_rows: int):
    """``_FP32_BLOCKS`` contiguous row ranges ``(r0, r1)`` covering ``num_rows`` (fewer if it is small)."""
    step = max(1, -(-num_rows // _FP32_BLOCKS))
    return [(r0, min(num_rows, r0 + step)) for r0 in range(0, num_rows, step)]


def _minus_rows_fp32(z: torch.Tensor, row_values: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``z - row_values[:, None]`` in fp32: one pass that casts and subtracts into a new tensor, or in place
    when ``z`` is fp32 and the caller allows it."""
    if in_place and z.dtype == torch.float32:
        return z.sub_(row_values[:, None])
    return torch.sub(z, row_values[:, None]).float()  # bf16 - fp32 promotes to fp32: one pass
