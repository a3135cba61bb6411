"""fastvq.nearest_code: distance + argmin over a codebook without materializing N x K.

Every backend implements one maximisation (see fastvq.reference.nearest_code):
idx[n] = argmax_k (z[n] . c[k]) * scale[k] + bias[k], with (scale, bias) derived from the metric
here, so kernels know nothing about metrics.
"""

import torch

from fastvq._ext import EXTENSION_ERROR, fake_on_one_device, has_kernel, refuse_gradient
from fastvq.ops._backends import autocast_off, check_backend, pick_backend
from fastvq.ops._validate import check_choice, check_finite, check_floating, check_int
from fastvq.reference import METRICS, code_terms, inv_norm, topk_scores
from fastvq.reference.nearest_code import _CHUNK_ELEMENTS, _TOPK_CHUNK_ELEMENTS

PRECISIONS = ("exact", "fast")
MAX_DIM = 1024
# Largest k of the top-k search: the Triton kernel keeps a row's k best in registers.
MAX_TOPK = 128
# Most codes the GPU kernels search: they index codes in int32, with a margin for the last tile.
MAX_GPU_CODES = 2**31 - 2**16

# Triton backend: an opaque custom op (not triton_op) so that importing fastvq does not import
# Triton (0.44 s here); torch.compile keeps it as one node with the fake below. `screen` as in
# fastvq::nearest_code's schema (csrc/fastvq.cpp): how an exact float32 search runs, not what it
# returns.


@torch.library.custom_op("fastvq::nearest_code_triton", mutates_args=())
def _nearest_code_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    code_scale: torch.Tensor | None,
    code_bias: torch.Tensor | None,
    fast: bool,
    screen: bool | None = None,
) -> torch.Tensor:
    from fastvq.kernels.nearest_code import nearest_code_triton

    return nearest_code_triton(z, codebook, code_scale, code_bias, fast, screen=screen)


@_nearest_code_triton.register_fake
def _(z, codebook, code_scale, code_bias, fast, screen=None):
    fake_on_one_device("nearest_code_triton", z, codebook, code_scale, code_bias)
    return z.new_empty(z.shape[0], dtype=torch.int64)


@torch.library.custom_op("fastvq::nearest_code_topk_triton", mutates_args=())
def _nearest_code_topk_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    code_scale: torch.Tensor | None,
    code_bias: torch.Tensor | None,
    k: int,
    fast: bool,
) -> torch.Tensor:
    from fastvq.kernels.nearest_code import nearest_code_topk_triton

    return nearest_code_topk_triton(z, codebook, code_scale, code_bias, k, fast)


@_nearest_code_topk_triton.register_fake
def _(z, codebook, code_scale, code_bias, k, fast):
    fake_on_one_device("nearest_code_topk_triton", z, codebook, code_scale, code_bias)
    return z.new_empty(z.shape[0], k, dtype=torch.int64)


if EXTENSION_ERROR is None:

    @torch.library.register_fake("fastvq::nearest_code")
    def _(z, codebook, code_scale, code_bias, fast, screen=None):
        fake_on_one_device("nearest_code", z, codebook, code_scale, code_bias)
        return z.new_empty(z.shape[0], dtype=torch.int64)


@torch.library.custom_op("fastvq::squared_norms_triton", mutates_args=())
def _squared_norms_triton(x: torch.Tensor) -> torch.Tensor:
    from fastvq.kernels.nearest_code import squared_norms_triton

    return squared_norms_triton(x)


@_squared_norms_triton.register_fake
def _(x):
    return x.new_empty(x.shape[0], dtype=torch.float64)


_HAS_SQUARED_NORMS = has_kernel("squared_norms", "CPU")
if _HAS_SQUARED_NORMS:

    @torch.library.register_fake("fastvq::squared_norms")
    def _(x):
        return x.new_empty(x.shape[0], dtype=torch.float64)

    refuse_gradient("squared_norms", "x.double().square().sum(1) has one")


def _squared_norms(codebook, metric, backend):
    """The codes' squared norms, float64 (K,), for the code terms of `backend`'s search, or None
    where code_terms computes them itself. The C++ CPU and the Triton kernels read the codebook
    once (fastvq::squared_norms, squared_norms_triton), where code_terms first writes a K x D
    float64 copy (or vector_norm's) and reads it back. On CPUs that temporary is
    freshly allocated memory, whose page faults alone cost more than the search at a few rows
    over a large codebook (K = 2^18, D = 32)."""
    if metric == "dot":
        return None
    if backend == "cpu" and _HAS_SQUARED_NORMS:
        return torch.ops.fastvq.squared_norms(codebook)
    if backend == "triton":
        return _squared_norms_triton(codebook)
    return None


# A build from before the top-k kernel existed still loads; "cpu" then runs the torch path.
_HAS_TOPK_CPU = has_kernel("nearest_code_topk", "CPU")
if _HAS_TOPK_CPU:

    @torch.library.register_fake("fastvq::nearest_code_topk")
    def _(z, codebook, code_scale, code_bias, k, fast):
        fake_on_one_device("nearest_code_topk", z, codebook, code_scale, code_bias)
        return z.new_empty(z.shape[0], k, dtype=torch.int64)


def _score_chunks(z, codebook, code_scale, code_bias, fast, elements):
    """(start, scores) for row chunks of about `elements` scores each (float32; float64 inputs
    score in float64)."""
    # The reference recomputes (scale, bias) from the metric; here they are given, so score chunks
    # directly. fast on CUDA: bf16 matmul, the precision users get from autocast.
    fast = fast and z.is_cuda and z.dtype == torch.float32  # as the kernels: float32 inputs only
    compute = torch.bfloat16 if fast else torch.promote_types(z.dtype, torch.float32)
    zc, cc = z.to(compute), codebook.to(compute)
    rows = max(1, elements // codebook.shape[0])
    for start in range(0, z.shape[0], rows):
        with autocast_off(z.device.type):  # the caller's autocast would make an exact search bf16
            scores = zc[start : start + rows] @ cc.T
        scores = scores.to(torch.promote_types(compute, torch.float32))
        if code_scale is not None:
            scores.mul_(code_scale)
        if code_bias is not None:
            scores.add_(code_bias)
        yield start, scores
        # Dropped here and by the caller before the next chunk's matmul: else two chunks live.
        del scores


def _nearest_code_torch(z, codebook, code_scale, code_bias, fast):
    # Chunks concatenated, not written into an (N,) buffer: torch.func.vmap cannot write a
    # per-example result into a tensor made outside it.
    chunks = [torch.empty(0, dtype=torch.int64, device=z.device)]
    for _, scores in _score_chunks(z, codebook, code_scale, code_bias, fast, _CHUNK_ELEMENTS):
        # NaN never wins (argmax would pick it); in place, without a mask of the chunk.
        chunks.append(
            scores.nan_to_num_(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf).argmax(1)
        )
        del scores  # _score_chunks says why
    return torch.cat(chunks)


def _nearest_code_topk_torch(z, codebook, code_scale, code_bias, k, fast):
    out = torch.empty(z.shape[0], k, dtype=torch.int64, device=z.device)
    for start, scores in _score_chunks(
        z, codebook, code_scale, code_bias, fast, _TOPK_CHUNK_ELEMENTS
    ):
        out[start : start + scores.shape[0]] = topk_scores(scores, k)
        del scores
    return out


_KERNELS = {
    "torch": _nearest_code_torch,
    "triton": _nearest_code_triton,
    "cpu": lambda *args: torch.ops.fastvq.nearest_code(*args),
    "cuda": lambda *args: torch.ops.fastvq.nearest_code(*args),
}
# No CUDA C++ top-k kernel: on CUDA tensors Triton runs it.
_TOPK_KERNELS = {
    "torch": _nearest_code_topk_torch,
    "triton": _nearest_code_topk_triton,
    "cpu": lambda *args: torch.ops.fastvq.nearest_code_topk(*args),
}


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    precision: str = "exact",
    backend: str = "auto",
    return_distance: bool = False,
    check_inputs_finite: bool = True,
    k: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code (or k nearest) for every vector of z, never building N x K.

    Args:
        z: (..., D) float32, bfloat16 or float16 (float64 with backend "torch" or "auto").
        codebook: (K, D), K >= 1, 1 <= D <= 1024, on z's device. A dtype different from z's is
            promoted with it (bf16 z and a float32 codebook search in float32).
        metric: "l2" (squared Euclidean, minimised), "cosine" (cosine similarity, maximised) or
            "dot" (inner product, maximised).
        precision: "exact": products accumulate in float32 with float32-accurate products, so the
            chosen code is the float32 argmin up to float32 rounding. That rounding is of the
            scores z . c - |c|^2 / 2 (l2), so relative to |z| |c|, not to the distances: data far
            from the origin for its spread (an offset of 1000, a spread of 0.01) lose their
            nearest code; center them first (l2 distances do not change). "fast": float32 inputs
            may use bf16/tf32 tensor cores on GPU, and the "triton" backend under
            TRITON_INTERPRET=1 emulates that; backends "cpu" and "torch" run it as exact.
        backend: "auto", "triton", "cuda", "cpu" or "torch"; see fastvq.backends().
        return_distance: also return the chosen code's distance (l2), similarity (cosine) or
            inner product (dot), recomputed directly in float32 (float64 for float64 inputs) from
            z and the chosen code, differentiable with respect to both.
        check_inputs_finite: raise ValueError if z or codebook holds NaN or Inf (one reduction and
            one host sync per call; skipped under torch.compile). With False, non-finite inputs
            give defined but meaningless indices: NaN scores never win and a row whose scores are
            all NaN or -inf gets index 0 (with k: 0, 1, ..., k-1).
        k: None for the nearest code; an int in [1, min(K, 128)] for the k nearest, nearest
            first (beam search, re-ranking). Backends "triton", "cpu" and "torch" (no CUDA C++
            kernel: "auto" runs Triton on GPUs); memory stays O(N k + K).

    Returns:
        indices: int64 of shape z.shape[:-1] (with k: z.shape[:-1] + (k,), column 0 the nearest);
        ties go to the lowest index. With return_distance, a pair (indices, values) with values
        of the same shape.
    """
    args = (metric, precision, backend, return_distance, check_inputs_finite, k)
    return _nearest_code(z, codebook, *args)[0]


def _nearest_code(z, codebook, metric, precision, backend, return_distance, check_inputs_finite, k):
    """nearest_code's result, and what fastvq.quantize goes on with instead of working it out a
    second time: the backend that `backend` picks for these tensors (before the search's own
    fallbacks), z's rows (N, D) and the codebook in the promoted dtype, contiguous."""
    check_floating("z", z)
    check_floating("codebook", codebook)
    check_choice("metric", metric, METRICS)
    check_choice("precision", precision, PRECISIONS)
    check_backend(backend)
    if z.dim() < 1:
        raise ValueError("z must have shape (..., D), got a 0-d tensor")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D), got shape {tuple(codebook.shape)}")
    num_codes, d = codebook.shape
    if num_codes < 1:
        raise ValueError("codebook must hold at least one code (K >= 1), got K = 0")
    if not 1 <= d <= MAX_DIM:
        raise ValueError(f"codebook's D must be between 1 and {MAX_DIM}, got {d}")
    if z.shape[-1] != d:
        raise ValueError(
            f"z's last dimension ({z.shape[-1]}) must equal codebook's D ({d}); "
            f"got z {tuple(z.shape)} and codebook {tuple(codebook.shape)}"
        )
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}")
    if k is not None:
        k = check_int("k", k)
        if k > min(num_codes, MAX_TOPK):
            raise ValueError(
                f"k must be at most min(K, {MAX_TOPK}) = {min(num_codes, MAX_TOPK)}, got {k}"
            )

    dtype = torch.promote_types(z.dtype, codebook.dtype)
    name = picked = pick_backend(backend, z.device, dtype)
    topk = k is not None and k > 1  # k == 1 is the argmin kernels' answer
    if topk and name == "cuda":
        if backend == "cuda":
            raise ValueError("backend 'cuda' has no top-k kernel (k > 1): use 'triton' or 'auto'")
        name = "torch"  # "auto" chose CUDA C++ only because Triton is unavailable
    if topk and name == "cpu" and not _HAS_TOPK_CPU:
        name = "torch"
    if name in ("triton", "cuda") and num_codes > MAX_GPU_CODES:
        if backend != "auto":
            raise ValueError(
                f"codebook has {num_codes} codes; backend {backend!r} searches at most "
                f"2^31 - 2^16 = {MAX_GPU_CODES} (int32 code indices): use backend='torch'"
            )
        name = "torch"
    z2 = z.reshape(-1, d).to(dtype).contiguous()
    cb = codebook.to(dtype).contiguous()
    squared_norms = _squared_norms(cb.detach(), metric, name)
    if check_inputs_finite:
        # Squared norms are finite exactly where the codes are (a float32 or half code's fit in
        # float64; float64 codebooks, searched by the torch backend, get none): checking them
        # spares a second read of the codebook.
        check_finite(z=z, codebook=cb if squared_norms is None else squared_norms)
    scale, bias = code_terms(cb.detach(), metric, squared_norms)
    fast = precision == "fast"
    if z2.shape[0] == 0:
        indices = torch.empty(0, k or 1, dtype=torch.int64, device=z.device)
    elif topk:
        indices = _TOPK_KERNELS[name](z2.detach(), cb.detach(), scale, bias, k, fast)
    else:
        indices = _KERNELS[name](z2.detach(), cb.detach(), scale, bias, fast)
    values = None
    if return_distance:  # (N, 1 or k)
        flat = indices.view(z2.shape[0], k or 1)
        values = code_values(z.reshape(-1, 1, d), codebook, flat, metric)
    shape = z.shape[:-1] if k is None else (*z.shape[:-1], k)
    indices = indices.view(shape)
    return (indices if values is None else (indices, values.view(shape))), picked, z2, cb


# Elements of the gathered codes per chunk of code_values: with k codes per row, one gather would
# hold N x k x D values (128 GiB at N = 2^20, k = 128, D = 256).
_GATHER_ELEMENTS = 1 << 24


def code_values(z, codebook, indices, metric):
    """Distance / similarity between z (N, 1, D) and codebook[indices], indices (N, k), in float32
    or float64: (N, k), in chunks of rows that gather at most _GATHER_ELEMENTS code values."""
    rows = max(1, _GATHER_ELEMENTS // max(indices.shape[1] * codebook.shape[1], 1))
    if indices.shape[0] > rows:
        return torch.cat([
            code_values(z[i : i + rows], codebook, indices[i : i + rows], metric)
            for i in range(0, indices.shape[0], rows)
        ])  # fmt: skip
    acc = torch.promote_types(torch.promote_types(z.dtype, codebook.dtype), torch.float32)
    zf, cf = z.to(acc), codebook.to(acc)[indices]
    if metric == "l2":
        return (zf - cf).square().sum(-1)
    if metric == "dot":
        return (zf * cf).sum(-1)
    # Normalized first: no overflow in the product, and 0 with a zero gradient for zero rows and
    # codes (a division by their norms would give NaN gradients there).
    return ((zf * inv_norm(zf)) * (cf * inv_norm(cf))).sum(-1)
