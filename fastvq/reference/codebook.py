"""Reference codebook learning: EMA statistics, smoothed codebook, code usage, Lloyd's k-means.

Plain PyTorch in any floating dtype; the test oracles (run in float64) and the benchmarks' peers.
`ema_update_onehot` and `code_counts_onehot` are the one-hot formulations popular libraries use
(vector-quantize-pytorch, Sonnet): they build an (N, K) matrix, so they are for small sizes only.
`ema_update_index_add` is the scatter version a user would write by hand (index_add_ + bincount).
`lloyd` and `inertia` build the (N, K) distance matrix too.
"""

import torch
import torch.nn.functional as F


def _weights(indices: torch.Tensor, weight: torch.Tensor | None, dtype) -> torch.Tensor:
    if weight is None:
        return torch.ones(indices.shape, dtype=dtype, device=indices.device)
    return weight.to(dtype)


def ema_update_onehot(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    decay: float,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New EMA statistics through an (N, K) one-hot matrix; the inputs are left unchanged.

    cluster_size (K,), embed_sum (K, D): the statistics, in the dtype of the computation.
    z (N, D), indices (N,) int in [0, K), weight (N,) or None (ones).
    Returns (decay * cluster_size + (1 - decay) * counts, decay * embed_sum + (1 - decay) * sums)
    with counts[k] = sum of weight[n] and sums[k] = sum of weight[n] * z[n] over indices[n] == k.
    """
    dtype = embed_sum.dtype
    onehot = F.one_hot(indices, cluster_size.shape[0]).to(dtype)  # (N, K)
    onehot = onehot * _weights(indices, weight, dtype)[:, None]
    counts = onehot.sum(0)
    sums = onehot.T @ z.to(dtype)
    return (
        decay * cluster_size + (1 - decay) * counts,
        decay * embed_sum + (1 - decay) * sums,
    )


def ema_update_index_add(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    decay: float,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `ema_update_onehot` by scatter: memory O(K * D + N * D)."""
    dtype = embed_sum.dtype
    w = _weights(indices, weight, dtype)
    counts = torch.zeros_like(cluster_size).index_add_(0, indices, w)
    sums = torch.zeros_like(embed_sum).index_add_(0, indices, z.to(dtype) * w[:, None])
    return (
        decay * cluster_size + (1 - decay) * counts,
        decay * embed_sum + (1 - decay) * sums,
    )


def ema_codebook(cluster_size: torch.Tensor, embed_sum: torch.Tensor, eps: float = 1e-5):
    """Laplace-smoothed codebook (K, D) from EMA statistics cluster_size (K,), embed_sum (K, D).

    n = sum(cluster_size); smoothed = (cluster_size + eps) / (n + K * eps) * n;
    codebook = embed_sum / smoothed[:, None]   (as vector-quantize-pytorch and Sonnet's VQ-EMA).
    """
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n
    return embed_sum / smoothed[:, None]


def code_counts_onehot(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How many times each code occurs in indices (any shape), int64 (num_codes,), via one-hot."""
    return F.one_hot(indices.reshape(-1), num_codes).sum(0)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution counts / sum(counts), float64; 0 when counts are all 0.

    counts: (..., K) non-negative; the result has shape counts.shape[:-1].
    """
    counts = counts.double()
    total = counts.sum(-1, keepdim=True)
    p = counts / total
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def usage(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of codes used at least once, float64, shape counts.shape[:-1]."""
    return (counts > 0).double().mean(-1)


def inertia(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """k-means objective: sum over rows of the squared distance to the nearest centroid (l2), or of
    1 - cosine similarity to the most similar centroid (cosine). x (N, D), centroids (K, D)."""
    if metric == "cosine":
        sim = F.normalize(x, dim=-1) @ F.normalize(centroids, dim=-1).T
        return (1 - sim.max(1).values).sum()
    return torch.cdist(x, centroids).square().min(1).values.sum()


def lloyd(x: torch.Tensor, centroids: torch.Tensor, iters: int, metric: str = "l2") -> torch.Tensor:
    """Lloyd's iterations from the given centroids, brute force through the (N, K) distance matrix.

    x (N, D), centroids (K, D) in one floating dtype; returns the new centroids (K, D). metric "l2"
    (means) or "cosine" (spherical k-means: rows and centroids normalized, ties to the lowest
    index). An empty cluster moves to the row farthest from its assigned centroid (the m empty
    clusters, in index order, take the m farthest rows, farthest first).
    """
    if metric == "cosine":
        x = F.normalize(x, dim=-1)
        centroids = F.normalize(centroids, dim=-1)
    centroids = centroids.clone()
    k = centroids.shape[0]
    for _ in range(iters):
        if metric == "cosine":
            sim = x @ centroids.T
            assign = sim.argmax(1)
            far = 1 - sim.gather(1, assign[:, None]).squeeze(1)
        else:
            dist = torch.cdist(x, centroids).square()
            assign = dist.argmin(1)
            far = dist.gather(1, assign[:, None]).squeeze(1)
        onehot = F.one_hot(assign, k).to(x.dtype)
        counts, sums = onehot.sum(0), onehot.T @ x
        new = sums / counts.clamp(min=1)[:, None]
        if metric == "cosine":
            new = F.normalize(new, dim=-1)
        empty = counts == 0
        new[empty] = x[far.topk(int(empty.sum())).indices]
        centroids = new
    return centroids
