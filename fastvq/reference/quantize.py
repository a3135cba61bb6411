"""Reference quantization with gradient estimators: readable formulas, explicit D x D matrices.

Every estimator returns z_q whose value is the chosen code q = codebook[idx] (up to rounding) and
whose gradients are those of

    ste          z_q = q + (z - z.detach())
    rotation     z_q = (s * R).detach() @ z + (q - q.detach())
    householder  z_q = (s * H).detach() @ z + (q - q.detach())

with s = |q| / |z|, z^ = z / |z|, q^ = q / |q| and
    R = I - 2 r r^T + 2 q^ z^^T,  r = (z^ + q^) / |z^ + q^|     (Fifty et al., ICLR 2025)
    H = I - 2 v v^T,             v = (z^ - q^) / |z^ - q^|     (rotated VQ-VAE, Householder form)
Both map z^ to q^, so s R z = s H z = q. Degenerate rows, where these are undefined:
    z = 0, q = 0 (or |z|, s not finite in the dtype)      -> s = 1, R = H = I (plain STE)
    rotation, z^ = -q^ (|z^ + q^| < 2^-63)                -> s = 1, R = I (plain STE)
    householder, z^ = q^ (|z^ - q^| < 2^-63)              -> H = I, s kept: s * g, which is what
                                                            the rotation trick gives there
The first tests are exact ("== 0", "not finite"). The others take z^ -+ q^ as 0 where its
squared norm is below float32's smallest normal (2^-126; float64's, 2^-1022, for float64), where
the kernels' float32 sums of squares underflow (or flush to 0 on GPUs): a direction that small
is rounding noise, and 2 / |e|^2 would overflow.

These build an (N, D, D) tensor: test oracles for small shapes, never a training path.
"""

import torch

from fastvq.reference.nearest_code import nearest_code

GRADS = ("ste", "rotation", "householder")


def estimator_matrix(z: torch.Tensor, q: torch.Tensor, grad: str) -> torch.Tensor:
    """The (N, D, D) matrix M with dL/dz = M^T dL/dz_q for each row: s * R, s * H or I.

    z, q: (N, D) of one floating dtype; computed in that dtype (the reference "in dtype").
    Not differentiable by design: the estimator treats M as a constant.
    """
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    z, q = z.detach(), q.detach()
    n, d = z.shape
    eye = torch.eye(d, dtype=z.dtype, device=z.device).expand(n, d, d)
    if grad == "ste":
        return eye.clone()
    nz = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    nq = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    scale = nq / nz
    ok = (nz > 0) & (nq > 0) & nz.isfinite() & scale.isfinite()
    zh = torch.where(ok, z / nz, 0)
    qh = torch.where(ok, q / nq, 0)
    # |e|^2 below the smallest normal of the kernels' arithmetic: e = 0 (compared in float64,
    # where this bound does not round to 0 as in float16)
    smallest = torch.finfo(torch.float64 if z.dtype == torch.float64 else torch.float32).tiny ** 0.5
    if grad == "rotation":
        e = zh + qh
        ne = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
        ok = ok & (ne.double() >= smallest)
        r = torch.where(ok, e / ne, 0)
        mat = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * qh[:, :, None] * zh[:, None, :]
    else:
        e = zh - qh
        ne = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
        v = torch.where(ne.double() >= smallest, e / ne, 0)  # z^ = q^: v = 0, H = I, scale stays
        mat = eye - 2 * v[:, :, None] * v[:, None, :]
    scale = torch.where(ok, scale, 1)
    mat = torch.where(ok[:, :, None], mat, eye)
    return scale[:, :, None] * mat


def quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    metric: str = "l2",
    grad: str = "ste",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference fastvq.quantize: (z_q, indices) with autograd through the formulas above.

    z: (..., D), codebook: (K, D), one floating dtype (computed in it). indices: (...,) int64, or
    None to search with the reference nearest_code under `metric`. Gradients reach z by the
    estimator and the codebook by the value path, dL/dC[k] = sum of dL/dz_q over rows with
    index k (autograd of codebook[indices]).
    Returns z_q (..., D) in z's dtype and indices (...,) int64.
    """
    d = z.shape[-1]
    z2 = z.reshape(-1, d)
    if indices is None:
        indices = nearest_code(z2.detach(), codebook.detach(), metric).view(z.shape[:-1])
    q = codebook[indices.reshape(-1)]
    if grad == "ste":
        z_q = q + (z2 - z2.detach())
    else:
        mat = estimator_matrix(z2, q, grad)
        z_q = (mat @ z2[:, :, None]).squeeze(-1) + (q - q.detach())
    return z_q.view(z.shape), indices
