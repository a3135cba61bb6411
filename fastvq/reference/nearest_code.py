"""Reference nearest-code search.

Every metric reduces to one maximisation, which is the contract every kernel implements:

    idx[n] = argmax_k  (z[n] . c[k]) * scale[k] + bias[k]

    l2      scale = 1,          bias = -||c||^2 / 2   (||z-c||^2 = ||z||^2 - 2 (z.c - ||c||^2 / 2))
    dot     scale = 1,          bias = 0              (maximum inner product)
    cosine  scale = 1 / ||c||,  bias = 0              (||z|| is constant per row; zero codes: 0,
                                                       see inv_norm)
"""

import torch

METRICS = ("l2", "cosine", "dot")

# Scores per chunk of the score matrix, one chunk alive at a time: 256 MiB in float32 (512 MiB
# in float64), the whole N x K matrix where that is smaller.
_CHUNK_ELEMENTS = 1 << 26
# Top-k also holds an int64 cumsum of the chunk: 2^24 elements keep it at 128 MiB.
_TOPK_CHUNK_ELEMENTS = 1 << 24


def inv_norm(x: torch.Tensor) -> torch.Tensor:
    """1 / |x| over the last dimension (kept), in x's dtype and differentiable. The norm is taken
    in float64, where float32 squares neither underflow nor overflow (in float32, rows beyond
    1e-19 to 1e19 would lose their norm); 0 where it is 0 or its inverse exceeds x's dtype,
    which makes the row a zero row (and an inf norm gives 0 too). No NaN in the backward of a
    finite row."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float64)
    ok = (norm > 0) & (1 / norm).to(x.dtype).isfinite()
    return torch.where(ok, 1 / torch.where(ok, norm, 1), 0).to(x.dtype)


def code_terms(
    codebook: torch.Tensor, metric: str, squared_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-code (scale, bias) of the score for `metric`: float32 (float64 for a float64 codebook).

    codebook: (K, D). squared_norms: the codes' sums of squares, float64 (K,), where the caller
    has them (the C++ and Triton searches, from one read of the codebook); computed here if None.
    Returns two (K,) tensors or None (meaning 1 and 0).
    """
    acc = torch.float64 if codebook.dtype == torch.float64 else torch.float32
    if metric == "l2":
        # -|c|^2 / 2 rounded once to acc from a float64 sum of squares: float32 squares of codes
        # beyond 1.8e19 overflow where the bias does not (up to 2.6e19). A sum of squares, not
        # vector_norm().square(): that sqrt round trip would break exact ties between codes of
        # equal score and different norm (integer-valued codebooks).
        if squared_norms is None:
            # One K x D temporary: a float64 copy squared in place (a float64 codebook's own
            # squares out of place)
            if codebook.dtype == torch.float64:
                squared_norms = codebook.square().sum(-1)
            else:
                squared_norms = codebook.to(torch.float64).square_().sum(-1)
        return None, squared_norms.mul(-0.5).to(acc)
    if metric == "cosine":
        if squared_norms is None:
            return inv_norm(codebook.to(acc)).squeeze(-1), None
        # inv_norm's rule, in place (nothing to differentiate): 1/0 = inf, inverses beyond acc
        # round to inf and NaN stays NaN, all made 0 (as 1/inf is)
        scale = squared_norms.sqrt().reciprocal_().to(acc)
        return scale.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), None
    if metric == "dot":
        return None, None
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def nearest_code_scores(
    z: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The full (N, K) score matrix z @ codebook.T * scale + bias in z's dtype; a test oracle."""
    scores = z @ codebook.T
    if scale is not None:
        scores = scores * scale.to(scores.dtype)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    return scores


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Index of the nearest code for each row, computed chunk by chunk (never N x K at once).

    z: (N, D), codebook: (K, D), any floating dtype. compute_dtype (default: z's dtype, float32 for
    half types on CPU) is the dtype of the score matmul. Ties go to the lowest index.
    Returns int64 (N,).
    """
    out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    for start, scores in _score_chunks(z, codebook, metric, compute_dtype, _CHUNK_ELEMENTS):
        # NaN never wins, as in the kernels: argmax would otherwise pick it.
        scores = scores.float() if scores.dtype in (torch.bfloat16, torch.float16) else scores
        scores.nan_to_num_(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)  # no NaN mask
        out[start : start + len(scores)] = scores.argmax(dim=1)
        del scores  # _score_chunks says why
    return out


def _score_chunks(z, codebook, metric, compute_dtype, elements):
    """(start, scores) for row chunks of z of about `elements` scores each, in compute_dtype
    (default: z's dtype, float32 for half types on CPU)."""
    if compute_dtype is None:
        compute_dtype = z.dtype
        if z.device.type == "cpu" and z.dtype in (torch.bfloat16, torch.float16):
            compute_dtype = torch.float32
    z = z.to(compute_dtype)
    codebook = codebook.to(compute_dtype)
    scale, bias = code_terms(codebook, metric)
    rows = max(1, elements // max(codebook.shape[0], 1))
    for start in range(0, z.shape[0], rows):
        scores = nearest_code_scores(z[start : start + rows], codebook, scale, bias)
        yield start, scores
        # Dropped here and by the caller before the next chunk's matmul: else two chunks live.
        del scores


def topk_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores of each row, best first; equal scores in increasing index.

    scores: (N, K) floating, 1 <= k <= K. NaN ranks as -inf (so it never beats a number, and a
    row of NaN gives 0, 1, ..., k-1). Returns int64 (N, k). One torch.topk, which leaves open
    which codes equal to the k-th value it takes: rows where it left some out (exact ties, rare
    outside integer data) take them in index order instead, through a cumsum over the row.
    """
    s = scores.masked_fill(scores.isnan(), -torch.inf)
    values, idx = s.topk(k, dim=1)
    kth = values[:, -1:]
    # int32 counts: a bool sum widens the whole chunk to int64 first.
    short = ((s == kth).sum(1, dtype=torch.int32) != (values == kth).sum(1)).nonzero()[:, 0]
    sr, kr = s[short], kth[short]
    above = sr > kr
    at = sr == kr
    take = above | (at & (at.cumsum(1) <= k - above.sum(1, keepdim=True)))
    idx[short] = take.nonzero()[:, 1].view(-1, k)
    # Equal scores in index order: sort the k codes by index, then stably by score.
    idx = idx.sort(1).values
    order = s.gather(1, idx).sort(dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def nearest_code_topk(
    z: torch.Tensor,
    codebook: torch.Tensor,
    k: int,
    metric: str = "l2",
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The k nearest codes of each row, nearest first, chunk by chunk (never N x K at once).

    z: (N, D), codebook: (K, D), any floating dtype, 1 <= k <= K; compute_dtype as in
    nearest_code. Equal scores go in increasing index. Returns int64 (N, k); column 0 is
    nearest_code's answer.
    """
    out = torch.empty(z.shape[0], k, dtype=torch.int64, device=z.device)
    for start, scores in _score_chunks(z, codebook, metric, compute_dtype, _TOPK_CHUNK_ELEMENTS):
        out[start : start + len(scores)] = topk_scores(scores, k)
        del scores
    return out
