"""Checkpoints written atomically and resumed exactly.

save_atomic writes a temporary file in the target's directory, fsyncs it, then os.replace()s it
over the target: the rename is atomic on POSIX filesystems, so a crash at any moment leaves
either the old complete file or the new complete file under the name, never a torn one.
"""

import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def save_atomic(obj, path) -> Path:
    """torch.save(obj) to `path` atomically (temp file in the same directory, fsync, os.replace).

    On any exception the temporary file is removed and `path` keeps its previous contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself lives in the directory entry: fsync the directory so it survives a
    # power loss too (best effort: some filesystems refuse to open directories).
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def load(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save_atomic; FileNotFoundError names the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    # weights_only=False: checkpoints hold RNG states (numpy arrays, python tuples) and the
    # config; only load checkpoints you wrote or trust.
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError) as e:  # e.g. config.yaml given as the checkpoint
        raise ValueError(f"checkpoint {str(path)!r} is not a torch checkpoint: {e}") from e


def rng_state() -> dict:
    """Every random generator a training step touches: python, numpy, torch CPU and CUDA."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:  # a different GPU count: each process restores the state of its own device index
            torch.cuda.set_rng_state(cuda[torch.cuda.current_device() % len(cuda)].cpu())
