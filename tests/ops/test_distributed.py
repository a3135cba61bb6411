"""Distributed codebook statistics: 2 CPU processes (gloo, 127.0.0.1 only), each holding half of a
batch, end with the same statistics and centroids as one process on the whole batch.

The test runs this file as a script, which starts the ranks with torch.multiprocessing.spawn:
spawned children import their function from the parent's __main__ script, which a pytest
module (imported under --import-mode=importlib) is not.
"""

import os
import sys

import torch
import torch.distributed as dist

from fastvq.ops.codebook import ema_codebook, ema_update_, kmeans, reset_dead_codes_
from fastvq.testing import run_rank_script

WORLD = 2
K, D = 40, 6
CLUSTERS = 16
THRESHOLD = 0.5


def _data() -> dict:
    g = torch.Generator().manual_seed(0)
    data = dict(
        z=torch.randn(300, D, generator=g),
        indices=torch.randint(0, K, (300,), generator=g),
        weight=(torch.rand(300, generator=g) > 0.2).float(),
        cluster_size=torch.rand(K, generator=g) * 3,
        embed_sum=torch.randn(K, D, generator=g),
        # float64 for k-means, so that the sums' rounding (per rank, then all-reduced, versus in
        # one pass) cannot flip an assignment between the two runs.
        x=torch.randn(800, D, generator=g, dtype=torch.float64),
    )
    init = data["x"][torch.randperm(800, generator=g)[:CLUSTERS]].clone()
    init[5] = 50.0  # no row comes near: cluster 5 empties and is re-seeded from the farthest row
    data["init"] = init
    return data


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(WORLD)[rank]


def _worker(rank: int, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)  # 2 ranks on a 2-core machine
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        data = _data()
        z, idx, w = (_shard(data[key], rank) for key in ("z", "indices", "weight"))
        results = {}
        for det in (False, True):
            cs, es = data["cluster_size"].clone(), data["embed_sum"].clone()
            ema_update_(cs, es, z, idx, 0.9, weight=w, deterministic=det, all_reduce=True)
            results[f"ema-{det}"] = (cs, es)
        x = _shard(data["x"], rank)
        results["kmeans"] = kmeans(
            x, CLUSTERS, iters=4, init=data["init"], all_reduce=True, return_inertia=True
        )
        # Each rank passes a different generator: only the first rank's initialisation counts.
        gen = torch.Generator().manual_seed(rank)
        results["kmeans++"] = kmeans(x, CLUSTERS, iters=2, generator=gen, all_reduce=True)
        # Statistics agree after the all-reduced update; the first rank's replacement rows are
        # broadcast, so codebooks agree after the reset too.
        cs, es = results["ema-False"][0].clone(), results["ema-False"][1].clone()
        codebook = ema_codebook(cs, es)
        replaced = reset_dead_codes_(
            codebook, cs, es, z, THRESHOLD, torch.Generator().manual_seed(rank), broadcast=True
        )
        results["reset"] = (replaced, codebook, cs, es)
        # A first rank without rows: the next rank that has some draws them.
        cs, es = results["ema-False"][0].clone(), results["ema-False"][1].clone()
        codebook = ema_codebook(cs, es)
        mine = z[:0] if rank == 0 else z
        reset_dead_codes_(codebook, cs, es, mine, THRESHOLD, broadcast=True)
        results["reset-from-rank-1"] = (codebook, cs, es)
        # Statistics that disagree (another dead code, float64 on one rank): gloo took a shorter
        # message into the receiver's buffer and left the rest of it unwritten; now every rank
        # raises.
        errors = []
        for disagree in ("dead", "dtype", "same count"):
            cs, es = results["ema-False"][0].clone(), results["ema-False"][1].clone()
            if rank == 1 and disagree == "dead":
                cs[(cs >= THRESHOLD).nonzero()[0]] = 0.0  # one more dead code
            if disagree == "same count":  # codes 1 and 4 dead, or 2 and 3: same count and sum
                cs.fill_(2 * THRESHOLD)[[[1, 4], [2, 3]][rank]] = 0.0
            if rank == 1 and disagree == "dtype":
                cs, es = cs.double(), es.double()
            try:
                reset_dead_codes_(ema_codebook(cs, es), cs, es, z, THRESHOLD, broadcast=True)
            except ValueError as e:
                errors.append(str(e))
        results["errors"] = errors
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    ranks = run_rank_script(__file__, tmp_path, WORLD)
    data = _data()

    # Every rank holds the same statistics, bit for bit ...
    for key in ("ema-False", "ema-True", "kmeans", "kmeans++", "reset", "reset-from-rank-1"):
        for a, b in zip(ranks[0][key], ranks[1][key], strict=True):
            assert torch.equal(a, b), key
    # ... equal to one process on the concatenated batch, up to float32 rounding.
    for det in (False, True):
        cs, es = data["cluster_size"].clone(), data["embed_sum"].clone()
        ema_update_(cs, es, data["z"], data["indices"], 0.9, weight=data["weight"],
                    deterministic=det)  # fmt: skip
        torch.testing.assert_close(ranks[0][f"ema-{det}"], (cs, es), rtol=1e-6, atol=1e-6)
    centroids, inertia = kmeans(
        data["x"], CLUSTERS, iters=4, init=data["init"], return_inertia=True
    )
    torch.testing.assert_close(ranks[0]["kmeans"], (centroids, inertia), rtol=1e-9, atol=1e-9)
    assert bool((centroids.abs() < 10).all())  # the empty cluster was re-seeded
    assert ranks[0]["kmeans++"].shape == (CLUSTERS, D)

    replaced, codebook, cs, _ = ranks[0]["reset"]
    dead = (ranks[0]["ema-False"][0] < THRESHOLD).nonzero().flatten()
    assert len(dead) > 0 and torch.equal(replaced, dead)
    first_shard = _shard(data["z"], 0)
    assert bool((codebook[dead][:, None] == first_shard[None]).all(-1).any(1).all())
    assert bool((cs[dead] == THRESHOLD).all())
    codebook, cs, _ = ranks[0]["reset-from-rank-1"]
    second_shard = _shard(data["z"], 1)
    assert bool((codebook[dead][:, None] == second_shard[None]).all(-1).any(1).all())
    assert bool((cs[dead] == THRESHOLD).all())
    for r in ranks:
        assert len(r["errors"]) == 3, r["errors"]
        assert all("every rank must hold the same statistics" in e for e in r["errors"])


if __name__ == "__main__":
    torch.multiprocessing.spawn(_worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=WORLD)
