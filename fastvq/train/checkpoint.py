"""Checkpoints written atomically and resumed exactly, and the trained tokenizer read back.

save_atomic writes a temporary file in the target's directory, fsyncs it, then os.replace()s it
over the target: the rename is atomic on POSIX filesystems, so a crash at any moment leaves
either the old complete file or the new complete file under the name, never a torn one.
"""

import copy
import os
import pickle
import random
import secrets
import zipfile
from pathlib import Path

import numpy as np
import torch


def save_atomic(obj, path) -> Path:
    """torch.save(obj) to `path` atomically (temp file in the same directory, fsync, os.replace).

    On any exception the temporary file is removed and `path` keeps its previous contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0666 less the umask, as every other file the run writes (so a teammate can evaluate
    # or tokenize from a shared run), where mkstemp's are 0600; the kernel applies the umask,
    # which reading it (os.umask sets it) from Python could not do without a race.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    """Read a checkpoint written by save_atomic; FileNotFoundError names the path, ValueError
    a file that is not a readable checkpoint (the archive's CRCs are checked: torch.load does
    not, and loads flipped bytes as changed weights)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if zipfile.is_zipfile(path):  # else torch.load names what it is not
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"checkpoint {str(path)!r} could not be read: {e}") from e
        if bad is not None:
            raise ValueError(f"checkpoint {str(path)!r} is corrupt: its entry {bad} fails the CRC")
    # weights_only=False: checkpoints hold RNG states (numpy arrays, python tuples) and the
    # config; only load checkpoints you wrote or trust.
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    # A text file (config.yaml given as the checkpoint), a truncated or corrupt archive, a
    # map_location this machine lacks
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r} could not be read: {e}") from e


def trained_config(state, path, overrides=(), hint: str = "") -> dict:
    """The validated config a checkpoint `state` (read from `path`) was trained with, after
    "a.b=value" overrides; `hint` ends the error for a checkpoint without one."""
    from fastvq.train.config import apply_override, validate

    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(
            f"checkpoint {str(path)!r} holds no config (not written by fastvq train?){hint}"
        )
    cfg = copy.deepcopy(state["config"])
    for o in overrides:
        apply_override(cfg, o)
    return validate(cfg)


def tokenizer_config(state, path, overrides=()) -> dict:
    """trained_config, for a checkpoint whose quantizer was trained (tokenize, load_tokenizer)."""
    cfg = trained_config(state, path, overrides)
    if not cfg["train"]["vq"]:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with train.vq=false (an autoencoder without "
            "its quantizer): its codebook is untrained, its tokens would mean nothing"
        )
    return cfg


def load_weights(
    model, path, *, strict: bool = True, ema: bool = True, name="checkpoint", state=None
) -> None:
    """Load `model`'s weights from a trainer checkpoint (its EMA copy when it has one and `ema`)
    or a plain state_dict. strict refuses weights the model lacks as well as missing ones (else
    a deeper quantizer's checkpoint is used without its extra layers); unless strict (a
    pretrained autoencoder as init.checkpoint), quantizer weights may be missing or differ in
    shape, and are then left as they are. `name` is the setting named in errors; `state` is
    the checkpoint when already read from `path`."""
    if state is None:
        if not Path(path).exists():
            raise FileNotFoundError(f"{name} {str(path)!r} does not exist")
        state = load(path)
    if isinstance(state, dict) and "model" in state:
        state = (ema and state.get("ema")) or state["model"]
    if not isinstance(state, dict):
        raise ValueError(
            f"{name} {str(path)!r} holds a {type(state).__name__}, not a trainer checkpoint or "
            "a state_dict"
        )
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in keep and (strict or not k.startswith("quantizer."))]
    if strict:
        # What the model's own load hooks accept is not extra (LatentQuantize's fixed values,
        # which older checkpoints hold): a load of those keys alone, which changes no weight.
        extra = {k: state[k] for k in state if k not in own}
        missing += model.load_state_dict(extra, strict=False).unexpected_keys if extra else []
    if missing:
        raise ValueError(
            f"{name} {str(path)!r} lacks {len(missing)} weights of this model, holds them "
            f"in other shapes or holds others, e.g. {missing[:3]}: was it trained with the "
            "same model section?"
        )
    model.load_state_dict(keep, strict=False)


def load_tokenizer(path, *, ema: bool = True, map_location="cpu"):
    """The tokenizer a `fastvq train` checkpoint holds, in eval mode, for encode() and
    decode_indices(): built from the checkpoint's model section, with its EMA weights (the ones
    `fastvq eval` reports) unless ema=False or the run kept none. It computes in float32; `fastvq
    tokenize` encodes a run trained with train.bf16 under bf16 autocast, as it trained, so some
    of its tokens can differ from this encode() unless it runs under the same autocast."""
    from fastvq.models import build_tokenizer

    state = load(path)
    model = build_tokenizer(tokenizer_config(state, path)["model"])
    load_weights(model, path, ema=ema, state=state)
    return model.to(map_location).eval()


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
