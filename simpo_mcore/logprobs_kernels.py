r"""The fused log-prob head's two elementwise passes, as Triton kernels (GPU) or plain torch (anywhere).

Per chunk of logits ``z`` (``[rows, cols]``, bf16 on a GPU) the head needs, in fp32:

* forward:  ``S_i = sum_j exp(z_ij - M_i)`` for a given row maximum ``M``;
* backward: ``g_ij = -grad_out_i * (exp(z_ij - lse_i) - [j == y_i])``, written over ``z`` in place.

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

    @triton.jit
    def sum_exp_kernel(z_ptr, stride_row, n_cols, row_max_ptr, out_ptr, BLOCK: tl.constexpr):
        # One program per row: out[row] = sum_j exp(z[row, j] - row_max[row]), fp32.
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_row
        m = tl.load(row_max_ptr + row)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            acc += tl.exp(z - m)
        tl.store(out_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def softmax_grad_kernel(z_ptr, stride_row, n_cols, lse_ptr, scale_ptr, target_ptr, BLOCK: tl.constexpr,
                            ROUND_TO_BF16: tl.constexpr):
        # Program (row, column block): z <- scale[row] * (exp(z - lse[row]) - [col == target[row]]).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        ptrs = z_ptr + row * stride_row + cols
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - tl.load(lse_ptr + row))
        p = tl.where(cols == tl.load(target_ptr + row), p - 1.0, p)
        g = p * tl.load(scale_ptr + row)
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


def sum_exp(z: torch.Tensor, row_max: torch.Tensor, kernel: str = "auto", overwrite: bool = False
            ) -> torch.Tensor:
    """``[rows]`` fp32 ``sum_j exp(z[i, j] - row_max[i])`` for logits ``z [rows, cols]`` (any float dtype)
    and fp32 ``row_max [rows]``. ``z`` is left as it was unless ``overwrite`` allows the torch path to
    use an fp32 ``z`` as its scratch space."""
    rows, cols = z.shape
    if resolve(kernel, z) == "torch":
        out = torch.empty(rows, dtype=torch.float32, device=z.device)
        for r0, r1 in _row_blocks(rows):
            shifted = _minus_rows_fp32(z[r0:r1], row_max[r0:r1], in_place=overwrite)  # [rows, cols] fp32
            out[r0:r1] = shifted.exp_().sum(dim=-1)
            del shifted
        return out
    _, sum_exp_kernel, _ = _triton()
    z = _row_major(z)
    out = torch.empty(rows, dtype=torch.float32, device=z.device)
    if rows:
        sum_exp_kernel[(rows,)](z, z.stride(0), cols, row_max.float().contiguous(), out, BLOCK=_BLOCK,
                                num_warps=8)
    return out


def softmax_grad_(z: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor, target: torch.Tensor,
                  kernel: str = "auto") -> torch.Tensor:
    """In place: ``z[i, j] <- scale[i] * (exp(z[i, j] - lse[i]) - [j == target[i]])``, in fp32, rounded
    once to ``z``'s dtype. ``target[i] < 0`` (or ``>= cols``) marks a row with no target column here.

    With ``scale = -grad_out`` this is the gradient of ``grad_out * log_softmax(z)[target]`` w.r.t. ``z``.
    ``p - 1`` is formed in fp32 before any rounding, so it stays accurate as ``p -> 1``.
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
            block = _minus_rows_fp32(z[r0:r1], lse[r0:r1], in_place=z.dtype == torch.float32)  # z - lse
            block.exp_()  # p
            block.scatter_add_(1, col[r0:r1], minus_onehot[r0:r1])  # p - onehot
            torch.mul(block, scale[r0:r1, None], out=z[r0:r1])  # cast on write
            del block
        return z
    _, _, softmax_grad_kernel = _triton()
    if z.stride(1) != 1:
        raise ValueError("softmax_grad_ works in place: z must have unit column stride")
    grid = (rows, -(-cols // _BLOCK))
    softmax_grad_kernel[grid](z, z.stride(0), cols, lse.float().contiguous(), scale.float().contiguous(),
                              target.to(torch.int64).contiguous(), BLOCK=_BLOCK,
                              ROUND_TO_BF16=z.dtype == torch.bfloat16, num_warps=8)
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
