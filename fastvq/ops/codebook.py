"""Codebook learning besides the search: EMA statistics by scatter, the Laplace-smoothed codebook,
dead-code reset, k-means and code usage.

Statistics are computed as one (K, D + 1) buffer, column D the weighted counts and columns :D the
weighted sums, so a single all-reduce makes them global. Backends: "torch" (index_add_, or a
stable sort + torch.segment_reduce when deterministic), "triton" (float32 atomics, or a sorted
segmented reduction when deterministic) and the C++ op fastvq::ema_scatter_cpp ("cpu": each thread
owns a range of codes, deterministic by construction; "cuda": float32 atomics, or a sorted
segmented reduction when deterministic). "auto" picks Triton, else CUDA C++, on CUDA tensors and
C++ on CPU tensors, torch where those are missing or for float64. Nothing here builds an N x K
tensor.
"""

import torch
import torch.nn.functional as F

from fastvq._ext import EXTENSION_ERROR, fake_on_one_device, has_kernel
from fastvq.ops._backends import backends, check_backend, cpu_available, pick_backend
from fastvq.ops._validate import (
    check_choice,
    check_disjoint,
    check_finite,
    check_floating,
    check_index_range,
    check_index_tensor,
    check_int,
    check_real,
    check_tensor,
    check_writable,
    shares_storage,
)
from fastvq.ops.nearest_code import MAX_DIM, nearest_code

ACCUMULATORS = (torch.float32, torch.float64)
KMEANS_METRICS = ("l2", "cosine")
KMEANS_INITS = ("kmeans++", "random")
# k-means++ places its centres in at most about this many rounds of D^2 sampling after the first
# few doublings (see _kmeanspp); with num_codes <= 64 it is exactly sequential k-means++.
# NOTE: unmeasured on GPU. Each round costs one nearest_code pass over the new centres (all rounds
# together: one N x K x D search) plus an O(N) top-k; 64 rounds keep the latter small.
KMEANS_PP_ROUNDS = 64
# Rows per chunk of the torch path's float32 copy of z: the temporary stays O(K * D + 2^20).
_CHUNK_ELEMENTS = 1 << 20
# Rows per scatter into a float32 batch buffer: a float32 count (and sum) stops growing at 2^24
# rows of one code, so longer batches add their chunks' statistics in float64.
_STATS_CHUNK_ROWS = 1 << 22


# --- Triton ops: opaque custom ops (importing fastvq must not import Triton), with fakes ---------


@torch.library.custom_op("fastvq::ema_scatter_triton", mutates_args=("counts", "sums"))
def _ema_scatter_triton(
    counts: torch.Tensor,
    sums: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor | None,
    scale: float,
) -> None:
    from fastvq.kernels.ema import ema_scatter

    ema_scatter(counts, sums, z, indices, weight, scale)


@_ema_scatter_triton.register_fake
def _(counts, sums, z, indices, weight, scale):
    fake_on_one_device("ema_scatter_triton", counts, sums, z, indices, weight)


@torch.library.custom_op("fastvq::ema_segment_triton", mutates_args=("counts", "sums"))
def _ema_segment_triton(
    counts: torch.Tensor,
    sums: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor | None,
    keep: float,
    gain: float,
) -> None:
    from fastvq.kernels.ema import ema_segment

    ema_segment(counts, sums, z, indices, weight, keep, gain)


@_ema_segment_triton.register_fake
def _(counts, sums, z, indices, weight, keep, gain):
    fake_on_one_device("ema_segment_triton", counts, sums, z, indices, weight)


# --- C++ op (csrc/cpu/ema.cpp, csrc/cuda/ema.cu; schema in csrc/fastvq.cpp) --------------------

# A stale build of fastvq._C without the op: "auto" falls back to torch, "cpu"/"cuda" raise.
_HAS_CPP = EXTENSION_ERROR is None and hasattr(torch.ops.fastvq, "ema_scatter_cpp")
# Per device type, whether the op has a kernel there: fastvq._C may hold CUDA kernels for
# nearest_code but not for this op (a partial build). Read once: torch.compile cannot trace the
# dispatcher query.
_CPP_ON = {
    device: _HAS_CPP and has_kernel("ema_scatter_cpp", key)
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}

if _HAS_CPP:

    @torch.library.register_fake("fastvq::ema_scatter_cpp")
    def _(counts, sums, z, indices, weight, keep, gain, deterministic):
        fake_on_one_device("ema_scatter_cpp", counts, sums, z, indices, weight)


# --- argument checks ---------------------------------------------------------------------------


def _check_accumulators(cluster_size, embed_sum) -> None:
    for name, value in (("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        check_tensor(name, value)
        if value.dtype not in ACCUMULATORS:
            raise TypeError(f"{name} must be a float32 (or float64) accumulator, got {value.dtype}")
    if cluster_size.dim() != 1 or cluster_size.shape[0] < 1:
        raise ValueError(
            f"cluster_size must have shape (K,) with K >= 1, got {tuple(cluster_size.shape)}"
        )
    k = cluster_size.shape[0]
    if embed_sum.dim() != 2 or embed_sum.shape[0] != k or embed_sum.shape[1] < 1:
        raise ValueError(
            f"embed_sum must have shape (K, D) with K = {k} (cluster_size's length), got "
            f"{tuple(embed_sum.shape)}"
        )
    if embed_sum.dtype != cluster_size.dtype:
        raise TypeError(
            f"cluster_size and embed_sum must share one dtype, got {cluster_size.dtype} and "
            f"{embed_sum.dtype}"
        )
    if embed_sum.device != cluster_size.device:
        raise ValueError(
            f"cluster_size is on {cluster_size.device} but embed_sum is on {embed_sum.device}"
        )


def _check_rows(name: str, z, d: int, device) -> None:
    check_floating(name, z)
    if z.dim() < 1 or z.shape[-1] != d:
        raise ValueError(
            f"{name} must have shape (..., D) with D = {d} (embed_sum's D), got {tuple(z.shape)}"
        )
    if z.device != device:
        raise ValueError(f"{name} is on {z.device} but the statistics are on {device}")


def _check_indices(indices, shape, device) -> None:
    check_index_tensor("indices", indices)
    if indices.shape != shape:
        raise ValueError(
            f"indices must have z's leading shape {tuple(shape)}, got {tuple(indices.shape)}"
        )
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but the statistics are on {device}")


def _process_group(name: str, value):
    """None for False; the default group for True; a given ProcessGroup as is."""
    if value is False or value is None:
        return None
    import torch.distributed as dist

    if value is not True and not (dist.is_available() and isinstance(value, dist.ProcessGroup)):
        raise TypeError(
            f"{name} must be a bool or a torch.distributed.ProcessGroup, got {type(value).__name__}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"{name} needs torch.distributed to be initialized "
            "(torch.distributed.init_process_group)"
        )
    return dist.group.WORLD if value is True else value


def _first_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_global_rank(group, 0)


def _stats_backend(backend: str, device: torch.device, float64: bool, strict: bool = True) -> str:
    """Which scatter runs for `backend` on `device`: "torch", "triton" or "cpp" (the C++ op on
    CPU or CUDA tensors); ValueError where `backend` cannot run. strict=False (k-means, where
    `backend` names the search's backend) runs the torch scatter where "cpu"/"cuda" lacks the op
    instead of raising."""
    dtype = torch.float64 if float64 else torch.float32
    if backend == "auto":
        if float64:
            return "torch"
        if device.type != "cuda":
            return "cpp" if cpu_available() and _CPP_ON["cpu"] else "torch"
        report = backends(device)
        # NOTE: Triton before CUDA C++ is unmeasured on GPU, as in fastvq.nearest_code.
        for name in ("triton", "cuda"):
            if report[name].available and (name == "triton" or _CPP_ON[name]):
                return "cpp" if name != "triton" else name
        return "torch"
    name = pick_backend(backend, device, dtype)
    if name in ("cpu", "cuda"):
        if not _CPP_ON[name]:
            if not strict:
                return "torch"
            raise ValueError(
                f"backend {backend!r}: fastvq._C has no {name.upper()} kernel of "
                "fastvq::ema_scatter_cpp (a stale or partial build; rebuild it with "
                "`make install`)"
            )
        return "cpp"
    return name


# --- statistics --------------------------------------------------------------------------------


def _stats_torch(stats, z, idx, w, deterministic: bool) -> None:
    n, d = z.shape
    k = stats.shape[0]
    counts, sums = stats[:, d], stats[:, :d]
    # index_add_ rather than bincount throughout: bincount's output length depends on the data,
    # which torch.compile cannot trace.
    if not deterministic and w is None and z.dtype == stats.dtype:
        sums.index_add_(0, idx, z)
        counts.index_add_(0, idx, torch.ones_like(z[:, 0]))
        return
    rows = max(k, _CHUNK_ELEMENTS // (d + 1))
    if deterministic:
        # Stable sort, then chunk by chunk (in order) a per-code sum over each chunk's sorted rows:
        # every addition happens in an order fixed by the input alone.
        codes, order = torch.sort(idx, stable=True)
    for start in range(0, n, rows):
        sel = order[start : start + rows] if deterministic else slice(start, start + rows)
        src = z[sel].to(stats.dtype)
        wc = w[sel] if w is not None else torch.ones_like(src[:, 0])
        if w is not None:  # rows of weight 0 (padding) add nothing, whatever they hold: not 0 * NaN
            src = torch.where(wc[:, None] != 0, src * wc[:, None], 0)
        src = torch.cat([src, wc[:, None]], dim=1)
        if deterministic:
            chunk = codes[start : start + rows]
            lengths = torch.zeros(k, dtype=torch.int64, device=z.device)
            lengths.index_add_(0, chunk, torch.ones_like(chunk))
            stats.add_(torch.segment_reduce(src, "sum", lengths=lengths, axis=0))
        else:
            stats.index_add_(0, idx[sel], src)


def _ema_pieces(sorted_codes: torch.Tensor, k: int, piece_rows: int):
    """The plan of the deterministic GPU kernels (kernels/ema.py; csrc/cuda/ema.h's EmaPieces,
    which the CUDA glue makes the same way): each code's run of sorted rows cut into pieces of at
    most piece_rows rows, an empty run into one empty piece, without a host sync.

    sorted_codes: (N,) int64 ascending. Returns (offsets, piece_offsets, slot_offsets) of shape
    (K + 1,): the runs' starts, each code's first piece, each code's first partial slot (codes of
    one piece have none, the others one per piece); piece_code (K + ceil(N / piece_rows),): each
    piece's code, K past the last piece; and the number of slots to allocate, 2 ceil(N /
    piece_rows), since every code of several pieces is longer than piece_rows.
    """
    n, device = sorted_codes.shape[0], sorted_codes.device
    offsets = torch.searchsorted(sorted_codes, torch.arange(k + 1, device=device))
    pieces = (offsets.diff() + piece_rows - 1).div_(piece_rows, rounding_mode="floor").clamp_(min=1)
    piece_offsets = F.pad(pieces.cumsum(0), (1, 0))
    slot_offsets = F.pad((pieces * (pieces > 1)).cumsum(0), (1, 0))
    chunks = -(-n // piece_rows)
    piece_code = torch.searchsorted(
        piece_offsets, torch.arange(k + chunks, device=device), right=True
    ).sub_(1)
    return offsets, piece_offsets, slot_offsets, piece_code, 2 * chunks


def _batch_stats(z, idx, w, k: int, dtype, backend: str, deterministic: bool) -> torch.Tensor:
    """(K, D + 1) buffer: [:, :D] = sum of w[n] z[n], [:, D] = sum of w[n] over idx[n] == k.

    The torch backend sums in float64; the kernels in float32, batches of more than
    _STATS_CHUNK_ROWS rows chunk by chunk, the chunks' sums added in float64."""
    n, d = z.shape
    if backend == "torch":
        stats = torch.zeros(k, d + 1, dtype=torch.float64, device=z.device)
        _stats_torch(stats, z, idx, w, deterministic)
        return stats.to(dtype)
    if n <= _STATS_CHUNK_ROWS or dtype == torch.float64:
        return _kernel_stats(z, idx, w, k, dtype, backend, deterministic)
    total = torch.zeros(k, d + 1, dtype=torch.float64, device=z.device)
    for start in range(0, n, _STATS_CHUNK_ROWS):
        rows = slice(start, start + _STATS_CHUNK_ROWS)
        part = w[rows] if w is not None else None
        total += _kernel_stats(z[rows], idx[rows], part, k, dtype, backend, deterministic)
    return total.to(dtype)


def _kernel_stats(z, idx, w, k: int, dtype, backend: str, deterministic: bool) -> torch.Tensor:
    """_batch_stats by the Triton ("triton") or C++ ("cpp") scatter, in `dtype`."""
    d = z.shape[1]
    stats = torch.zeros(k, d + 1, dtype=dtype, device=z.device)
    if z.shape[0] == 0:
        return stats
    if backend == "triton":
        if deterministic:
            _ema_segment_triton(stats[:, d], stats[:, :d], z, idx, w, 0.0, 1.0)
        else:
            _ema_scatter_triton(stats[:, d], stats[:, :d], z, idx, w, 1.0)
    else:
        torch.ops.fastvq.ema_scatter_cpp(
            stats[:, d], stats[:, :d], z, idx, w, 0.0, 1.0, deterministic
        )
    return stats


def _all_reduce(tensor: torch.Tensor, group) -> None:
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


# Under no_grad: the statistics are never differentiated, and every backend then accepts
# accumulators that require grad (the C++ op did already; in-place torch ops on such leaves raise).
@torch.no_grad()
def ema_update_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    decay: float,
    *,
    weight: torch.Tensor | None = None,
    deterministic: bool | None = None,
    backend: str = "auto",
    all_reduce=False,
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place EMA of per-code counts and sums, by scatter (never an N x K one-hot).

        cluster_size = decay * cluster_size + (1 - decay) * counts
        embed_sum    = decay * embed_sum    + (1 - decay) * sums
        counts[k] = sum of weight[n],  sums[k] = sum of weight[n] * z[n]  over indices[n] == k

    Args:
        cluster_size: (K,) float32 accumulator (float64 on backend "torch"), updated in place
            under no_grad (a buffer, or a Parameter: either is fine).
        embed_sum: (K, D) accumulator of cluster_size's dtype and device, updated in place.
        z: (..., D) float32, bfloat16, float16 (float64 on backend "torch"); products and sums are
            computed in the accumulators' dtype whatever z's dtype. Not differentiated through.
            Not checked for NaN or Inf (rows of weight 0, padding, may hold anything): the search
            that gave the indices checks its rows; a NaN that reaches a weighted row makes its
            code's statistics NaN.
        indices: int64, int32, int16, int8 or uint8 tensor of shape z.shape[:-1], values in [0, K).
        decay: real number in [0, 1]; 1 keeps the statistics, 0 replaces them by the batch's.
        weight: optional float or bool tensor of shape z.shape[:-1]; a 0/1 mask drops padding.
            Default: every row weighs 1.
        deterministic: bit-identical results run to run (stable sort by code, then a fixed-order
            segmented sum) instead of float atomics; equal to the atomic path up to float rounding.
            Extra memory O(N) for the sort. None (default): whether
            torch.use_deterministic_algorithms is on. The C++ CPU kernel is deterministic either way
            (each thread sums the rows of the codes it owns, in row order), whatever the thread
            count. Float atomics add a code's rows one by one into one float32 sum (in batch
            chunks of 2^22 rows), which errs by up to n 2^-24 of it for a code of n rows; the
            deterministic GPU kernels sum pieces of 512 rows, the C++ CPU kernel adds partials of
            256 rows in double, the torch backend sums in float64: the accurate choices
            for a code that holds a large share of a big batch.
        backend: "auto" (Triton, else CUDA C++, on CUDA tensors; C++ on CPU tensors; torch for
            float64 or where those are missing), "triton", "cuda", "cpu" or "torch".
        all_reduce: True (default process group) or a ProcessGroup: the batch's counts and sums are
            summed over the group before the update, so every rank that starts from the same
            statistics ends with the same statistics, equal to one process on the concatenated
            batch up to float rounding. The group must be initialized.
        check_indices: ValueError for indices outside [0, K) (one host sync; skipped under
            torch.compile). Indices from fastvq.nearest_code are in range by construction; with
            False, out-of-range indices are undefined behaviour.

    Returns:
        (cluster_size, embed_sum), the updated inputs. Extra memory O(K * D + N).
    """
    _check_accumulators(cluster_size, embed_sum)
    check_writable("cluster_size", cluster_size)
    check_writable("embed_sum", embed_sum)
    check_disjoint("cluster_size", cluster_size, "embed_sum", embed_sum)
    k, d = embed_sum.shape
    device = embed_sum.device
    _check_rows("z", z, d, device)
    _check_indices(indices, z.shape[:-1], device)
    if weight is not None:
        check_tensor("weight", weight)
        if not (weight.dtype.is_floating_point or weight.dtype == torch.bool):
            raise TypeError(f"weight must be a floating or bool tensor, got {weight.dtype}")
        if weight.shape != z.shape[:-1]:
            raise ValueError(
                f"weight must have z's leading shape {tuple(z.shape[:-1])}, got "
                f"{tuple(weight.shape)}"
            )
        if weight.device != device:
            raise ValueError(f"weight is on {weight.device} but the statistics are on {device}")
    decay = check_real("decay", decay, 0.0, 1.0)
    for name, value in (("z", z), ("weight", weight)):
        if value is not None and shares_storage(value, cluster_size, embed_sum):
            raise ValueError(f"{name} must not share memory with cluster_size or embed_sum")
    check_backend(backend)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    elif not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
    group = _process_group("all_reduce", all_reduce)
    float64 = torch.float64 in (embed_sum.dtype, z.dtype)
    name = _stats_backend(backend, device, float64)
    if check_indices:
        check_index_range("indices", indices, 0, k)
    return _ema_update(
        cluster_size, embed_sum, z, indices, decay, weight, deterministic, name, group
    )


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    """x (R, C), or a copy with stride(1) == 1 where the kernels need it: .contiguous() keeps any
    strides of an empty x, or of a size-1 dimension (a (K, 1) transpose has stride(1) K)."""
    return x if x.stride(1) == 1 else x.clone(memory_format=torch.contiguous_format)


def _ema_update(cluster_size, embed_sum, z, indices, decay, weight, deterministic, name, group):
    """ema_update_ after its checks, with its arguments resolved: decay a float, deterministic a
    bool, name _stats_backend's answer, group a ProcessGroup or None. VectorQuantize's EMA step
    calls it directly (its own buffers, rows and indices, resolved once per step): at small sizes
    the checks are a large share of the call's host time, paid per codebook per step."""
    k, d = embed_sum.shape
    device = embed_sum.device
    acc = embed_sum.dtype
    z2 = _unit_columns(z.detach().reshape(-1, d))
    idx = indices.reshape(-1).to(torch.int64).contiguous()
    w = None if weight is None else weight.detach().reshape(-1).to(acc).contiguous()

    # Under torch.compile decay reaches the graph only through torch arithmetic (the batch buffer
    # below, and no alpha=): a decay changed between steps (a warm-up) then stays a graph input,
    # where as a kernel's float argument each value was a constant that compiled a new graph.
    fused = not torch.compiler.is_compiling()
    if fused and name == "cpp" and group is None and (device.type == "cpu" or deterministic):
        # One pass: the kernel writes decay * old + (1 - decay) * batch sum into the accumulators
        # (the CPU kernel moves each code's float32 partial into double every 256 rows, the
        # deterministic GPU kernels sum pieces of 512 rows). Float atomics go through a zeroed
        # batch buffer below: added straight into the accumulators, (1 - decay) * w falls below
        # half an ulp of a count of 2^24 (1 - decay) and is lost.
        sums = _unit_columns(embed_sum)
        torch.ops.fastvq.ema_scatter_cpp(
            cluster_size, sums, z2, idx, w, decay, 1.0 - decay, deterministic
        )
        if sums is not embed_sum:
            embed_sum.copy_(sums)
        return cluster_size, embed_sum

    if fused and name == "triton" and group is None and deterministic:
        # No (K, D + 1) buffer: the kernel writes decay * old + (1 - decay) * sum once per
        # accumulator. A copy only for an embed_sum without unit column stride.
        sums = _unit_columns(embed_sum)
        if z2.shape[0] == 0:
            cluster_size.mul_(decay)
            sums.mul_(decay)
        else:
            _ema_segment_triton(cluster_size, sums, z2, idx, w, decay, 1.0 - decay)
        if sums is not embed_sum:
            embed_sum.copy_(sums)
        return cluster_size, embed_sum

    stats = _batch_stats(z2, idx, w, k, acc, name, deterministic)
    if group is not None:
        _all_reduce(stats, group)
    cluster_size.mul_(decay).add_(stats[:, d] * (1.0 - decay))
    embed_sum.mul_(decay).add_(stats[:, :d] * (1.0 - decay))
    return cluster_size, embed_sum


def _smoothed(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n


def ema_codebook(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    eps: float = 1e-5,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Laplace-smoothed codebook from EMA statistics (vector-quantize-pytorch, Sonnet):

        n = sum(cluster_size);  smoothed = (cluster_size + eps) / (n + K * eps) * n
        codebook = embed_sum / smoothed[:, None]

    Args:
        cluster_size: (K,) float32/float64; embed_sum: (K, D) of the same dtype and device.
        eps: >= 0. The total n must be positive (start the statistics at cluster_size = 1,
            embed_sum = initial codebook, say); with n = 0 the codebook is not finite (+-inf, NaN
            where embed_sum is 0 or eps = 0). With eps = 0, so is every code whose cluster_size
            is 0 (after an update with decay 0: every code the batch did not use).
        out: optional (K, D) floating tensor (e.g. the codebook parameter or its data) written in
            place, under no_grad.

    Returns:
        (K, D) codebook in the accumulators' dtype, or `out`.
    """
    _check_accumulators(cluster_size, embed_sum)
    eps = check_real("eps", eps, 0.0)
    smoothed = _smoothed(cluster_size, eps)[:, None]
    if out is None:
        return embed_sum / smoothed
    check_floating("out", out)
    if out.shape != embed_sum.shape or out.device != embed_sum.device:
        raise ValueError(
            f"out must have embed_sum's shape {tuple(embed_sum.shape)} and device "
            f"{embed_sum.device}, got {tuple(out.shape)} on {out.device}"
        )
    check_writable("out", out)
    with torch.no_grad():  # out= is not differentiable: a Parameter's tensor is written as data
        return torch.div(embed_sum, smoothed, out=out)


def _sample_rows(n: int, m: int, generator, device) -> torch.Tensor:
    """m row indices in [0, n): distinct when m <= n, else every row ceil(m / n) times at most."""
    where = generator.device if generator is not None else device
    perms = [torch.randperm(n, generator=generator, device=where) for _ in range(-(-m // n))]
    return torch.cat(perms)[:m].to(device)


def reset_dead_codes_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    z: torch.Tensor,
    threshold: float,
    generator: torch.Generator | None = None,
    *,
    eps: float = 1e-5,
    broadcast=False,
) -> torch.Tensor:
    """Replace codes whose EMA cluster size is below `threshold` by random rows of z, in place.

    The dead codes (cluster_size < threshold) take distinct random rows of z, in increasing code
    order; rows repeat only when z has fewer rows than there are dead codes (then every row is used
    before any is used again). Their statistics restart at the threshold so that
    `ema_codebook(cluster_size, embed_sum, eps)` returns the new codes (up to rounding):

        cluster_size[dead] = threshold
        embed_sum[dead]    = new_code * smoothed[dead]   (smoothed as in ema_codebook, after the
                                                          reset, with the same eps)

    A reset code is thus exactly at the boundary: it stays alive after the next update only if it
    receives at least `threshold` (weighted) rows per step. Live codes are left untouched.

    Args:
        codebook: (K, D) floating, e.g. the quantizer's codebook (a Parameter is fine: the update
            runs under no_grad); new codes are cast to its dtype.
        cluster_size: (K,) float32/float64; embed_sum: (K, D) of the same dtype.
        z: (..., D) floating, at least one row where a code is dead: the batch to draw from
            (not checked for NaN or Inf: its rows are copied as they are).
        threshold: real number >= 0.
        generator: torch.Generator on the CPU or on z's device; makes the choice reproducible.
        eps: the smoothing constant later given to ema_codebook.
        broadcast: True (default process group) or a ProcessGroup: the group's first rank whose z
            holds rows draws them and sends them, so ranks whose statistics agree keep agreeing
            (ValueError on every rank where their dead codes, shapes or dtypes differ). One
            all-gather of a few integers per call; where codes are dead, one of the dead-code
            mask (K / 32 integers) and the broadcast.

    Returns:
        int64 (M,) indices of the replaced codes, increasing (empty when none is dead).
    """
    _check_accumulators(cluster_size, embed_sum)
    k, d = embed_sum.shape
    device = embed_sum.device
    check_floating("codebook", codebook)
    if codebook.shape != (k, d) or codebook.device != device:
        raise ValueError(
            f"codebook must have embed_sum's shape {(k, d)} and device {device}, got "
            f"{tuple(codebook.shape)} on {codebook.device}"
        )
    written = (("codebook", codebook), ("cluster_size", cluster_size), ("embed_sum", embed_sum))
    for name, value in written:
        check_writable(name, value)
    for i, (name_a, a) in enumerate(written):
        for name_b, b in written[i + 1 :]:
            check_disjoint(name_a, a, name_b, b)
    _check_rows("z", z, d, device)
    threshold = check_real("threshold", threshold, 0.0)
    eps = check_real("eps", eps, 0.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    group = _process_group("broadcast", broadcast)
    rows = z.detach().reshape(-1, d)

    with torch.no_grad():
        dead = (cluster_size < threshold).nonzero().flatten()
        m = dead.numel()
        src = None if group is None else _reset_source(group, dead, rows.shape[0], embed_sum)
        if m == 0:
            return dead
        if rows.shape[0] == 0 and group is None:
            raise ValueError(f"z must hold at least one row to replace the {m} dead codes with")
        if group is None or torch.distributed.get_rank() == src:
            new = rows[_sample_rows(rows.shape[0], m, generator, device)].to(embed_sum.dtype)
        else:
            new = torch.empty(m, d, dtype=embed_sum.dtype, device=device)
        if group is not None:
            torch.distributed.broadcast(new, src=src, group=group)
        codebook.index_copy_(0, dead, new.to(codebook.dtype))
        cluster_size.index_fill_(0, dead, threshold)
        embed_sum.index_copy_(0, dead, new * _smoothed(cluster_size, eps)[dead, None])
    return dead


def _reset_source(group, dead: torch.Tensor, n_rows: int, embed_sum: torch.Tensor) -> int | None:
    """The global rank that draws a synced reset's rows: the group's first rank holding rows.
    Ranks whose dead codes, shapes or dtypes disagree would send and receive rows of other
    shapes (gloo then left the receivers' buffers unwritten) or reset other codes, so every rank
    raises instead: one all-gather of (rows, dead codes, K, D, float64) per rank, and where codes
    are dead a second of the dead-code mask (K / 32 words). None when no code is dead."""
    import torch.distributed as dist

    m, (k, d) = dead.numel(), embed_sum.shape
    world, device = dist.get_world_size(group), embed_sum.device

    def gathered(t: torch.Tensor) -> list:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
        return torch.stack(parts).tolist()

    mine = [n_rows, m, k, d, embed_sum.dtype == torch.float64]
    everyone = gathered(torch.tensor(mine, dtype=torch.int64, device=device))
    shapes = [h[1:] for h in everyone]
    if any(h != shapes[0] for h in shapes):
        got = f"(dead codes, K, D, float64) {shapes}"
    elif m:
        bits = torch.zeros(-(-k // 32) * 32, dtype=torch.int64, device=device)
        bits[dead] = 1
        masks = gathered((bits.view(-1, 32) << torch.arange(32, device=device)).sum(1))
        got = None if all(w == masks[0] for w in masks) else f"{m} dead codes, not the same ones"
    else:
        got = None
    if got is not None:
        raise ValueError(
            "broadcast: every rank must hold the same statistics (the same dead codes, shape and "
            f"dtype), got {got} on the group's ranks"
        )
    if m == 0:
        return None
    holders = [i for i, h in enumerate(everyone) if h[0] > 0]
    if not holders:
        raise ValueError(
            f"z must hold at least one row, on some rank, to replace the {m} dead codes with"
        )
    return dist.get_global_rank(group, holders[0])


# --- k-means -----------------------------------------------------------------------------------


def _exponential(n: int, dtype, generator, device) -> torch.Tensor:
    where = generator.device if generator is not None else device
    e = torch.empty(n, dtype=dtype, device=where).exponential_(generator=generator).to(device)
    # exponential_ can return 0 in float32 (about 2^-24 of draws); 0 would make a key NaN or inf.
    return e.clamp_(min=torch.finfo(dtype).tiny)


def _kmeanspp(x: torch.Tensor, k: int, generator, backend: str) -> torch.Tensor:
    """Batched k-means++ (D^2 sampling), squared l2 distances: the rows of x it picks, (k,).

    Sequential k-means++ needs k passes over x: 65,536 at 65,536 codes. Here each round draws a
    batch of b new centres at once, without replacement, with probability proportional to D^2
    (Efraimidis-Spirakis keys D^2 / Exp(1), the top b), then updates D^2 with one nearest_code
    pass over the batch. b = min(centres placed so far, ceil(k / KMEANS_PP_ROUNDS)): a batch never
    outnumbers the centres it is conditioned on (1, 1, 2, 4, ... while doubling), and the number
    of rounds stays near log2(b) + KMEANS_PP_ROUNDS. With k <= KMEANS_PP_ROUNDS, b = 1: exactly
    k-means++. All the passes together cost one N x K x D search.
    """
    n = x.shape[0]
    device = x.device
    where = generator.device if generator is not None else device
    cap = -(-k // KMEANS_PP_ROUNDS)
    first = torch.randint(n, (1,), generator=generator, device=where).to(device)
    chosen = [first]
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    taken[first] = True
    min_d2 = nearest_code(
        x, x[first], backend=backend, return_distance=True, check_inputs_finite=False
    )[1]
    filled = 1
    while filled < k:
        b = min(cap, filled, k - filled)
        keys = min_d2 / _exponential(n, x.dtype, generator, device)
        keys.masked_fill_(taken, -1.0)
        new = keys.topk(b).indices
        taken[new] = True
        # Copies of one row in a batch would be equal centres, all but one left empty: keep the
        # first of each. Rows at D^2 = 0 (copies of placed centres, once x has fewer distinct
        # rows than k) stay, so that the rounds still end.
        new = new[_first_copies(x[new]) | (min_d2[new] == 0)]
        chosen.append(new)
        filled += new.numel()
        if filled < k:
            d2 = nearest_code(
                x, x[new], backend=backend, return_distance=True, check_inputs_finite=False
            )[1]
            torch.minimum(min_d2, d2, out=min_d2)
    return torch.cat(chosen)


def _first_copies(rows: torch.Tensor) -> torch.Tensor:
    """(n,) bool: whether each row is the first of the rows equal to it."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full_like(order, rows.shape[0]).scatter_reduce_(0, inverse, order, "amin")
    return first[inverse] == order


def _distinct_far_rows(x: torch.Tensor, dist: torch.Tensor, m: int):
    """The m distinct rows of x with the largest dist (copies of a row would seed equal
    centroids): (their dist, the rows), largest first; fewer where x has fewer distinct rows."""
    keep = _first_copies(x)
    x, dist = x[keep], dist[keep]
    vals, rows = dist.topk(min(m, dist.shape[0]))
    return vals, x[rows]


def _far_rows(x: torch.Tensor, dist: torch.Tensor, m: int, group) -> torch.Tensor:
    """The m distinct rows of x with the largest dist, largest first; over the whole group if
    given. Fewer where x (the group) has fewer than m distinct rows."""
    vals, cand = _distinct_far_rows(x, dist, m)
    if group is None:
        return cand
    import torch.distributed as dist_

    pad = m - vals.shape[0]  # a rank with fewer than m rows pads with rows that never win
    vals = torch.cat([vals, vals.new_full((pad,), -torch.inf)])
    cand = torch.cat([cand, cand.new_zeros(pad, cand.shape[1])])
    world = dist_.get_world_size(group)
    all_vals = [torch.empty_like(vals) for _ in range(world)]
    all_cand = [torch.empty_like(cand) for _ in range(world)]
    dist_.all_gather(all_vals, vals, group=group)
    dist_.all_gather(all_cand, cand, group=group)
    vals, cand = torch.cat(all_vals), torch.cat(all_cand)
    real = vals > -torch.inf
    return _distinct_far_rows(cand[real], vals[real], m)[1]  # ranks may hold copies of a row


def _group_mean(x: torch.Tensor, group) -> torch.Tensor:
    """(D,) mean of the rows of x, over the whole group if given; 0 without rows."""
    total = torch.cat([x.sum(0), x.new_full((1,), x.shape[0])])
    if group is not None:
        _all_reduce(total, group)
    return total[:-1] / total[-1].clamp(min=1)


def kmeans(
    x: torch.Tensor,
    num_codes: int,
    iters: int = 10,
    metric: str = "l2",
    init: str | torch.Tensor = "kmeans++",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    *,
    all_reduce=False,
    return_inertia: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """k-means centroids of the rows of x: an initialisation, then Lloyd iterations built on
    fastvq.nearest_code (assignment) and a scatter (sums), never an N x K matrix.

    Args:
        x: (..., D), at least 2-D, float32, bfloat16, float16 or float64, 1 <= D <= 1024; the
            rows are clustered in float32 (float64 for float64 x). At least num_codes rows (on
            the first rank, with all_reduce) unless init is a tensor.
        num_codes: K >= 1.
        iters: Lloyd iterations >= 0.
        metric: "l2" (means, squared-distance objective) or "cosine" (spherical k-means: rows and
            centroids normalized, objective sum of 1 - cosine similarity).
        init: "kmeans++" (batched D^2 sampling, see _kmeanspp: exact k-means++ up to 64 codes,
            about 64 rounds of D^2 sampling beyond), "random" (rows at distinct random
            indices: copies of a row may seed two centroids, which the first iteration's
            empty-cluster step separates) or a (K, D) floating tensor of initial centroids.
        generator: torch.Generator on the CPU or on x's device, for the initialisation.
        backend: the search's backend (see fastvq.nearest_code); the scatter uses it too ("cpu"
            and "cuda": the C++ op fastvq::ema_scatter_cpp), deterministic (sums in pieces: a
            cluster may hold most of the rows, more than float atomics sum accurately).
        all_reduce: True (default process group) or a ProcessGroup: x is this rank's shard; the
            group's first rank initializes and broadcasts, the sums are all-reduced and empty
            clusters are re-seeded from the group's farthest rows, so every rank gets the same
            centroids, equal to one process on the concatenated rows up to float rounding.
        return_inertia: also return the objective of the centroids before each iteration and of
            the result, (iters + 1,), summed over the group.

    Empty clusters move to the rows farthest from their assigned centroid (the m empty clusters,
    in index order, take the m farthest distinct rows), which never increases the objective. For
    l2 the search compares rows and centroids less the rows' mean (the same objective; data far
    from the origin for their spread would lose their nearest centroid to the search's
    rounding), and under k-means++ copies of a row never seed two centroids while other rows are
    left.

    Returns:
        centroids (K, D) float32 (float64 for float64 x), or (centroids, inertia).
    """
    check_floating("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., D) with at least 2 dimensions, got {x.dim()}")
    k = check_int("num_codes", num_codes, 1)
    iters = check_int("iters", iters, 0)
    check_choice("metric", metric, KMEANS_METRICS)
    if not isinstance(init, torch.Tensor):
        check_choice("init", init, KMEANS_INITS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    check_backend(backend)
    group = _process_group("all_reduce", all_reduce)
    d = x.shape[-1]
    if not 1 <= d <= MAX_DIM:  # the search's limit, checked here to name x rather than a codebook
        raise ValueError(f"x's last dimension D must be between 1 and {MAX_DIM}, got {d}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scatter = _stats_backend(backend, x.device, acc == torch.float64, strict=False)
    xs = x.detach().reshape(-1, d).to(acc).contiguous()
    check_finite(skippable=False, x=xs)
    if metric == "cosine":
        xs = F.normalize(xs, dim=-1)
        shift, search = None, xs
    else:
        # The search's rounding is relative to |x| |c| (fastvq.nearest_code): rows far from the
        # origin for their spread lose their nearest centroid, and Lloyd's objective went up.
        # It compares centred rows and centroids (the same objective); the sums, centroids and
        # reseeded rows stay x's own.
        shift = _group_mean(xs, group)
        search = xs - shift

    leader = group is None or torch.distributed.get_rank() == _first_rank(group)
    if isinstance(init, torch.Tensor):
        check_floating("init", init)
        if init.shape != (k, d) or init.device != x.device:
            raise ValueError(
                f"init must have shape {(k, d)} on {x.device}, got {tuple(init.shape)} on "
                f"{init.device}"
            )
        centroids = init.detach().to(acc).clone()
        check_finite(skippable=False, init=centroids)  # else inf centroids came back as they were
        if metric == "cosine":
            centroids = F.normalize(centroids, dim=-1)
    elif leader:
        if xs.shape[0] < k:
            raise ValueError(f"x has {xs.shape[0]} rows, fewer than num_codes = {k}")
        if init == "random":
            where = generator.device if generator is not None else x.device
            rows = torch.randperm(xs.shape[0], generator=generator, device=where)[:k]
            centroids = xs[rows.to(x.device)]
        else:
            centroids = xs[_kmeanspp(search, k, generator, backend)]
    else:
        centroids = torch.empty(k, d, dtype=acc, device=x.device)
    if group is not None:
        torch.distributed.broadcast(centroids, src=_first_rank(group), group=group)

    history = []
    for step in range(iters + 1):
        if step == iters and not return_inertia:
            break
        idx, value = nearest_code(
            search,
            centroids if shift is None else centroids - shift,
            metric=metric,
            backend=backend,
            return_distance=True,
            check_inputs_finite=False,
        )
        dist = value if metric == "l2" else 1 - value
        history.append(dist.sum())
        if step == iters:
            break
        # The deterministic scatter sums each cluster in pieces: float atomics add a cluster's
        # rows one by one into one float32 sum, which errs by up to n 2^-24 of it.
        stats = _batch_stats(xs, idx, None, k, acc, scatter, deterministic=True)
        if group is not None:
            _all_reduce(stats, group)
        counts, sums = stats[:, d], stats[:, :d]
        new = sums / counts.clamp(min=1)[:, None]
        if metric == "cosine":
            new = F.normalize(new, dim=-1)
        empty = counts == 0
        new = torch.where(empty[:, None], centroids, new)
        m = int(empty.sum())
        if m:
            # With more empty clusters than rows (a tensor init), the rest keep their centroid.
            far = _far_rows(xs, dist, m, group)
            new[empty.nonzero().flatten()[: far.shape[0]]] = far
        centroids = new
    if not return_inertia:
        return centroids
    inertia = torch.stack(history)
    if group is not None:
        _all_reduce(inertia, group)
    return centroids, inertia


# --- code usage --------------------------------------------------------------------------------


def code_counts(
    indices: torch.Tensor, num_codes: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """How many times each code occurs in `indices`, added into `out` when given.

    Args:
        indices: int64, int32, int16, int8 or uint8 tensor of any shape, values in
            [0, num_codes) (checked: one host sync).
        num_codes: K >= 1.
        out: optional (K,) int64, int32, float32 or float64 tensor on indices' device (int64
            keeps counts exact) that accumulates counts across batches, under no_grad (a buffer,
            or a Parameter: either is fine); returned.

    Returns:
        int64 (K,) counts, or `out` with the counts added.
    """
    check_index_tensor("indices", indices)
    k = check_int("num_codes", num_codes, 1)
    if out is not None:
        check_tensor("out", out)
        # Narrower types wrap (uint8: 300 counts read 44) or round within a batch's counts.
        if out.dtype not in (torch.int64, torch.int32, torch.float32, torch.float64):
            raise TypeError(
                "out must be int64 (exact), int32, float32 or float64, got " + str(out.dtype)
            )
        if out.shape != (k,) or out.device != indices.device:
            raise ValueError(
                f"out must have shape ({k},) on {indices.device}, got {tuple(out.shape)} on "
                f"{out.device}"
            )
        check_writable("out", out)
    idx = indices.reshape(-1)
    check_index_range("indices", idx, 0, k)
    counts = torch.bincount(idx, minlength=k)
    if out is None:
        return counts
    # Counts are statistics, never differentiated: as in ema_update_ and ema_codebook(out=), a
    # Parameter's tensor is written as data (in-place ops on a leaf that requires grad raise).
    with torch.no_grad():
        return out.add_(counts)


def _check_counts(counts) -> None:
    check_tensor("counts", counts)
    if counts.dim() < 1 or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise ValueError(
            f"counts must be a real (..., K) tensor, got {counts.dtype} of shape "
            f"{tuple(counts.shape)}"
        )
    if counts.shape[-1] < 1:  # no codes: usage would be 0 / 0
        raise ValueError(f"counts must hold K >= 1 codes, got shape {tuple(counts.shape)}")


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution p = counts / sum(counts): K when uniform over K codes,
    1 when one code takes everything, 0 when counts are all zero.

    counts: (..., K), K >= 1, non-negative, e.g. from code_counts accumulated over batches (not
    checked, which would cost a host sync: negative, NaN or infinite counts give NaN or 0).
    Computed in float64; returns shape counts.shape[:-1], float64 for float64 counts, else float32.
    """
    _check_counts(counts)
    c = counts.double()
    total = c.sum(-1, keepdim=True)
    p = torch.where(total > 0, c / total, 0.0)  # a clamped subnormal total left sum(p) < 1
    entropy = -torch.special.xlogy(p, p).sum(-1)
    result = torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))
    return result if counts.dtype == torch.float64 else result.float()


def usage(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of codes used at least once: mean of counts > 0 over the last dimension.

    counts: (..., K), K >= 1; returns shape counts.shape[:-1], float64 for float64 counts, else
    float32.
    """
    _check_counts(counts)
    dtype = torch.float64 if counts.dtype == torch.float64 else torch.float32
    return (counts > 0).to(dtype).mean(-1)
