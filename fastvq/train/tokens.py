"""Token files: a split's images encoded by a trained tokenizer (`fastvq tokenize`), the data a
generative model is trained on next.

One .npy file holds the whole split: row i is the index grid (h, w[, G][, Q]) of image i, in
the smallest integer type that holds the codebooks' indices. It is written through a memory
map, so a split larger than host memory streams to disk, and under torchrun every rank writes
the rows of its own shard into the same file.
"""

import os
from pathlib import Path

import numpy as np
import torch

from fastvq.train.data import eval_loader


def index_dtype(codebook_sizes) -> np.dtype:
    """The smallest of uint16, int32 and int64 that holds every index below the codebook sizes
    (int64 when they are unknown: None)."""
    if not codebook_sizes:
        return np.dtype(np.int64)
    top = max(codebook_sizes) - 1
    for t in (np.uint16, np.int32):
        if top <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def _sum_over_ranks(n: int, world: int, device: torch.device) -> int:
    if world == 1:
        return n
    import torch.distributed as dist

    t = torch.tensor(n, device=device)
    dist.all_reduce(t)
    return int(t)


@torch.no_grad()
def write_tokens(
    model,
    dataset,
    path,
    *,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    flip: bool = False,
) -> tuple[int, ...]:
    """Encode every item of `dataset` with `model` (a Tokenizer, in eval mode, on `device`) and
    write the index grids to the .npy file `path`; returns its shape. flip: row i holds two
    grids, image i's and its mirror image's (LlamaGen's flip augmentation of the tokens).

    The file appears complete or not at all: it is written as `path`.partial, renamed once every
    row is in, and removed when this process fails (a rank that dies under torchrun leaves rank
    0 waiting: torchrun ends it, and the .partial file stays)."""
    if model.training:  # a training forward would move the codebook (EMA, dead codes) as it goes
        raise ValueError("write_tokens needs the model in eval mode: call model.eval() first")
    n = len(dataset)
    if n == 0:
        raise ValueError("the split to tokenize holds no images")
    path = Path(path)
    # Before the encoding, which on a large split takes hours: its file must be writable.
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"the tokens' folder {str(path.parent)!r} is a file")
    if path.is_dir():
        raise ValueError(f"the tokens file {str(path)!r} is a folder")
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def encode(x):
        x = x.to(device, non_blocking=True)
        with autocast:
            if not flip:
                return model.encode(x)[1]
            return torch.stack([model.encode(x)[1], model.encode(x.flip(-1))[1]], dim=1)

    item = tuple(encode(dataset[0][None]).shape[1:])
    sizes = model.codebook_sizes
    dtype = index_dtype(sizes)
    partial = path.with_name(path.name + ".partial")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(partial, "w+", dtype, (n, *item)).flush()
    _sum_over_ranks(0, world, device)  # a barrier: the other ranks open the file rank 0 made
    try:
        out = np.lib.format.open_memmap(partial, "r+")
        pin = device.type == "cuda"
        done = 0  # this rank's shard is rows rank, rank + world, ... in eval_loader's order
        for x in eval_loader(dataset, batch_size, rank, world, num_workers, pin_memory=pin):
            idx = encode(x).cpu().numpy()
            # An index the dtype cannot hold would be written wrapped around, silently.
            if sizes and (idx.min() < 0 or idx.max() >= max(sizes)):
                raise ValueError(
                    f"the tokenizer returned indices outside [0, {max(sizes)}): "
                    f"{idx.min()} ... {idx.max()}"
                )
            out[rank + world * np.arange(done, done + len(idx))] = idx
            done += len(idx)
        out.flush()
        del out
        total = _sum_over_ranks(done, world, device)
        if rank == 0:
            if total != n:  # not expected: eval_loader's shards cover the split
                raise RuntimeError(f"wrote {total} of {n} rows of {str(path)!r}")
            os.replace(partial, path)
    except BaseException:
        if rank == 0:  # a split of 1.28 M images leaves no gigabytes of rows behind
            partial.unlink(missing_ok=True)
        raise
    _sum_over_ranks(0, world, device)  # no rank returns before the file is in place
    return (n, *item)
