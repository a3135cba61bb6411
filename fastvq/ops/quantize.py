"""fastvq.quantize: nearest-code search, gather and a gradient estimator; closed-form backward.

Two custom ops carry the work after the search (fastvq.nearest_code):
  fastvq::quantize_fwd  (z, codebook, indices) -> (z_q = codebook[indices], per-row stats)
  fastvq::quantize_bwd  (dL/dz_q, z, codebook, indices, stats) -> (dL/dz, dL/dcodebook)
each with a "torch" body (plain torch ops) and a Triton body (kernels/quantize.py), a fake
implementation, and the pair wired together by register_autograd, so torch.compile keeps each as
one node and opcheck covers them. The C++ backends ("cpu", "cuda") are the same pair as schemas
in csrc/fastvq.cpp, fastvq::quantize_fwd_cpp / quantize_bwd_cpp (csrc/cpu/quantize.cpp,
csrc/cuda/quantize.cu), with their fakes and autograd registered here. None ever builds an
N x K or an N x D x D tensor.
"""

import torch

from fastvq._ext import EXTENSION_ERROR, fake_on_one_device, has_kernel
from fastvq.ops._validate import check_choice, check_floating, check_no_tangent
from fastvq.ops.nearest_code import _nearest_code
from fastvq.reference.quantize import GRADS

# --- torch bodies ------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats_torch(z: torch.Tensor, q: torch.Tensor, grad: str) -> torch.Tensor:
    """(N, 4) per-row (s, 1/|z|, 1/|q|, w) as in kernels/quantize.py, float32 or float64."""
    acc = _acc(z.dtype)
    zf, qf = z.to(acc), q.to(acc)
    nz = torch.linalg.vector_norm(zf, dim=1)
    nq = torch.linalg.vector_norm(qf, dim=1)
    scale = nq / nz
    ok = (nz > 0) & (nq > 0) & nz.isfinite() & scale.isfinite()
    inv_z = torch.where(ok, nz.reciprocal(), 0)
    inv_q = torch.where(ok, nq.reciprocal(), 0)
    sign = 1.0 if grad == "rotation" else -1.0
    e2 = (zf * inv_z[:, None] + sign * (qf * inv_q[:, None])).square().sum(1)
    e_ok = e2 >= torch.finfo(acc).tiny  # else e = 0 (fastvq.reference.quantize says why)
    if grad == "rotation":
        ok = ok & e_ok  # z^ = -q^: no unique rotation, STE
        inv_z, inv_q = torch.where(ok, inv_z, 0), torch.where(ok, inv_q, 0)
    w = torch.where(ok & e_ok, 2 / e2, 0)
    return torch.stack([torch.where(ok, scale, 1), inv_z, inv_q, w], dim=1)


def _fwd_torch(z, codebook, indices, grad):
    q = codebook.index_select(0, indices)
    if grad == "ste":
        return q, z.new_empty(z.shape[0], 0, dtype=_acc(z.dtype))
    return q, _stats_torch(z, q, grad)


def _codebook_grad(g: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """dL/dC in g's dtype: g's rows summed onto their codes by index_add_ (deterministic on CUDA
    under torch.use_deterministic_algorithms)."""
    return torch.zeros(codebook.shape, dtype=g.dtype, device=g.device).index_add_(0, indices, g)


def _bwd_torch(grad_out, z, codebook, indices, stats, grad, need_z, need_codebook):
    acc = _acc(z.dtype)
    g = grad_out.to(acc)
    dz = dc = None
    if need_codebook:
        dc = _codebook_grad(g, codebook, indices)
    if need_z:
        zf, qf = z.to(acc), codebook.index_select(0, indices).to(acc)
        scale, inv_z, inv_q, w = stats.unbind(1)
        zs = zf * inv_z[:, None]
        sign = 1.0 if grad == "rotation" else -1.0
        e = zs + sign * (qf * inv_q[:, None])
        dz = g - (w * (e * g).sum(1))[:, None] * e
        if grad == "rotation":
            # A fallback row (inv_q = 0) whose q . g overflows: 0, not inf * 0 = NaN.
            along = torch.where(inv_q > 0, 2 * (qf * g).sum(1) * inv_q, 0)
            dz = dz + along[:, None] * zs
        dz = (scale[:, None] * dz).to(z.dtype)
    return dz, dc


# --- custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("fastvq::quantize_fwd", mutates_args=())
def _quantize_fwd(
    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, grad: str, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """z_q (N, D) = codebook[indices], stats (N, 4) float32/64 ((N, 0) for STE; z unused then)."""
    if use_triton:
        from fastvq.kernels.quantize import quantize_fwd

        return quantize_fwd(z, codebook, indices, grad)
    return _fwd_torch(z, codebook, indices, grad)


@_quantize_fwd.register_fake
def _(z, codebook, indices, grad, use_triton):
    fake_on_one_device("quantize_fwd", z, codebook, indices)
    n, d = z.shape
    return codebook.new_empty(n, d), z.new_empty(n, 0 if grad == "ste" else 4, dtype=_acc(z.dtype))


@torch.library.custom_op("fastvq::quantize_bwd", mutates_args=())
def _quantize_bwd(
    grad_out: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    stats: torch.Tensor,
    grad: str,
    need_z: bool,
    need_codebook: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz, dc): dz (N, D) in z's dtype if need_z else (0, D); dc (K, D) in codebook's dtype if
    need_codebook else (0, D). need_z only for rotation / householder."""
    if use_triton:
        from fastvq.kernels.quantize import quantize_bwd

        dz, dc = quantize_bwd(grad_out, z, codebook, indices, stats, grad, need_z, need_codebook)
    else:
        dz, dc = _bwd_torch(grad_out, z, codebook, indices, stats, grad, need_z, need_codebook)
    d = z.shape[1]
    dz = z.new_empty(0, d) if dz is None else dz.contiguous()  # as the fake's
    dc = codebook.new_empty(0, d) if dc is None else dc.to(codebook.dtype)
    return dz, dc


@_quantize_bwd.register_fake
def _(grad_out, z, codebook, indices, stats, grad, need_z, need_codebook, use_triton):
    fake_on_one_device("quantize_bwd", grad_out, z, codebook, indices, stats)
    d = z.shape[1]
    dz = z.new_empty(z.shape[0] if need_z else 0, d)
    dc = codebook.new_empty(codebook.shape[0] if need_codebook else 0, d)
    return dz, dc


# The C++ pair, when fastvq._C is built with it (a stale build without it runs the torch bodies).
_HAS_CPP = EXTENSION_ERROR is None and hasattr(torch.ops.fastvq, "quantize_fwd_cpp")
# Per device type, whether both C++ ops have a kernel there: an extension whose nearest_code has
# CUDA kernels but whose quantize pair does not (a partial build) must gather on the torch path,
# not fail in the dispatcher. Plain booleans, read once (torch.compile cannot trace the query).
_CPP_ON = {
    device: _HAS_CPP and all(has_kernel(op, key) for op in ("quantize_fwd_cpp", "quantize_bwd_cpp"))
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}

if _HAS_CPP:

    @torch.library.register_fake("fastvq::quantize_fwd_cpp")
    def _(z, codebook, indices, grad):
        fake_on_one_device("quantize_fwd_cpp", z, codebook, indices)
        n, d = z.shape
        return codebook.new_empty(n, d), z.new_empty(
            n, 0 if grad == "ste" else 4, dtype=_acc(z.dtype)
        )

    @torch.library.register_fake("fastvq::quantize_bwd_cpp")
    def _(grad_out, z, codebook, indices, stats, grad, need_z, need_codebook):
        fake_on_one_device("quantize_bwd_cpp", grad_out, z, codebook, indices, stats)
        d = z.shape[1]
        dz = z.new_empty(z.shape[0] if need_z else 0, d)
        dc = codebook.new_empty(codebook.shape[0] if need_codebook else 0, d)
        return dz, dc


def _setup_context(ctx, inputs, output):
    z, codebook, indices, grad = inputs[:4]
    _, stats = output
    # use_triton is None for the C++ forward, whose schema has no such argument.
    ctx.grad, ctx.use_triton = grad, (inputs[4] if len(inputs) > 4 else None)
    # STE never reads z in its backward: do not keep it alive for that.
    ctx.save_for_backward(None if grad == "ste" else z, codebook, indices, stats)


def _backward(ctx, grad_zq, _grad_stats):
    z, codebook, indices, stats = ctx.saved_tensors
    need_z, need_codebook = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ste = ctx.grad == "ste"
    dz = dc = None
    if ste and need_z:
        dz = grad_zq
    kernel_z = need_z and not ste
    # The Triton and CUDA kernels sum dL/dC with float atomics (rounding varies run to run):
    # under torch.use_deterministic_algorithms, index_add_ takes over (deterministic there).
    # Under backward(create_graph=True) (grad mode on here) index_add_ too: dL/dC is linear in
    # grad_zq, and autograd differentiates it; the kernels' outputs have no derivative.
    atomic = ctx.use_triton or (ctx.use_triton is None and grad_zq.is_cuda)
    torch_c = torch.is_grad_enabled() or (atomic and torch.are_deterministic_algorithms_enabled())
    kernel_c = need_codebook and not torch_c
    if kernel_z or kernel_c:
        g = grad_zq.contiguous()
        z = g if z is None else z  # STE's backward never reads z: any (N, D) tensor will do
        args = (g, z, codebook, indices, stats, ctx.grad, kernel_z, kernel_c)
        if ctx.use_triton is None:
            out_z, out_c = torch.ops.fastvq.quantize_bwd_cpp(*args)
        else:
            out_z, out_c = _quantize_bwd(*args, ctx.use_triton)
        dz = out_z if kernel_z else dz
        dc = out_c if kernel_c else None
    if need_codebook and not kernel_c:
        acc = _acc(codebook.dtype)
        dc = _codebook_grad(grad_zq.to(acc), codebook, indices).to(codebook.dtype)
    return (dz, dc, None, None) if ctx.use_triton is None else (dz, dc, None, None, None)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "fastvq.quantize has no double backward through the rotation or householder gradient "
        "of z (one fused kernel); STE's and the codebook's gradients are differentiable"
    )


_quantize_fwd.register_autograd(_backward, setup_context=_setup_context)
_quantize_bwd.register_autograd(_no_double_backward)
if _HAS_CPP:
    torch.library.register_autograd(
        "fastvq::quantize_fwd_cpp", _backward, setup_context=_setup_context
    )
    # Without it the dispatcher runs the C++ op under autograd with a warning, and a second
    # derivative through its outputs is silently 0.
    torch.library.register_autograd("fastvq::quantize_bwd_cpp", _no_double_backward)


# --- public op ---------------------------------------------------------------------------------


def quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    grad: str = "ste",
    precision: str = "exact",
    backend: str = "auto",
    check_inputs_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each vector of z to its nearest code, with a chosen gradient estimator.

    Forward: indices = fastvq.nearest_code(z, codebook, metric=..., precision=...), then
    z_q = codebook[indices] exactly (bit for bit) for every estimator. Backward, per row, with
    q = codebook[idx], g = dL/dz_q, s = |q|/|z|, z^ = z/|z|, q^ = q/|q|:
      grad="ste":          dL/dz = g.
      grad="rotation":     dL/dz = s R^T g, R = I - 2 r r^T + 2 q^ z^^T, r = (z^ + q^)/|z^ + q^|:
                           the rotation trick of Fifty et al. (ICLR 2025), R and s constants as in
                           vector-quantize-pytorch's rotate_to. Computed in O(D) per row.
      grad="householder":  dL/dz = s H^T g, H = I - 2 v v^T, v = (z^ - q^)/|z^ - q^|: the single
                           reflection of the rotated VQ-VAE paper ("v from the normalized
                           difference of z_e and q", with its "rotation and rescaling"). The
                           paper leaves v's normalization open; normalizing z and q first is the
                           reading under which s H z = q, i.e. the transform maps z onto its
                           code as the rotation trick's does. H is a reflection (det -1).
    Degenerate rows get a defined, finite gradient (checks in float32, or float64 for float64
    inputs): z = 0, q = 0, |z|^2 or |q|^2 (summed in that arithmetic) overflowing or underflowing
    to 0 (in float32, |z| beyond about 1.8e19 or below about 2.6e-23), or s overflowing -> STE (g),
    though the same geometry at unit scale would rotate; rotation with z^ = -q^ (no unique
    rotation) -> STE; householder with z^ = q^ -> H = I, s g (what the rotation trick gives
    there), where z^ = -+q^ means |z^ +- q^|^2 below the smallest normal of that arithmetic.
    Near-degenerate rows stay bounded: |dL/dz| <= 5 s |g| up to rounding. Both estimators are
    discontinuous at these rows, so a row (anti)parallel to its code only up to rounding (z = -3 q
    or -0.7 q in float32) rotates or reflects about an axis that the rounding sets (another one
    in float64) rather than taking the fallback. At D = 1 every row is (anti)parallel to its
    code, so which of these a row gets depends on the rounding of z / |z|: use "ste" there.
    Double backward: STE's
    dL/dz and every estimator's dL/dC are differentiable; differentiating rotation's or
    householder's dL/dz again is a NotImplementedError.

    Codebook gradient (when codebook.requires_grad): dL/dC[k] = sum of g over rows with index k, for
    every estimator, accumulated by scatter in O(K D) memory (float32 atomics on Triton, so
    run-to-run rounding may differ, as on CUDA C++; index_add_ on torch, and on Triton and CUDA
    under torch.use_deterministic_algorithms(True); a fixed order on the C++ CPU backend). It is
    what autograd gives through the references z_q = q + (z - z.detach()) and z_q = (s R).detach() @
    z + (q - q.detach()), and the only consistent value path: s R(z, q) z = q for every q, so even
    an undetached R gives dz_q/dq = I. This feeds codebook losses, SimVQ-style projections and
    hyper-network codebooks. VQ-VAE and Fifty et al. send no decoder gradient to the codebook
    through z_q: to get that behaviour (vector-quantize-pytorch's), pass a codebook that does not
    require grad (e.g. codebook.detach()) and train it by a codebook loss or EMA.

    Args:
        z: (..., D) float32, bfloat16 or float16 (float64 with backend "torch"/"auto").
        codebook: (K, D) on z's device, K >= 1, 1 <= D <= 1024. Different dtypes are promoted
            (bf16 z with a float32 codebook quantizes in float32; z's gradient returns in bf16).
        metric: "l2", "cosine" or "dot", as in fastvq.nearest_code.
        grad: "ste", "rotation" or "householder".
        precision: "exact" or "fast", as in fastvq.nearest_code (the search only).
        backend: "auto", "triton", "cuda", "cpu" or "torch". "triton": Triton search and the fused
            Triton gather/estimator kernels. "torch": all plain torch ops. "cpu"/"cuda": the C++
            search and the fused C++ gather/estimator kernels (on the CPU the codebook gradient
            is bit-identical run to run and for any thread count). "auto" resolves as in
            fastvq.nearest_code (Triton, else CUDA C++, on CUDA tensors; C++ CPU, else torch, on
            CPU tensors).
        check_inputs_finite: as in fastvq.nearest_code.

    Returns:
        z_q: (..., D) in the promoted dtype of z and codebook; indices: (...,) int64.
    Memory: O(N D + K D) beyond the inputs; per-row float32 stats (16 bytes) are saved for the
    backward of rotation / householder; STE saves nothing of z.
    """
    check_floating("z", z)
    check_floating("codebook", codebook)
    check_choice("grad", grad, GRADS)
    check_no_tangent("quantize", z, codebook)
    # The search validates shapes, devices, metric, precision and backend, and hands back the
    # backend and the promoted, contiguous rows and codebook it picked and made.
    args = (metric, precision, backend, False, check_inputs_finite, None)
    indices, name, z2, cb = _nearest_code(z, codebook, *args)
    d = codebook.shape[1]
    idx = indices.reshape(-1)
    if name in ("cpu", "cuda") and _CPP_ON[name]:
        z_q, _ = torch.ops.fastvq.quantize_fwd_cpp(z2, cb, idx, grad)
    else:
        z_q, _ = _quantize_fwd(z2, cb, idx, grad, name == "triton")
    return z_q.view(*z.shape[:-1], d), indices


class _StraightThrough(torch.autograd.Function):
    """Value of the codes, gradient of the identity towards z, also under torch.func's transforms
    (setup_context style, a generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, codes):
        # A new tensor, as z + (codes - z).detach() gave: a view made in a Function refuses
        # in-place ops (out.mul_(2) after the quantizer), and a detach() would share the
        # codes' storage with whatever else holds them.
        return codes.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _StraightThroughWithTangent(_StraightThrough):
    """And the tangent of z in forward mode. Dynamo cannot trace a custom jvp (a graph break):
    compiled graphs take the parent, whose forward mode is torch's NotImplementedError."""

    @staticmethod
    def jvp(ctx, z_tangent, codes_tangent):
        return z_tangent


def straight_through(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The codes' values bit for bit, with the identity's gradient (and tangent) towards z: the
    straight-through estimator. z + (codes - z).detach() has that gradient, but its value is
    off from the codes by a rounding wherever z is not near them, so decoding the indices would
    not give back the output. codes: z's shape, dtype and device, no gradient of their own.
    """
    check_floating("z", z)
    check_floating("codes", codes)
    if codes.shape != z.shape or codes.dtype != z.dtype or codes.device != z.device:
        raise ValueError(
            f"codes must have z's shape {tuple(z.shape)}, dtype {z.dtype} and device {z.device}, "
            f"got {tuple(codes.shape)} {codes.dtype} on {codes.device}"
        )
    # Always, not only where z.requires_grad: under torch.func.vmap and forward-mode AD z does
    # not require grad, and the codes would carry no gradient or tangent at all.
    estimator = _StraightThrough if torch.compiler.is_compiling() else _StraightThroughWithTangent
    return estimator.apply(z, codes)
