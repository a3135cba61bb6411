"""DDP with the quantizer modules: 2 CPU processes (gloo, 127.0.0.1 only), each holding half of
every batch, train a Linear + VectorQuantize(sync_codebook=True) under DistributedDataParallel
(broadcast_buffers=False, so nothing but the quantizer's own all-reduce keeps the codebooks
together). After a few SGD steps both ranks hold the same codebook, EMA state and weights, equal
to one process training on the concatenated batches. A ResidualVQ with quantize dropout, dead
codes and k-means init checks that the ranks agree where random draws are involved; an LFQ under
DDP gets the gradient of its batch entropy over both ranks' rows, as one process would.

The test runs this file as a script, which forks the two ranks (fork: the children inherit the
imports, ~3 s each on this machine, instead of re-importing as spawn would; the script keeps the
fork away from pytest's process and its threads).
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from fastvq.nn import LFQ, GroupedResidualVQ, ResidualVQ, VectorQuantize
from fastvq.ops._validate import NonFiniteError
from fastvq.testing import run_rank_script

WORLD = 2
# Rank-local buffers: the codebooks must agree through the quantizer's own all-reduce.
_NO_BUFFER_SYNC = {"broadcast_buffers": False}
DIM, K, STEPS = 8, 16, 3


def _model(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, DIM), VectorQuantize(DIM, K, decay=0.8, sync_codebook=sync))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 10, DIM, generator=g) * 2 for _ in range(STEPS)]


def _train(model: nn.Module, batches) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches:
        q, _, loss = model(x)
        ((q - x).square().mean() + loss).backward()
        opt.step()
        opt.zero_grad()
    inner = model.module if hasattr(model, "module") else model
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _residual(rank: int) -> dict:
    torch.manual_seed(rank)  # different generators: the synced draws must still agree
    rvq = ResidualVQ(
        dim=DIM, num_quantizers=4, codebook_size=K, quantize_dropout=True,
        threshold_ema_dead_code=2.0, kmeans_init=True, kmeans_iters=2, sync_codebook=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(10 + rank)  # each rank sees its own data
    dropped = []
    for _ in range(4):
        _, idx, _ = rvq(torch.randn(2, 20, DIM, generator=g))
        dropped.append(int((idx[0, 0] == -1).sum()))
    state = {k: v.clone() for k, v in rvq.state_dict().items()}
    return {"state": state, "dropped": torch.tensor(dropped)}


def _uneven(rank: int) -> dict:
    # Synced k-means init and dead-code reset with rank-dependent row counts: more rows than
    # codes on one rank and fewer on the other (both ways round), then a rank whose batch is all
    # padding. Every rank must join the same collectives (it hung) and end with rank 0's state.
    torch.manual_seed(rank)
    g = torch.Generator().manual_seed(20 + rank)
    out = {}
    for name, rows in (("more_on_0", (20, 5)), ("more_on_1", (5, 20))):
        vq = VectorQuantize(DIM, K, kmeans_init=True, sync_codebook=True,
                            threshold_ema_dead_code=2.0)  # fmt: skip
        vq(torch.randn(1, rows[rank], DIM, generator=g))
        mask = torch.full((1, 12), rank == 0)  # rank 1: all padding
        vq(torch.randn(1, 12, DIM, generator=g), mask=mask)
        out[name] = {k: v.clone() for k, v in vq.state_dict().items()}
    # Rank 0's batch all padding: the dead codes take rank 1's rows (no reset ran at all).
    vq = VectorQuantize(DIM, K, kmeans_init=True, sync_codebook=True, threshold_ema_dead_code=2.0)
    vq(torch.randn(1, 20, DIM, generator=g))
    vq(torch.randn(1, 12, DIM, generator=g), mask=torch.full((1, 12), rank == 1))
    out["padding_on_0"] = {k: v.clone() for k, v in vq.state_dict().items()}
    return out


def _nan_on_one_rank(rank: int) -> dict:
    # Rank 1's rows hold a NaN: it raised alone and rank 0 waited in the next all-reduce until
    # the process group's timeout (30 minutes by default). Now both raise, at every forward: a
    # layer, a k-means init step, a residual stack and a grouped one (whose layers the stack's
    # check covers).
    layers = {
        "vq": VectorQuantize(DIM, K, sync_codebook=True, threshold_ema_dead_code=1.0),
        "kmeans": VectorQuantize(DIM, K, sync_codebook=True, kmeans_init=True),
        "rvq": ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=K, sync_codebook=True),
        "grouped": GroupedResidualVQ(
            dim=DIM, groups=2, num_quantizers=2, codebook_size=K, sync_codebook=True
        ),  # fmt: skip
    }
    errors = {}
    for name, layer in layers.items():
        errors[name] = []
        for _ in range(2):
            x = torch.randn(1, 8, DIM, generator=torch.Generator().manual_seed(rank))
            x[0, 3, 0] = float("nan") if rank == 1 else x[0, 3, 0]
            try:
                layer(x)
            except NonFiniteError as e:
                errors[name].append(str(e))
    return errors


class _LinearLFQ(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.lfq = nn.Linear(DIM, 6), LFQ(dim=6, codebook_size=64)

    def forward(self, x):
        return self.lfq(self.proj(x), return_loss_breakdown=True)


def _lfq_step(model: nn.Module, x: torch.Tensor) -> dict:
    # LFQ's batch entropy under DDP is that of all ranks' rows (the peer's distributed mean): the
    # averaged gradient then equals one process's on the whole batch.
    (_, _, aux), parts = model(x)
    aux.backward()
    inner = model.module if hasattr(model, "module") else model
    return {"batch_entropy": parts.batch_entropy.detach(), "grad": inner.proj.weight.grad.clone()}


def _lfq_batch() -> torch.Tensor:
    return torch.randn(4, 10, DIM, generator=torch.Generator().manual_seed(3))


def _worker(rank: int, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)  # 2 ranks on a 2-core machine
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(_model(sync=True), **_NO_BUFFER_SYNC)
        shards = [x.chunk(WORLD)[rank] for x in _batches()]
        results = {"vq": _train(ddp, shards), "rvq": _residual(rank), "uneven": _uneven(rank)}
        results["nan"] = _nan_on_one_rank(rank)
        lfq = nn.parallel.DistributedDataParallel(_LinearLFQ())
        results["lfq"] = _lfq_step(lfq, _lfq_batch().chunk(WORLD)[rank])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_codebooks_identical_and_equal_to_one_process(tmp_path):
    ranks = run_rank_script(__file__, tmp_path, WORLD)
    # Both ranks hold the same state, bit for bit ...
    for key in ranks[0]["vq"]:
        assert torch.equal(ranks[0]["vq"][key], ranks[1]["vq"][key]), key
    for key in ranks[0]["rvq"]["state"]:
        assert torch.equal(ranks[0]["rvq"]["state"][key], ranks[1]["rvq"]["state"][key]), key
    assert torch.equal(ranks[0]["rvq"]["dropped"], ranks[1]["rvq"]["dropped"])
    assert bool(ranks[0]["rvq"]["state"]["layers.0.initted"])
    for name, state in ranks[0]["uneven"].items():
        for key in state:
            assert torch.equal(state[key], ranks[1]["uneven"][name][key]), (name, key)
    assert ranks[0]["uneven"]["padding_on_0"]["cluster_size"].min() >= 2.0  # none left dead
    for name, errors in ranks[0]["nan"].items():
        assert len(errors) == len(ranks[1]["nan"][name]) == 2, name
        assert all("another rank's quantizer input" in e for e in errors), (name, errors)
        assert all("contains NaN or Inf" in e for e in ranks[1]["nan"][name]), name
    # ... equal to one process on the whole batches, up to float32 rounding.
    single = _train(_model(sync=False), _batches())
    for key, want in single.items():
        torch.testing.assert_close(ranks[0]["vq"][key], want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(single["1.embed"], _model(sync=False).state_dict()["1.embed"])
    lfq = _lfq_step(_LinearLFQ(), _lfq_batch())
    for rank in ranks:
        torch.testing.assert_close(rank["lfq"], lfq, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    torch.multiprocessing.start_processes(
        _worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=WORLD, start_method="fork"
    )
