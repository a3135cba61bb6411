"""Codebook learning (issue 3) against what users otherwise run, in one process and one table.

ema:      one EMA step as a VQ layer runs it: EMA of counts and sums, Laplace-smoothed codebook,
          dead-code check. fastvq (each backend; GPU backends also with deterministic=True) vs
          the one-hot formulation (vector-quantize-pytorch, Sonnet) vs index_add_, both from
          fastvq.reference.codebook, with vector-quantize-pytorch's expire-codes step (threshold
          0: the check runs, but no code dies however often a step repeats, so every peer's timed
          steps do the same work). Checked: one step from the same state against float64
          index_add_ (err). GB/s counts z and indices read once, the (K, D + 1) statistics read
          and written, the codebook written. ema_hot: the same with half of the rows on code 0,
          as at initialization or collapse (atomics contend, a deterministic run is long),
          without the one-hot peer, whose cost does not depend on the codes.
quantize: forward + backward (dL/dz for a fixed random dL/dz_q; codebook without grad, as in
          EMA training) of fastvq.quantize with grad="ste" / "rotation", against nearest_code
          alone, autograd through the reference rotation trick (fastvq.reference.quantize) and
          vector-quantize-pytorch's rotate_to, both after fastvq's search. Checked: tie-aware
          indices, and dL/dz on sampled rows against the float64 reference (err). TFLOP/s counts
          the search's 2·N·K·D.
kmeans:   10 Lloyd iterations: fastvq.kmeans (k-means++ and random init) vs vector-quantize-
          pytorch's kmeans (cdist, N x K memory) and flash-kmeans' Triton k-means (CUDA). Checked:
          extra.mse, the mean squared distance to the nearest centroid (same evaluator for all).

python -m bench.bench_codebook [--quick] [--out DIR]
"""

import torch

import fastvq
from bench.common import DEVICE, Skip, check_indices, cli, measure, rel_err, sample_rows
from fastvq.reference import codebook as ref_codebook
from fastvq.reference import quantize as ref_quantize

SHAPES = {
    "cuda": [
        ("ema", 65536, 65536, 32),
        ("ema_hot", 65536, 65536, 32),
        ("quantize", 65536, 65536, 32),
        ("kmeans", 262144, 65536, 32),
        ("kmeans", 65536, 16384, 32),
    ],
    "cpu": [
        ("ema", 16384, 4096, 32),
        ("ema_hot", 16384, 4096, 32),
        ("quantize", 8192, 4096, 32),
        ("kmeans", 16384, 1024, 32),
    ],
    "quick": [
        ("ema", 256, 64, 8),
        ("ema_hot", 256, 64, 8),
        ("quantize", 256, 64, 8),
        ("kmeans", 256, 16, 8),
    ],
}
DECAY = 0.99
# Every step checks for dead codes (each peer's host sync) and none ever dies: with a threshold
# above 0 the ~37 % of codes that no row picks would all die at step 460 and then every step after,
# so a peer fast enough for do_bench to repeat it past 460 steps (thousands at 0.05 ms) would be
# timed replacing ~24,000 codes per step while a slow one (a few repeats) replaces none.
THRESHOLD = 0.0


def backends_for(device: str) -> list[str]:
    """fastvq backends for this device's tensors (no Triton interpreter on CPU); one that is not
    built here gives an "unavailable: <why>" row, as in every module, not no row."""
    return ["triton", "cuda", "torch"] if device == "cuda" else ["cpu", "torch"]


# --- ema ---------------------------------------------------------------------------------------


def _state(k, d, g):
    codebook = torch.randn(k, d, generator=g).to(DEVICE)
    return torch.ones(k, device=DEVICE), codebook.clone(), codebook


def expire_codes_(codebook, cluster_size, embed_sum, z):
    """vector-quantize-pytorch's dead-code step (expire_codes_): a host check, then dead codes take
    random rows of the batch."""
    dead = cluster_size < THRESHOLD
    if not dead.any():
        return
    rows = z[torch.randint(len(z), (int(dead.sum()),), device=z.device)]
    codebook[dead] = rows
    cluster_size[dead] = THRESHOLD
    embed_sum[dead] = rows * THRESHOLD


def ema_peers(z, idx, k, d):
    """name -> setup() -> fn; every fn mutates its own copy of one initial state (k, d)."""

    def fastvq_step(backend, deterministic=None):
        def setup():
            cs, es, cb = _state(k, d, torch.Generator().manual_seed(1))

            def step():
                fastvq.ema_update_(
                    cs,
                    es,
                    z,
                    idx,
                    DECAY,
                    backend=backend,
                    deterministic=deterministic,
                    check_indices=False,
                )
                fastvq.ema_codebook(cs, es, out=cb)
                fastvq.reset_dead_codes_(cb, cs, es, z, THRESHOLD)
                return cs, es, cb

            return step

        return setup

    def torch_step(update):
        def setup():
            cs, es, cb = _state(k, d, torch.Generator().manual_seed(1))

            def step():
                new_cs, new_es = update(cs, es, z, idx, DECAY)
                cs.copy_(new_cs), es.copy_(new_es)
                cb.copy_(ref_codebook.ema_codebook(cs, es))
                expire_codes_(cb, cs, es, z)
                return cs, es, cb

            return step

        return setup

    peers = {f"fastvq ema {b}": fastvq_step(b) for b in ("auto", *backends_for(DEVICE))}
    for b in backends_for(DEVICE):
        if b in ("triton", "cuda"):  # the CPU kernel is deterministic either way
            peers[f"fastvq ema {b} deterministic"] = fastvq_step(b, deterministic=True)
    peers["torch one-hot (vqp, Sonnet)"] = torch_step(ref_codebook.ema_update_onehot)
    peers["torch index_add_"] = torch_step(ref_codebook.ema_update_index_add)
    return peers


def run_ema(n, k, d, reps, hot=False):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g).to(DEVICE)
    idx = torch.randint(k, (n,), generator=g)
    if hot:
        idx[torch.rand(n, generator=g) < 0.5] = 0
    idx = idx.to(DEVICE)
    cs, es, _ = _state(k, d, torch.Generator().manual_seed(1))
    cs64, es64 = ref_codebook.ema_update_index_add(cs.double(), es.double(), z.double(), idx, DECAY)
    cb64 = ref_codebook.ema_codebook(cs64, es64)

    def check(out):
        err = max(rel_err(a, b) for a, b in zip(out, (cs64, es64, cb64), strict=True))
        return {"err": err, "ok": err < 1e-5}

    nbytes = 4 * n * d + 8 * n + 2 * 4 * k * (d + 1) + 4 * k * d
    return [
        measure(
            name,
            {"op": "ema_hot" if hot else "ema", "N": n, "K": k, "D": d},
            setup,
            check=check,
            reps=reps,
            nbytes=nbytes,
            need_bytes=12 * n * k if "one-hot" in name else None,  # int64 one-hot + float copy
        )
        for name, setup in ema_peers(z, idx, k, d).items()
        if not (hot and "one-hot" in name)  # its cost does not depend on the codes
    ]


# --- quantize ----------------------------------------------------------------------------------


def quantize_peers(z, c, g):
    """name -> setup() -> fn returning (indices, dL/dz or None)."""

    def with_grad(forward):
        def setup():
            zz = z.clone().requires_grad_()

            def step():
                z_q, idx = forward(zz)
                return idx, torch.autograd.grad(z_q, zz, g)[0]

            return step

        return setup

    def fastvq_quantize(grad, backend):
        return with_grad(lambda zz: fastvq.quantize(zz, c, grad=grad, backend=backend))

    def reference_rotation(zz):
        idx = fastvq.nearest_code(zz.detach(), c)
        return ref_quantize.quantize(zz, c, idx, grad="rotation")

    def vqp_rotation(zz):
        from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

        idx = fastvq.nearest_code(zz.detach(), c)
        return rotate_to(zz, c[idx]), idx

    gpu_backends = [b for b in backends_for(DEVICE) if b != "torch"]
    peers = {}
    for grad in ("ste", "rotation"):
        for backend in ("auto", *gpu_backends):
            peers[f"fastvq quantize {grad} {backend}"] = fastvq_quantize(grad, backend)
    peers["fastvq nearest_code alone"] = lambda: lambda: (fastvq.nearest_code(z, c), None)
    peers["reference rotation (autograd)"] = with_grad(reference_rotation)
    peers["vqp rotate_to (autograd)"] = with_grad(vqp_rotation)
    return peers


def run_quantize(n, k, d, reps):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen).to(DEVICE)
    c = torch.randn(k, d, generator=gen).to(DEVICE)
    g = torch.randn(n, d, generator=gen).to(DEVICE)
    sub = sample_rows(n, 256, DEVICE)
    rows = []
    for name, setup in quantize_peers(z, c, g).items():
        grad = "ste" if " ste " in name else "rotation"

        def check(out, grad=grad):
            idx, dz = out
            result = check_indices(z, c, idx)
            if dz is not None:
                z64 = z[sub].double().requires_grad_()
                z_q, _ = ref_quantize.quantize(z64, c.double(), idx[sub], grad=grad)
                (ref,) = torch.autograd.grad(z_q, z64, g[sub].double())
                result["err"] = rel_err(dz[sub], ref)
                result["ok"] = result["ok"] and result["err"] < 1e-4
            return result

        rows.append(
            measure(
                name,
                {"op": "quantize", "N": n, "K": k, "D": d},
                setup,
                check=check,
                reps=reps,
                flops=2 * n * k * d,
                arith="tf32",
                need_bytes=4 * n * d * d * 3 if "reference" in name else None,  # (N, D, D)
            )
        )
    return rows


# --- kmeans ------------------------------------------------------------------------------------

ITERS = 10


def kmeans_peers(x, k):
    """name -> setup() -> fn returning the (K, D) centroids."""

    def vqp():
        from vector_quantize_pytorch.vector_quantize_pytorch import kmeans

        return lambda: kmeans(x[None], k, num_iters=ITERS)[0][0]

    def flash():
        if DEVICE != "cuda":
            raise Skip("needs CUDA")
        from flash_kmeans import batch_kmeans_Euclid

        return lambda: batch_kmeans_Euclid(x[None], k, max_iters=ITERS)[1][0]

    return {
        "fastvq kmeans (k-means++)": lambda: lambda: fastvq.kmeans(x, k, ITERS),
        "fastvq kmeans (random init)": lambda: lambda: fastvq.kmeans(x, k, ITERS, init="random"),
        "vqp kmeans (cdist)": vqp,
        "flash-kmeans triton": flash,
    }


def run_kmeans(n, k, d, reps):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def check(centroids):
        _, dist = fastvq.nearest_code(x, centroids.float(), return_distance=True)
        mse = dist.double().mean().item()
        return {
            "ok": centroids.shape == (k, d) and bool(torch.isfinite(centroids).all()),
            "extra": {"mse": mse},
        }

    return [
        measure(
            name,
            {"op": "kmeans", "N": n, "K": k, "D": d, "iters": ITERS},
            setup,
            check=check,
            reps=reps,
            flops=2 * n * k * d * ITERS,
            arith="tf32",
            # vqp: 28 GiB at N = 65,536, K = 16,384 on an H100 (issue 3), 7 float32 (N, K) arrays
            need_bytes=7 * 4 * n * k if "vqp" in name else None,
        )
        for name, setup in kmeans_peers(x, k).items()
    ]


def run(shapes, reps, quick):
    runners = {
        "ema": run_ema,
        "ema_hot": lambda *a: run_ema(*a, hot=True),
        "quantize": run_quantize,
        "kmeans": run_kmeans,
    }
    return [row for op, n, k, d in shapes for row in runners[op](n, k, d, reps)]


def main(argv=None):
    return cli(argv, __doc__, "codebook", run, SHAPES)


if __name__ == "__main__":
    main()
