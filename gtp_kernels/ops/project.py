"""K1: projected-gradient accumulation with the random projection generated in-kernel.

    out[:, cols] += scale * grads @ Pi^T,      Pi[j, p] = f(seed, feature_offset + p, j)

Pi (d x P) is never materialised: the Triton kernel generates each (BLOCK_P x BLOCK_D) tile of
Pi^T in registers from the counter-based generator of ``gtp_kernels.ops.philox`` (see its
docstring for the exact entry definition) and multiplies it into an fp32 accumulator with tl.dot.
Because entries depend on the *global* parameter index (int64, no wrap-around below 2^63), the
gradient of a model can be projected chunk by chunk (layer by layer, each with its offset) into
the same output, and the sum equals the projection of the concatenated gradient.

Kernel layout: grid (d tiles, batch tiles, P splits). Each program loops over its contiguous
range of P, generating the Pi tile once per iteration for all BLOCK_B rows of its batch tile, and
accumulates the transposed product out^T += Pi_tile @ G^T so that the generated tile is the
register operand of the MMA (no trip through shared memory); the last partial block of a range
is a separate masked step, so the main loop loads G without per-element masks (vector loads).
Rademacher tiles are +-1 in the operand dtype (exact in bf16/fp16), and the accumulated result is
multiplied by scale/sqrt(d) once at the end. Gaussian tiles (float32 normals) are split into a
high and a low part in 16-bit operand dtypes (two MMAs) so the product keeps ~16 bits of each
entry; on GPUs fp32 grads are split into three bf16 pieces that sum to them exactly (three MMAs
against the same exact +-1 tile, Rademacher) or use the plain fp32 "ieee" dot (Gaussian). Split-K over P is deterministic: with one split the program updates ``out`` directly; with several, each writes its
partial sum into an fp32 workspace (splits x B x d) that is reduced in a fixed order afterwards
(no atomics), so the same inputs on the same device always give the same bits.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU) operands are upcast to fp32 before tl.dot
because its bf16 dot is wrong there.

Performance model (sm_90 SASS of the bf16 Rademacher main loop, compiled offline, not yet timed):
with BLOCK_B = 128 (8 warps) one iteration generates a 128 x 64 Pi tile in ~285 instructions per
thread, ~2300 warp instructions per SM, i.e. >= ~570 issue cycles, while its 128x128x64 wgmma needs
~512 tensor-core cycles: generation and MMA are of the same order, so B >= 128 should land near the
premade-matrix matmul if wgmma overlaps the generation, and B <= 64 is generation-bound (~460
instructions per 64 x 128 tile with 4 warps), where the premade matmul is itself bound by reading
Pi from memory (2 bytes per entry). Gaussian tiles cost ~150 instructions per entry (float64
Box-Muller), an order of magnitude more: Rademacher is the fast path.
"""
from __future__ import annotations

import math

import torch

from gtp_kernels.ops import philox
from gtp_kernels.ops._dispatch import interpreting, resolve_backend
from gtp_kernels.ops._library import register
from gtp_kernels.validation import InputError, InputTypeError, check_backend, check_bool, check_int, check_real

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing: torch backend only
    triton = None

GRAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_GLOBAL_INDEX = 2**63 - 1
# torch path: generate Pi for this many (column x feature) entries at a time
_TORCH_BLOCK_ENTRIES = 1 << 22
_WORKSPACE_LIMIT_BYTES = 1 << 30


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _check_grads(name: str, grads, ndim: int) -> torch.Tensor:
    if not isinstance(grads, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(grads).__name__}")
    if grads.dim() != ndim:
        raise InputError(f"{name} must be {ndim}-D, got shape {tuple(grads.shape)}")
    if grads.dtype not in GRAD_DTYPES:
        raise InputTypeError(f"{name} must be bfloat16, float16 or float32, got {grads.dtype}")
    return grads


def _check_offset(feature_offset, n_features: int) -> int:
    feature_offset = check_int(feature_offset, "feature_offset", low=0)
    if feature_offset + n_features - 1 > MAX_GLOBAL_INDEX:
        raise InputError(f"feature_offset + n_features must stay below 2^63, got {feature_offset} + {n_features}")
    return feature_offset


def _output_view(out, out_columns, n_rows: int, n_cols: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(out, the first of the n_cols columns of out that receive the projection)."""
    if out_columns is None:
        out_columns = slice(0, n_cols)
    if not isinstance(out_columns, slice):
        raise InputTypeError(f"out_columns must be a slice, got {type(out_columns).__name__}")
    if out_columns.step not in (None, 1):
        raise InputError(f"out_columns must have step 1, got {out_columns.step}")
    start = 0 if out_columns.start is None else out_columns.start
    stop = start + n_cols if out_columns.stop is None else out_columns.stop
    if not isinstance(start, int) or not isinstance(stop, int) or start < 0 or stop - start != n_cols:
        raise InputError(f"out_columns must select {n_cols} columns [start, start + {n_cols}), got {out_columns}")
    if out is None:
        out = torch.zeros(n_rows, stop, dtype=torch.float32, device=device)
    if not isinstance(out, torch.Tensor):
        raise InputTypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise InputTypeError(f"out must be float32, got {out.dtype}")
    if out.dim() != 2 or out.shape[0] != n_rows:
        raise InputError(f"out must have shape ({n_rows}, n_cols), got {tuple(out.shape)}")
    if stop > out.shape[1]:
        raise InputError(f"out_columns {out_columns} exceed out's {out.shape[1]} columns")
    if out.device != device:
        raise InputError(f"out is on {out.device} but the inputs are on {device}")
    return out, start


# ------------------------------------------------------------------------------------------------
# The projection matrix itself (tests, references, baselines)
# ------------------------------------------------------------------------------------------------


def _inv_sqrt(d: int) -> float:
    return 1.0 / math.sqrt(d)


def projection_matrix(d: int, n_features: int, seed: int, kind: str = "rademacher", feature_offset: int = 0,
                      dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                      output_factor: bool = False) -> torch.Tensor:
    """Dense Pi[:, feature_offset : feature_offset + n_features] (d x n_features) in ``dtype``.

    Pi[j, p] = e[j, p] / sqrt(d) with e = +-1 (Rademacher) or the float32 normal z (Gaussian) of
    ``gtp_kernels.ops.philox``; the product is formed in ``dtype`` as e * (1/sqrt(d) rounded to
    dtype), which for float32 is exactly what the kernel applies to an identity input.
    ``output_factor`` gives Pi_out of the factored linear-layer projection instead.
    """
    d = check_int(d, "d", low=1)
    n_features = check_int(n_features, "n_features", low=0)
    seed = philox.check_seed(seed)
    philox.check_kind(kind)
    feature_offset = _check_offset(feature_offset, n_features)
    entries = philox.unscaled_entries(kind, seed, feature_offset, n_features, d, device, output_factor)
    return (entries.to(dtype) * torch.tensor(_inv_sqrt(d), dtype=dtype, device=entries.device)).contiguous()


# ------------------------------------------------------------------------------------------------
# Plain-torch reference: generate Pi in blocks of features and multiply (any device)
# ------------------------------------------------------------------------------------------------


def _project_torch(grads: torch.Tensor, d: int, seed: int, kind: str, feature_offset: int,
                   out_view: torch.Tensor, multiplier: float, output_factor: bool = False) -> None:
    n_rows, n_features = grads.shape
    block = max(1, _TORCH_BLOCK_ENTRIES // d)
    acc = torch.zeros(n_rows, d, dtype=torch.float32, device=grads.device)
    for start in range(0, n_features, block):
        stop = min(n_features, start + block)
        entries_t = philox.unscaled_entries_t(kind, seed, feature_offset + start, stop - start, d,
                                              grads.device, output_factor)
        acc += grads[:, start:stop].to(torch.float32) @ entries_t
    out_view += acc * multiplier


# ------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _accumulate_block(acc_t, g_ptr, stride_gb, stride_gp, rows, row_ok, p0, p_end, feature_offset, k0, k1,
                          col_start, GAUSSIAN: tl.constexpr, STREAM: tl.constexpr, DOT_DTYPE: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr, SPLIT_GAUSSIAN: tl.constexpr, SPLIT_GRADS: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, MASK_P: tl.constexpr):
        """acc_t (BLOCK_D x BLOCK_B) += Pi tile (BLOCK_D x BLOCK_P) @ G^T tile (BLOCK_P x BLOCK_B).

        The generated tile is the left operand: on Hopper wgmma takes it straight from registers, so
        it never goes through shared memory; G^T is loaded with P contiguous (vector loads)."""
        feats = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mask = row_ok[None, :]
        if MASK_P:  # only the last, partial block of a split
            mask = mask & (feats < p_end)[:, None]
        g_t = tl.load(g_ptr + feats[:, None] * stride_gp + rows[None, :] * stride_gb, mask=mask, other=0.0)
        if not SPLIT_GRADS:
            g_t = g_t.to(DOT_DTYPE)
        if GAUSSIAN:
            z_t = tl.trans(philox.gaussian_normal_tile(k0, k1, feature_offset + feats, col_start, BLOCK_P, BLOCK_D,
                                                       STREAM))
            if SPLIT_GAUSSIAN:
                # 16-bit operands: z = hi + lo (+ ~2^-17 z), two MMAs keep the entry accurate.
                z_hi = z_t.to(DOT_DTYPE)
                z_lo = (z_t - z_hi.to(tl.float32)).to(DOT_DTYPE)
                acc_t = tl.dot(z_hi, g_t, acc_t)
                acc_t = tl.dot(z_lo, g_t, acc_t)
            else:
                acc_t = tl.dot(z_t.to(DOT_DTYPE), g_t, acc_t, input_precision=INPUT_PRECISION)
        else:
            signs_t = tl.trans(philox.rademacher_sign_tile(k0, k1, feature_offset + feats, col_start, BLOCK_P,
                                                           BLOCK_D, STREAM))
            if SPLIT_GRADS:
                # fp32 grads on a GPU: g = hi + mid + lo exactly in three bf16 pieces (8 + 8 + 8 bits of
                # significand), three bf16 MMAs against the exact +-1 tile: fp32-accurate, one generation.
                signs_t = signs_t.to(tl.bfloat16)
                g_hi = g_t.to(tl.bfloat16)
                rest = g_t - g_hi.to(tl.float32)
                g_mid = rest.to(tl.bfloat16)
                g_lo = (rest - g_mid.to(tl.float32)).to(tl.bfloat16)
                acc_t = tl.dot(signs_t, g_hi, acc_t)
                acc_t = tl.dot(signs_t, g_mid, acc_t)
                acc_t = tl.dot(signs_t, g_lo, acc_t)
            elif DOT_DTYPE == tl.float32:
                acc_t = tl.dot(signs_t, g_t, acc_t, input_precision=INPUT_PRECISION)
            else:
                acc_t = tl.dot(signs_t.to(DOT_DTYPE), g_t, acc_t)  # +-1 is exact in bf16/fp16
        return acc_t

    @triton.jit(do_not_specialize=["feature_offset", "seed_lo", "seed_hi", "n_features", "p_per_split"])
    def _project_kernel(
        g_ptr, stride_gb, stride_gp, n_rows, n_features,
        out_ptr, stride_ob, stride_od,  # out view (ACCUMULATE) or workspace (splits, B, d)
        stride_ws, d, feature_offset, seed_lo, seed_hi, multiplier, p_per_split,
        GAUSSIAN: tl.constexpr, STREAM: tl.constexpr, ACCUMULATE: tl.constexpr,
        DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_GAUSSIAN: tl.constexpr,
        SPLIT_GRADS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1)
        pid_s = tl.program_id(2)
        k0 = seed_lo.to(tl.uint32)
        k1 = seed_hi.to(tl.uint32)
        rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
        col_start = pid_d * BLOCK_D
        cols = col_start + tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        p_begin = pid_s.to(tl.int64) * p_per_split
        p_end = tl.minimum(p_begin + p_per_split, n_features)
        p_full_end = p_begin + (p_end - p_begin) // BLOCK_P * BLOCK_P
        # Transposed accumulator: out^T tile (BLOCK_D x BLOCK_B), see _accumulate_block.
        acc_t = tl.zeros((BLOCK_D, BLOCK_B), dtype=tl.float32)
        for p0 in range(p_begin, p_full_end, BLOCK_P):
            acc_t = _accumulate_block(acc_t, g_ptr, stride_gb, stride_gp, rows, row_ok, p0, p_end, feature_offset,
                                      k0, k1, col_start, GAUSSIAN, STREAM, DOT_DTYPE, INPUT_PRECISION,
                                      SPLIT_GAUSSIAN, SPLIT_GRADS, BLOCK_D, BLOCK_P, False)
        if p_full_end < p_end:
            acc_t = _accumulate_block(acc_t, g_ptr, stride_gb, stride_gp, rows, row_ok, p_full_end, p_end,
                                      feature_offset, k0, k1, col_start, GAUSSIAN, STREAM, DOT_DTYPE,
                                      INPUT_PRECISION, SPLIT_GAUSSIAN, SPLIT_GRADS, BLOCK_D, BLOCK_P, True)
        mask = row_ok[None, :] & (cols < d)[:, None]
        offsets = rows[None, :] * stride_ob + cols[:, None].to(tl.int64) * stride_od
        if ACCUMULATE:
            current = tl.load(out_ptr + offsets, mask=mask, other=0.0)
            tl.store(out_ptr + offsets, current + acc_t * multiplier, mask=mask)
        else:
            tl.store(out_ptr + pid_s.to(tl.int64) * stride_ws + offsets, acc_t, mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gpu_blocks(n_rows: int, gaussian: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_D, BLOCK_P, num_warps, num_stages) of the kernel on a GPU.

    Compiled for sm_90 offline (tests/test_ops_project.py::test_kernel_compiles_for_sm90): the main
    loop has no register spills at these sizes (wgmma, Pi tile from registers, G via cp.async). The Pi
    tile (BLOCK_D x BLOCK_P) is generated once per BLOCK_B rows, so BLOCK_B is as large as fits. Not
    tuned on a GPU yet."""
    block_b = min(128, max(32, _next_pow2(n_rows)))
    block_p = 16 if gaussian else 64  # Gaussian: float64 Box-Muller spills registers at 32
    return block_b, 128, block_p, (8 if block_b == 128 else 4), 3


def _launch_config(n_rows: int, n_features: int, d: int, gaussian: bool, device: torch.device,
                   n_splits: int | None) -> dict:
    if interpreting() and device.type != "cuda":
        # Interpreter: one program at a time through numpy, so few, large programs.
        block_b = min(64, max(16, _next_pow2(n_rows)))
        block_d = min(256, max(128, _next_pow2(d)))
        block_p = 128
        warps, stages = 4, 1
        default_splits = 1
    else:
        block_b, block_d, block_p, warps, stages = gpu_blocks(n_rows, gaussian)
        tiles = triton.cdiv(d, block_d) * triton.cdiv(n_rows, block_b)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(4 * sms, tiles)  # ~4 programs per SM keeps every SM busy
        most = max(1, n_features // (8 * block_p))  # each split keeps >= 8 iterations
        by_memory = max(1, _WORKSPACE_LIMIT_BYTES // (4 * n_rows * d))
        default_splits = max(1, min(want, most, by_memory))
    splits = default_splits if n_splits is None else max(1, int(n_splits))
    p_per_split = triton.cdiv(triton.cdiv(max(n_features, 1), splits), block_p) * block_p
    splits = triton.cdiv(max(n_features, 1), p_per_split)
    return dict(block_b=block_b, block_d=block_d, block_p=block_p, warps=warps, stages=stages,
                splits=splits, p_per_split=p_per_split)


def kernel_constexprs(grads_dtype: torch.dtype, kind: str, on_gpu: bool, output_factor: bool = False) -> dict:
    """The kernel's compile-time switches for a grads dtype and kind (GPU or interpreter)."""
    gaussian = kind == "gaussian"
    split_grads = False
    if not on_gpu:
        dot_dtype, precision = tl.float32, "ieee"  # the interpreter's bf16 dot is wrong
    elif grads_dtype == torch.float32:
        # Rademacher: three exact bf16 pieces of g against the exact +-1 tile; Gaussian entries have 24
        # significant bits, so fp32 Gaussian uses the plain fp32 ("ieee") dot.
        dot_dtype, split_grads = (tl.float32, False) if gaussian else (tl.bfloat16, True)
        precision = "ieee"
    else:
        dot_dtype = tl.bfloat16 if grads_dtype == torch.bfloat16 else tl.float16
        precision = "ieee"  # unused for 16-bit operands
    stream = (philox.STREAM_GAUSSIAN if gaussian else philox.STREAM_RADEMACHER) + \
        philox.STREAM_OUTPUT_FACTOR * bool(output_factor)
    return dict(GAUSSIAN=gaussian, STREAM=stream, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
                SPLIT_GAUSSIAN=gaussian and dot_dtype != tl.float32, SPLIT_GRADS=split_grads)


def _project_triton(grads: torch.Tensor, d: int, seed: int, kind: str, feature_offset: int,
                    out_view: torch.Tensor, multiplier: float, output_factor: bool = False,
                    n_splits: int | None = None) -> None:
    """Triton path; ``n_splits`` overrides the split-K choice (tests use it to exercise both modes)."""
    n_rows, n_features = grads.shape
    max_rows = 65535 * 32  # grid dimension 1 is limited to 65535 batch tiles (BLOCK_B >= 32 on GPUs)
    if n_rows > max_rows and not interpreting():
        for start in range(0, n_rows, max_rows):
            _project_triton(grads[start:start + max_rows], d, seed, kind, feature_offset,
                            out_view[start:start + max_rows], multiplier, output_factor, n_splits)
        return
    gaussian = kind == "gaussian"
    cfg = _launch_config(n_rows, n_features, d, gaussian, grads.device, n_splits)
    on_gpu = grads.is_cuda and not interpreting()
    seed_lo, seed_hi = philox.seed_key(seed)
    grid = (triton.cdiv(d, cfg["block_d"]), triton.cdiv(n_rows, cfg["block_b"]), cfg["splits"])
    common = dict(**kernel_constexprs(grads.dtype, kind, on_gpu, output_factor), BLOCK_B=cfg["block_b"],
                  BLOCK_D=cfg["block_d"], BLOCK_P=cfg["block_p"], num_warps=cfg["warps"],
                  num_stages=cfg["stages"])
    if cfg["splits"] == 1:
        _project_kernel[grid](
            grads, grads.stride(0), grads.stride(1), n_rows, n_features,
            out_view, out_view.stride(0), out_view.stride(1),
            0, d, feature_offset, seed_lo, seed_hi, multiplier, cfg["p_per_split"],
            ACCUMULATE=True, **common)
        return
    workspace = torch.empty(cfg["splits"], n_rows, d, dtype=torch.float32, device=grads.device)
    _project_kernel[grid](
        grads, grads.stride(0), grads.stride(1), n_rows, n_features,
        workspace, workspace.stride(1), workspace.stride(2),
        workspace.stride(0), d, feature_offset, seed_lo, seed_hi, multiplier, cfg["p_per_split"],
        ACCUMULATE=False, **common)
    # Fixed-order reduction over the splits: deterministic, unlike atomics.
    out_view += workspace.sum(dim=0).mul_(multiplier)


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------


def _check_finite_result(out_view: torch.Tensor, given_out: bool, inputs: dict, check: bool) -> None:
    """One reduction over the written (B, d) columns: a NaN/Inf input always reaches them (each
    Pi entry is nonzero), and so does a float32 overflow. InputError saying which, naming the
    first bad input row; only the error path reads the inputs again."""
    # under torch.compile / torch.export the check would be a data-dependent branch (a graph
    # break, an error with fullgraph=True): traced code skips it, as torch's own checks do
    if not check or torch.compiler.is_compiling() or out_view.numel() == 0 or bool(torch.isfinite(out_view).all()):
        return
    for name, t in inputs.items():
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1))
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0])
            why = f"{name} contains NaN or Inf (first in row {row})"
            break
    else:
        why = ("the projection overflowed float32" + (" (or out held NaN/Inf before)" if given_out else "")
               + ": scale the gradients down")
    where = "; out[:, out_columns] now holds the non-finite result" if given_out else ""
    raise InputError(f"project: {why}{where} (check_finite=False skips this check)")


def _project_into_impl(grads: torch.Tensor, d: int, seed: int, kind: str, feature_offset: int,
                       out_view: torch.Tensor, multiplier: float, backend: str, output_factor: bool = False) -> None:
    """out_view += multiplier * grads @ E^T (E the unscaled entries), by device: the op's body."""
    if grads.shape[0] == 0 or grads.shape[1] == 0:
        return
    if resolve_backend(backend, grads, out_view) == "triton":
        _project_triton(grads, d, seed, kind, feature_offset, out_view, multiplier, output_factor)
    else:
        _project_torch(grads, d, seed, kind, feature_offset, out_view, multiplier, output_factor)


# The registered op torch.ops.gtp_kernels.project_accumulate (see ops/_library.py): what
# torch.compile and torch.export see. It mutates ``out`` (declared), receiving columns
# [col_start, col_start + d); passing the base tensor and a column offset rather than a column view
# keeps the mutation on a graph input. The seed (0 <= seed < 2^64) travels as the int64 with the same
# bits, as the schema's int is signed.
_SEED_WRAP = 2**64


@torch.no_grad()
def _project_accumulate_kernel(grads, out, col_start, d, seed, kind, feature_offset, multiplier, output_factor,
                               backend) -> None:
    _project_into_impl(grads, d, seed % _SEED_WRAP, kind, feature_offset, out[:, col_start:col_start + d],
                       multiplier, backend, output_factor)


def _project_accumulate_fake(grads, out, col_start, d, seed, kind, feature_offset, multiplier, output_factor,
                             backend) -> None:
    return None


_project_accumulate_op = register(
    "project_accumulate(Tensor grads, Tensor(a!) out, int col_start, int d, int seed, str kind, "
    "int feature_offset, float multiplier, bool output_factor, str backend) -> ()",
    _project_accumulate_kernel, _project_accumulate_fake)


def _project_into(grads: torch.Tensor, d: int, seed: int, kind: str, feature_offset: int, out: torch.Tensor,
                  col_start: int, multiplier: float, backend: str, output_factor: bool = False) -> None:
    """out[:, col_start:col_start + d] += multiplier * grads @ E^T through the registered op."""
    signed_seed = seed - _SEED_WRAP if seed >= 2**63 else seed
    _project_accumulate_op(grads, out, col_start, d, signed_seed, kind, feature_offset, multiplier, output_factor,
                           backend)


@torch.no_grad()
def project(grads: torch.Tensor, d: int, seed: int, kind: str = "rademacher", feature_offset: int = 0,
            out: torch.Tensor | None = None, out_columns: slice | None = None, scale: float = 1.0,
            backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """out[:, out_columns] += scale * grads @ Pi^T and return out.

    grads: (B, P) bfloat16/float16/float32, any strides. Pi (d x P):
    Pi[j, p] = f(seed, feature_offset + p, j) / sqrt(d) as defined in ``gtp_kernels.ops.philox``
    (Rademacher +-1 or Gaussian N(0, 1)), so Pi has entries +-1/sqrt(d) or N(0, 1/d).
    feature_offset: global index of grads[:, 0] in the full parameter vector (0 <= it, and
    feature_offset + P <= 2^63). out: float32 (B, n_cols), any strides, accumulated into;
    allocated as zeros (B, out_columns.stop) if None. out_columns: the d columns receiving the
    result, default slice(0, d). Accumulation is in float32.
    backend: "auto" (Triton on CUDA tensors, torch otherwise), "triton" or "torch".
    check_finite: after the projection, one reduction over the B x d columns written (small
    next to the B x P input; on CUDA it waits for the kernel) raises InputError when any is
    NaN/Inf: grads holding NaN/Inf, or a result overflowing float32. A given ``out`` has then
    been accumulated into. Pass False in a loop that checks its own results.

    Not differentiable: it runs under torch.no_grad on every path (the Triton kernel records no
    graph either), so gradients that still require grad (torch.func outputs of parameters that
    require grad) are projected without autograd holding every generated block of Pi alive.
    """
    _check_grads("grads", grads, 2)
    check_backend(backend, grads.device)  # triton on CPU tensors only in the interpreter
    check_finite = check_bool(check_finite, "check_finite")
    d = check_int(d, "d", low=1)
    seed = philox.check_seed(seed)
    philox.check_kind(kind)
    feature_offset = _check_offset(feature_offset, grads.shape[1])
    scale = check_real(scale, "scale")
    given_out = out is not None
    out, col_start = _output_view(out, out_columns, grads.shape[0], d, grads.device)
    _project_into(grads, d, seed, kind, feature_offset, out, col_start, scale * _inv_sqrt(d), backend)
    _check_finite_result(out[:, col_start:col_start + d], given_out, {"grads": grads}, check_finite)
    return out


@torch.no_grad()
def project_linear_factored(inputs: torch.Tensor, out_grads: torch.Tensor, d_in: int, d_out: int, seed: int,
                            kind: str = "rademacher", feature_offset: int = 0,
                            token_mask: torch.Tensor | None = None, out: torch.Tensor | None = None,
                            out_columns: slice | None = None, scale: float = 1.0,
                            backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Projected per-example weight gradient of a linear layer y = W x, W (n_out x n_in), under
    Pi = Pi_out (x) Pi_in, without forming per-example gradients:

        out[i, cols] += scale * vec( sum_s m[i,s] (Pi_out delta_{i,s}) (Pi_in x_{i,s})^T )

    inputs X (B, S, n_in), out_grads Delta (B, S, n_out), token_mask m (B, S) (True/1 = real token;
    padding contributes nothing; None = all tokens). vec is row-major: entry k*d_in + l pairs row k of
    Pi_out with row l of Pi_in, so with W flattened row-major (W[a, b] at global index
    feature_offset + a*n_in + b) the result equals project() of the explicit per-example gradients
    sum_s delta_s x_s^T with the materialised Kronecker matrix Pi_out (x) Pi_in.

    The factors, both functions of (seed, feature_offset) only:
      Pi_in  (d_in x n_in):  projection_matrix(d_in, n_in, seed, kind, feature_offset)
      Pi_out (d_out x n_out): projection_matrix(d_out, n_out, seed, kind, feature_offset, output_factor=True)
    i.e. column b of Pi_in / column a of Pi_out are generated at global index feature_offset + b /
    feature_offset + a, Pi_out on its own Philox stream (counter word c3 + 2) so the two factors are
    independent. Entries of the Kronecker matrix are +-1/sqrt(d_out d_in) (Rademacher) or products of
    two independent N(0, 1/d) normals (Gaussian: not itself Gaussian, still a JL projection).
    out receives d_out*d_in columns (default slice(0, d_out*d_in)). check_finite: as for
    :func:`project` (non-finite values at masked-out padding positions are fine).
    """
    _check_grads("inputs", inputs, 3)
    check_finite = check_bool(check_finite, "check_finite")
    _check_grads("out_grads", out_grads, 3)
    check_backend(backend, inputs.device)
    if inputs.shape[:2] != out_grads.shape[:2]:
        raise InputError(f"inputs and out_grads must share (B, S), got {tuple(inputs.shape)} and "
                         f"{tuple(out_grads.shape)}")
    if inputs.device != out_grads.device:
        raise InputError(f"inputs ({inputs.device}) and out_grads ({out_grads.device}) must be on one device")
    d_in = check_int(d_in, "d_in", low=1)
    d_out = check_int(d_out, "d_out", low=1)
    seed = philox.check_seed(seed)
    philox.check_kind(kind)
    n_batch, n_tokens, n_in = inputs.shape
    n_out = out_grads.shape[2]
    feature_offset = _check_offset(feature_offset, n_in * n_out)
    scale = check_real(scale, "scale")
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor):
            raise InputTypeError(f"token_mask must be a torch.Tensor or None, got {type(token_mask).__name__}")
        if tuple(token_mask.shape) != (n_batch, n_tokens):
            raise InputError(f"token_mask must have shape ({n_batch}, {n_tokens}), got {tuple(token_mask.shape)}")
        if token_mask.device != inputs.device:
            raise InputError(f"token_mask is on {token_mask.device} but inputs are on {inputs.device}")
    given_out = out is not None
    out, col_start = _output_view(out, out_columns, n_batch, d_out * d_in, inputs.device)
    if n_batch == 0 or n_tokens == 0:
        return out
    # Project every token once on each side: (B*S, d_in) and (B*S, d_out), fp32, Pi scales included.
    x_proj = torch.zeros(n_batch * n_tokens, d_in, dtype=torch.float32, device=inputs.device)
    _project_into(inputs.reshape(n_batch * n_tokens, n_in), d_in, seed, kind, feature_offset, x_proj, 0,
                  _inv_sqrt(d_in), backend)
    delta_proj = torch.zeros(n_batch * n_tokens, d_out, dtype=torch.float32, device=inputs.device)
    _project_into(out_grads.reshape(n_batch * n_tokens, n_out), d_out, seed, kind, feature_offset, delta_proj, 0,
                  _inv_sqrt(d_out), backend, output_factor=True)
    delta_proj = delta_proj.view(n_batch, n_tokens, d_out)
    x_proj = x_proj.view(n_batch, n_tokens, d_in)
    if token_mask is not None:
        # where, not a product: padding may hold non-finite junk, and 0 * inf would leak NaN.
        keep = token_mask.to(torch.bool)[:, :, None]
        delta_proj = torch.where(keep, delta_proj, 0.0)
        x_proj = torch.where(keep, x_proj, 0.0)
    # sum_s (Pi_out delta_s)(Pi_in x_s)^T for every example: one batched (d_out x S) @ (S x d_in).
    per_example = torch.bmm(delta_proj.transpose(1, 2), x_proj)
    out_view = out[:, col_start:col_start + d_out * d_in]
    out_view += per_example.reshape(n_batch, d_out * d_in) * scale
    if check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(out_view).all()):
        keep = (torch.ones(n_batch, n_tokens, dtype=torch.bool, device=inputs.device) if token_mask is None
                else token_mask.to(torch.bool))[:, :, None]
        _check_finite_result(out_view, given_out, {"inputs": torch.where(keep, inputs, 0),
                                                   "out_grads": torch.where(keep, out_grads, 0)}, True)
    return out
