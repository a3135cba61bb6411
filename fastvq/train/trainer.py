"""The tokenizer trainer: one loop for VQ-VAE, VQGAN, collapse pretraining and MQVAE recipes.

Trainer(cfg).fit() trains for cfg["train"]["steps"] optimizer steps and returns the final
evaluation. Per step: accum_steps micro-batches of the generator loss (bf16 autocast optional;
EMA codebooks take one update over all of them, fastvq.nn.defer_codebook_updates), gradient
clipping, AdamW, warmup + cosine schedule, then a discriminator step when the config has
a discriminator and the step has reached loss.disc_start, then the EMA weights. Checkpoints hold
everything a step depends on, so a resumed run continues the same loss curve exactly.

Under torchrun (WORLD_SIZE > 1) the model runs in DistributedDataParallel, each rank reads its
own shard of the data stream, codebook statistics are all-reduced by the quantizers' own sync
option and evaluation sums are all-reduced; rank 0 writes logs and checkpoints.
A script that builds its own Trainers under torchrun ends with leave_process_group(), as
`fastvq train` does.
"""

import contextlib
import copy
import csv
import gc
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from fastvq.nn import defer_codebook_updates
from fastvq.ops._validate import NonFiniteError
from fastvq.train import checkpoint as ckpt
from fastvq.train.config import PATHS, changed_keys, dump_config
from fastvq.train.data import build_datasets, check_resolution, eval_loader, train_loader
from fastvq.train.metrics import (
    CodeCounts,
    Evaluator,
    check_feature_fn,
    load_feature_fn,
    to_8bit,
)
from fastvq.train.visuals import save_grid, save_usage_histogram

if torch.distributed.is_available() and not torch.distributed.is_initialized():
    # Imported before any process group exists: it binds group.WORLD into ten functions' default
    # arguments when first imported (DDP's constructor imports it), and bound to a live group
    # they keep it, and gloo's threads, past destroy_process_group (see leave_process_group).
    import torch.distributed.nn.functional  # noqa: F401


class NonFiniteLossError(RuntimeError):
    """The NaN guard stopped training without writing a checkpoint: the loss, a gradient norm or
    the quantizer's input was NaN or Inf. The loss and the gradient norms are the same on every
    rank, so all ranks stop together; the quantizer's input is this rank's, so only this rank
    stops and torchrun ends the others (they wait at the next collective)."""


# What a resumed run takes from its config, not from the checkpoint, that changes what the saved
# run would have done next. optim settings and train.steps are meant to take effect on resume (a
# new schedule); logging, paths (data moved, LPIPS files), devices and workers change no result,
# nor do meta settings while meta-quantization is off.
RESUME_SECTIONS = ("model", "data", "loss", "disc", "meta")
RESUME_TRAIN_KEYS = ("seed", "batch_size", "vq", "ema_decay", "bf16", "overfit_one_batch")
RESUME_QUIET = PATHS | {"loss.lpips"}


def _resume_changes(saved: dict, cfg: dict) -> list[str]:
    """RESUME_SECTIONS' and RESUME_TRAIN_KEYS' changes from a checkpoint's config, less
    RESUME_QUIET (none saved: nothing to compare)."""
    if not saved:
        return []

    def section(c, sec):
        return {k: v for k, v in (c.get(sec) or {}).items() if f"{sec}.{k}" not in RESUME_QUIET}

    meta = any((c.get("meta") or {}).get("enabled") for c in (saved, cfg))
    sections = [sec for sec in RESUME_SECTIONS if sec != "meta" or meta]
    changed = [
        k for sec in sections for k in changed_keys(section(saved, sec), section(cfg, sec), sec)
    ]
    keys = [k for k in RESUME_TRAIN_KEYS if k in (saved.get("train") or {})]
    old, new = ({k: c["train"][k] for k in keys} for c in (saved, cfg))
    return changed + changed_keys(old, new, "train")


def pick_device(name: str) -> torch.device:
    """ "auto" -> this rank's GPU when CUDA is available, else CPU; anything else as given."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(
                f"train.device must be 'auto' or a torch device, got {name!r}"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r}, but torch sees no CUDA device here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def join_process_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; with several processes, starts the
    process group (NCCL on CUDA, gloo else) unless the caller already has."""
    import torch.distributed as dist

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def leave_process_group() -> None:
    """Ends the default process group once every rank is done with it, its backend's threads
    stopped before this returns. Call it after the last reference to the group's users (a
    Trainer, its DistributedDataParallel model) is dropped, before the interpreter exits.

    A gloo worker thread frees a finished collective's tensors after the caller has gone on (a
    barrier keeps the collectives before it until it is freed). Freeing a tensor Python knows
    takes the GIL, and a thread that asks for the GIL once the interpreter is exiting is ended
    by pthread_exit, which C++ turns into std::terminate: now and then a finished run aborted
    at exit (SIGABRT, "terminate called without an active exception"). The group's destructor
    joins those threads; it runs here, while the interpreter is whole, if nothing else holds
    the group. (A script that starts the group itself imports this module first: see the
    import of torch.distributed.nn.functional above.)
    """
    import torch.distributed as dist

    dist.barrier()  # no rank closes its connections while another finishes a collective
    dist.destroy_process_group()
    gc.collect()  # users of the group caught in reference cycles


def resolve_num_workers(setting, device: torch.device) -> int:
    """train.num_workers: an int as given; "auto" is 0 on CPU (the tests' and the demo's small
    images load faster in the main process than workers start) and on CUDA min(8, cores per
    local process), so that decoding and cropping images never leaves the GPU waiting on the
    main process."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(8, (os.cpu_count() or 1) // local)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at `step`: linear warmup from 1/warmup to 1 over
    `warmup` steps, then constant or cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _unwrap(model):
    return getattr(model, "module", model)


def _param_groups(params, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and convolution kernels only: decaying norms' scales and biases
    pulls them to 0, which no recipe we follow intends. params: a module or an iterable."""
    decay, rest = [], []
    for p in params.parameters() if isinstance(params, torch.nn.Module) else params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _without_lpips(state: dict) -> dict:
    """A loss module's state without LPIPS: its frozen weights come from the files loss.lpips
    names (14.7 M VGG-16 weights, 59 MB in every checkpoint otherwise), so they never travel."""
    return {k: v for k, v in state.items() if not k.startswith("lpips.")}


def _load_schedule(opt, sched, opt_state: dict, sched_state: dict) -> None:
    """Resume an optimizer and its LambdaLR: moments and step counts from the checkpoint, the
    settings (optim.lr, betas, weight decay) and the schedule's shape (train.steps) from this
    run's config, so a run resumed with more steps follows the new schedule from its first step
    instead of the old one's last learning rate (0 at the end of a cosine). An unchanged config
    gives the checkpoint's values exactly."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    for group, own, fn in zip(opt.param_groups, settings, sched.lr_lambdas, strict=True):
        group.update(own)
        group["lr"] = own["initial_lr"] * fn(sched.last_epoch)
    sched.base_lrs = [own["initial_lr"] for own in settings]
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    # optim.amsgrad turned on at resume: AdamW's step would fail on the missing running maximum
    # (KeyError 'max_exp_avg_sq'); it starts from the second moments so far.
    for group in opt.param_groups:
        for p in group["params"] if group.get("amsgrad") else ():
            state = opt.state.get(p)
            if state and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()


class Progress:
    """One rewritten stderr line (live loss, usage, throughput) on a terminal; plain log lines
    every log_every steps otherwise (CI logs, files)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, step: int, fields: dict, force: bool = False) -> None:
        if not self.enabled or not (self.tty or force):
            return
        text = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
        )
        line = f"step {step}/{self.total} {text}"
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class Trainer:
    """Train a tokenizer from a validated config (fastvq.train.config.load_config).

    Args:
        cfg: the config dict.
        model: a Tokenizer to train instead of build_tokenizer(cfg["model"]) (tests, notebooks).
        datasets: (train, eval) datasets instead of build_datasets(cfg["data"]).
    """

    CSV_FIELDS = (
        "step", "lr", "loss", "recon", "quant", "perceptual", "g_loss", "d_loss", "disc_weight",
        "grad_norm", "usage", "perplexity", "images_per_s", "eval_psnr", "eval_ssim",
        "eval_usage", "eval_perplexity",
    )  # fmt: skip

    def __init__(self, cfg: dict, model=None, datasets=None):
        self.cfg = cfg
        t, o = cfg["train"], cfg["optim"]
        self.device = pick_device(t["device"])
        self.rank, self.world = join_process_group(self.device)
        self.out_dir = Path(t["out_dir"])
        self.ckpt_dir = self.out_dir / "checkpoints"
        for key in ("in_channels", "out_channels"):
            # Every dataset yields RGB images: other widths fail in the first convolution or,
            # for out_channels, broadcast in the loss and fail at the first evaluation.
            channels = (cfg["model"] or {}).get(key)
            if channels is not None and channels != 3:
                raise ValueError(
                    f"model.{key} must be 3 (the datasets yield RGB images), got {channels!r}"
                )

        # Same seed on every rank for the weights (DDP also broadcasts rank 0's at wrap time).
        torch.manual_seed(t["seed"])
        if model is None:
            from fastvq.models import build_tokenizer

            # Built after init_process_group: quantizers with vector-quantize-pytorch's
            # sync_codebook=None default then all-reduce their codebook statistics by themselves.
            model = build_tokenizer(cfg["model"])
        self.model = model.to(self.device)
        check_resolution(model, cfg["data"]["resolution"])
        if cfg["init"]["checkpoint"]:
            path = cfg["init"]["checkpoint"]
            ckpt.load_weights(self.model, path, strict=False, name="init.checkpoint")
        from fastvq.models.lpips import LPIPS

        res = cfg["data"]["resolution"]
        if cfg["loss"]["perceptual_weight"] > 0 and res < LPIPS.min_size:  # before loading it
            raise ValueError(
                f"LPIPS (loss.perceptual_weight > 0) needs images of at least {LPIPS.min_size} "
                f"px, got data.resolution={res}"
            )
        self.loss_fn = self._build_loss()
        if cfg["eval"]["fid_features"]:  # loaded at each evaluation: else missed until the first
            check_feature_fn(cfg["eval"]["fid_features"], self.device, cfg["data"]["resolution"])
        self.disc = self.loss_fn.discriminator if self.loss_fn.uses_disc else None
        if self.disc is not None and res < getattr(self.disc, "min_size", 0):
            raise ValueError(
                f"the discriminator (disc.n_layers={self.disc.n_layers}) needs "
                f"images of at least {self.disc.min_size} px, got data.resolution={res}: lower "
                "disc.n_layers or raise data.resolution"
            )
        # Accepted (a short trial of a long recipe), but never without a word: the schedule
        # would end before it starts.
        if t["steps"] and o["warmup_steps"] > t["steps"]:
            warnings.warn(
                f"optim.warmup_steps={o['warmup_steps']} > train.steps={t['steps']}: the "
                "learning rate never reaches optim.lr",
                stacklevel=2,
            )
        if t["steps"] and self.disc is not None and cfg["loss"]["disc_start"] >= t["steps"]:
            warnings.warn(
                f"loss.disc_start={cfg['loss']['disc_start']} >= train.steps={t['steps']}: the "
                "discriminator never trains and loss.disc_weight has no effect",
                stacklevel=2,
            )
        self.ema = None
        if t["ema_decay"] > 0:
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()

        self.meta_opt = self.meta_sched = None
        lower = self.model
        if cfg["meta"]["enabled"]:
            # MQVAE: the quantizer (hyper-net codebook) is the upper level with its own optimizer,
            # stepped by the hypergradient; the main optimizer sees the encoder-decoder only.
            from fastvq.train.meta import split_parameters

            lower, upper = split_parameters(self.model)
            if not upper:
                raise ValueError(
                    f"meta.enabled needs a quantizer with trainable parameters (the upper level), "
                    f"e.g. HyperCodebook; {type(self.model.quantizer).__name__} has none here"
                )
            # weight_decay=0 explicitly (AdamW's default is 0.01): MQVAE applies no weight decay
            # to the quantizer, whatever optim.weight_decay gives the encoder-decoder.
            self.meta_opt = torch.optim.AdamW(
                upper, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=0.0, amsgrad=o["amsgrad"]
            )
            self.meta_sched = torch.optim.lr_scheduler.LambdaLR(self.meta_opt, self._lr_lambda)
        self.opt = torch.optim.AdamW(
            _param_groups(lower, o["weight_decay"]),
            lr=o["lr"],
            betas=tuple(o["betas"]),
            amsgrad=o["amsgrad"],
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_lambda)
        self.disc_opt = self.disc_sched = None
        if self.disc is not None:
            self.disc_opt = torch.optim.AdamW(
                _param_groups(self.disc, o["weight_decay"]),
                lr=o["disc_lr"] or o["lr"],
                betas=tuple(o["betas"]),
                amsgrad=o["amsgrad"],
            )
            self.disc_sched = torch.optim.lr_scheduler.LambdaLR(self.disc_opt, self._disc_lr_lambda)
        if datasets is None:
            datasets = build_datasets(cfg["data"])
        self.train_set, self.eval_set = datasets
        if self.eval_set is not None and len(self.eval_set) == 0:  # else found after training
            raise ValueError(f"the evaluation split of data.path={cfg['data']['path']!r} is empty")
        e = cfg["eval"]
        if e["fid_features"] and self.eval_set is not None:  # else it fails after training
            images = len(self.eval_set)
            if e["max_batches"]:
                images = min(images, e["max_batches"] * e["batch_size"])
            if images < 2:
                raise ValueError(
                    f"eval.fid_features: rFID needs at least 2 evaluation images (a covariance), "
                    f"the evaluation has {images}"
                )
        self.step = 0
        self.items = 0  # training items this rank consumed: the data stream's resume position
        self.history: list[float] = []  # per-step loss on this rank
        # Codes chosen since the last log line: the live usage / perplexity of the progress bar.
        self.window_codes = CodeCounts(self.codebook_sizes or (1,), self.device)
        self.fixed_batch = None
        torch.manual_seed(t["seed"] * 7919 + self.rank)  # per-rank stream for dropout, resets

        latest = self.ckpt_dir / "latest.pt"
        if t["resume"] and latest.is_file():
            self.load_state(latest)
            if self.step > t["steps"]:  # would report that run's evaluation as this one's
                raise ValueError(
                    f"train.steps={t['steps']}, but {str(latest)!r} is at step {self.step}: "
                    "raise train.steps to continue it, or start over in another train.out_dir "
                    "(or with train.resume=false)"
                )
        if cfg["init"]["kmeans"] and self.step == 0 and t["vq"]:
            self.kmeans_init()

        self.forward_model = self.model
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Without VQ the quantizer's parameters get no gradient, nor do those of the layers
            # quantize dropout skips (learnable residual codebooks, SimVQ maps): DDP must look
            # for them, else its next step fails ("Expected to have finished reduction").
            unused = t["find_unused_parameters"]
            if unused is None:
                drops = any(getattr(m, "quantize_dropout", False) for m in self.model.modules())
                unused = not t["vq"] or drops
            self.ddp = DDP(self.model, device_ids=ids, find_unused_parameters=unused)
            self.forward_model = self.ddp
        if t["compile"]:
            self.forward_model = torch.compile(self.forward_model)

    # ----------------------------------------------------------------------------- building

    def _lr_lambda(self, step: int) -> float:
        o = self.cfg["optim"]
        return lr_factor(
            step, self.cfg["train"]["steps"], o["warmup_steps"], o["schedule"], o["min_lr_ratio"]
        )

    def _disc_lr_lambda(self, disc_step: int) -> float:
        # The discriminator steps from loss.disc_start on: its warmup starts there (a fresh
        # discriminator), and its decay spans the steps it takes, reaching min_lr_ratio at the end.
        o, t = self.cfg["optim"], self.cfg["train"]
        total = t["steps"] - self.cfg["loss"]["disc_start"]
        return lr_factor(disc_step, total, o["warmup_steps"], o["schedule"], o["min_lr_ratio"])

    def _build_loss(self):
        """fastvq.train.losses.VQGANLoss from the loss and disc sections: reconstruction,
        quantizer, optional LPIPS and GAN terms; it holds the discriminator."""
        from fastvq.train.losses import build_loss

        in_channels = self.cfg["model"].get("in_channels", 3)
        loss = build_loss(self.cfg["loss"], self.cfg["disc"], in_channels, self.world > 1)
        return loss.to(self.device)

    @property
    def codebook_size(self) -> int | None:
        return getattr(_unwrap(self.model).quantizer, "codebook_size", None)

    @property
    def codebook_sizes(self) -> tuple[int, ...] | None:
        return _unwrap(self.model).codebook_sizes

    @torch.no_grad()
    def kmeans_init(self) -> None:
        """Initialise the codebook by k-means on the encoder's outputs (SoundStream's init, run
        on a pretrained encoder in the representation-collapse recipe)."""
        import fastvq

        ic = self.cfg["init"]
        model = _unwrap(self.model)
        q = model.quantizer
        # Checked before the k-means runs: a fixed (LeechQuantize) or generated (SimVQ) codebook
        # is a read-only property; a ResidualVQ initialises its layers through init_from.
        prop = getattr(type(q), "codebook", None)
        settable = not (isinstance(prop, property) and prop.fset is None)
        if not hasattr(q, "init_from") and (getattr(q, "codebook", None) is None or not settable):
            raise ValueError(
                f"init.kmeans: {type(q).__name__} has no learnable codebook to initialise; "
                "set init.kmeans=false"
            )
        was = model.training
        # The latents are taken in train mode, as the training forwards that follow see them:
        # in eval mode BatchNorm uses its running statistics, which for an untrained encoder
        # (the collapse baseline) are the initial 0 / 1, and the rotated VQ-VAE's latents came
        # out ~9x smaller in norm than in training (0.47 vs 4.3 at init), so every code sat far
        # from the latents it was meant for. The running statistics are put back afterwards.
        saved = [b.clone() for b in model.buffers()]
        model.train()
        # Each rank encodes its own shard, as in training: the k-means (synced over the ranks)
        # then clusters world x kmeans_batches batches once each, and init_from leaves in the EMA
        # statistics their counts divided by kmeans_batches, those of one training step at batch
        # world x B (identical batches on every rank made them world times too large).
        t = self.cfg["train"]
        loader = train_loader(self.train_set, t["batch_size"], 12345, 0, self.rank, self.world)
        zs, it = [], iter(loader)
        for _ in range(ic["kmeans_batches"]):
            z = model.latents(next(it).to(self.device))
            zs.append(z.flatten(2).transpose(1, 2).reshape(-1, z.shape[1]).float())
        for b, value in zip(model.buffers(), saved, strict=True):
            b.copy_(value)
        model.eval()
        z = torch.cat(zs)
        k = self.codebook_size
        repeats = -(-k // len(z))
        if repeats > 1:  # more codes than latent vectors: repeat rows (k-means then re-seeds)
            z = z.repeat(repeats, 1)
        g = torch.Generator(device=z.device).manual_seed(self.cfg["train"]["seed"])
        if hasattr(q, "init_from"):  # fastvq.nn.VectorQuantize: also sets its EMA statistics
            q.init_from(
                z, iters=ic["kmeans_iters"], generator=g, batches=ic["kmeans_batches"] * repeats
            )
        else:
            centroids = fastvq.kmeans(
                z, k, iters=ic["kmeans_iters"], generator=g, all_reduce=self.world > 1
            )
            q.codebook = centroids.to(q.codebook.dtype)
        if self.world > 1:
            # A quantizer built with sync_codebook=False clustered its own shard only: rank 0's
            # codebook everywhere before the EMA copy below (DDP syncs the model, not the copy).
            import torch.distributed as dist

            for value in q.state_dict().values():
                dist.broadcast(value, 0)
        if self.ema is not None:  # the weights' EMA starts from the fitted codebook
            self.ema.load_state_dict(_unwrap(self.model).state_dict())
        model.train(was)

    # -------------------------------------------------------------------------- state dicts

    def state_dict(self) -> dict:
        import torch.distributed as dist

        # Every rank's generators and overfit_one_batch batch: each resumes its own.
        fixed = self.fixed_batch.cpu() if self.fixed_batch is not None else None
        ranks = [(ckpt.rng_state(), fixed)]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, (ckpt.rng_state(), fixed))
        return {
            "model": _unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "disc_opt": self.disc_opt.state_dict() if self.disc_opt is not None else None,
            "disc_sched": self.disc_sched.state_dict() if self.disc_sched is not None else None,
            "loss": _without_lpips(self.loss_fn.state_dict()) if self.loss_fn is not None else None,
            "meta_opt": self.meta_opt.state_dict() if self.meta_opt is not None else None,
            "meta_sched": self.meta_sched.state_dict() if self.meta_sched is not None else None,
            "step": self.step,
            "items": self.items,
            "history": list(self.history),
            # The codes chosen since the last log line (rank 0's, the one that logs).
            "window_counts": (
                self.window_codes.counts.cpu() if self.window_codes.counts is not None else None
            ),
            "fixed_batch": [batch for _, batch in ranks],
            "rng": [rng for rng, _ in ranks],
            "world": self.world,
            "config": self.cfg,
        }

    def load_state(self, path) -> None:
        """Resume from a checkpoint written by save(): every weight, optimizer, schedule, step,
        data position and random generator."""
        s = ckpt.load(path, map_location=self.device)
        try:
            _unwrap(self.model).load_state_dict(s["model"])
            # The discriminator's weights and LeCAM's averages travel inside the loss module's
            # state; LPIPS never does (older checkpoints that hold it: ignored).
            if s.get("loss") is not None:
                own = self.loss_fn.state_dict()
                keys = _without_lpips(own).keys()
                state = _without_lpips(s["loss"])
                if state.keys() != keys:
                    raise RuntimeError(f"loss state keys differ: {sorted(state.keys() ^ keys)}")
                self.loss_fn.load_state_dict({**own, **state})
        except RuntimeError as e:  # torch lists every tensor; say which setting changed
            old = s.get("config") or {}
            changed = [
                k
                for sec in ("model", "disc", "loss")
                for k in changed_keys(old.get(sec), self.cfg[sec], sec)
            ]
            raise ValueError(
                f"checkpoint {str(path)!r} holds other weights than this run builds (changed: "
                f"{', '.join(changed) or 'unknown'}): resume with the settings it was written "
                "with, or start over in another train.out_dir (or with train.resume=false)"
            ) from e
        changed = _resume_changes(s.get("config") or {}, self.cfg)
        if changed and self.rank == 0:  # weights that still fit (FSQ levels reordered), new data
            warnings.warn(
                f"resuming {str(path)!r} with settings other than those it was trained with "
                f"({', '.join(changed)}); training goes on with them, so it no longer continues "
                "the saved run exactly",
                stacklevel=2,
            )
        if self.ema is not None and s["ema"] is not None:
            self.ema.load_state_dict(s["ema"])
        elif self.ema is not None:  # EMA turned on at resume: it starts from the resumed weights
            self.ema.load_state_dict(_unwrap(self.model).state_dict())
        for name in ("opt", "disc_opt", "meta_opt"):
            opt, sched = getattr(self, name), getattr(self, name.replace("opt", "sched"))
            if opt is not None and s.get(name) is not None:
                try:
                    _load_schedule(opt, sched, s[name], s[name.replace("opt", "sched")])
                except ValueError as e:  # torch's "doesn't match the size of optimizer's group"
                    # e.g. an MQVAE run written before HyperCodebook's projections moved from
                    # the meta optimizer to the encoder-decoder's: same weights, other groups.
                    raise ValueError(
                        f"checkpoint {str(path)!r}: its {name} optimizer holds other parameters "
                        f"than this run's ({e}): start a new run from its weights with "
                        f"init.checkpoint={str(path)!r} in another train.out_dir"
                    ) from e
        self.step, self.items = s["step"], s["items"]
        self.history = list(s["history"])
        counts = s.get("window_counts")
        if counts is not None and counts.dim() == 2:  # older checkpoints: restart the window
            self.window_codes.counts = counts.to(self.device)
        if s["world"] != self.world:
            raise ValueError(
                f"checkpoint {str(path)!r} was written by {s['world']} processes, this run has "
                f"{self.world}: the data stream and generators would not continue exactly"
            )
        fb = s.get("fixed_batch")
        fb = fb[self.rank] if isinstance(fb, list) else fb  # older checkpoints: rank 0's only
        self.fixed_batch = fb.to(self.device) if fb is not None else None
        ckpt.set_rng_state(s["rng"][self.rank])

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's buffers. DDP does so at the start of each forward, so after
        the last one BatchNorm statistics differ across ranks (and the discriminator, outside DDP,
        never gets them): evaluation and checkpoints then start from one consistent model."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for module in (_unwrap(self.model), self.ema, self.disc):
            if module is not None:
                for b in module.buffers():
                    dist.broadcast(b, 0)

    def save(self, name: str = "latest.pt") -> Path | None:
        """Write a checkpoint atomically (rank 0; every rank joins the RNG gather)."""
        self._broadcast_buffers()
        state = self.state_dict()
        if self.rank != 0:
            return None
        return ckpt.save_atomic(state, self.ckpt_dir / name)

    # ------------------------------------------------------------------------------ training

    def _generator_loss(self, x, out, step: int) -> tuple[torch.Tensor, dict]:
        last = _unwrap(self.model).last_layer
        loss, logs = self.loss_fn.generator_loss(x, out.recon, out.quant_loss, step, last)
        renamed = {"rec": "recon", "lpips": "perceptual", "d_weight": "disc_weight"}
        return loss, {renamed.get(k, k): v for k, v in logs.items() if k != "total"}

    def _disc_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg["loss"]["disc_start"]

    def _batches(self):
        t = self.cfg["train"]
        loader = train_loader(
            self.train_set,
            t["batch_size"],
            t["seed"],
            self.items,
            self.rank,
            self.world,
            resolve_num_workers(t["num_workers"], self.device),
            pin_memory=self.device.type == "cuda",  # so that non_blocking copies overlap
        )
        for batch in loader:
            self.items += len(batch)
            yield batch.to(self.device, non_blocking=True)

    def _check_finite(self, loss: torch.Tensor, logs: dict) -> tuple[float, dict]:
        """(loss, logs) as floats. One host sync per micro-batch (microseconds against a step of
        milliseconds) buys a stop before a NaN reaches the weights; across ranks the mean
        decides, so all stop together. The logs' tensors come back in the same sync (one each
        cost one more, after the backward was queued: 3 at a plain VQ-VAE's 2 logs)."""
        loss = loss.detach().float()
        if self.world > 1:
            import torch.distributed as dist

            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= self.world
        names = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
        # float64 holds every float32 / bf16 / fp16 / float64 value exactly, as float() does.
        flat = torch.stack([loss.double(), *(logs[k].detach().double().reshape(()) for k in names)])
        value, *values = flat.tolist()
        got = dict(zip(names, values, strict=True))
        floats = {k: got[k] if k in got else float(v) for k, v in logs.items()}
        if self.cfg["train"]["nan_guard"] and not math.isfinite(value):
            parts = "".join(f", {k}={v:.4g}" for k, v in floats.items())
            raise self._stop(f"loss is {value} at step {self.step}{parts}")
        return value, floats

    def _clip_gradients(self, params, what: str = "the gradient norm") -> float | None:
        """Clip the gradients of `params` to optim.grad_clip; returns their norm before clipping
        (None with neither clipping nor the guard). The guard stops on a non-finite norm before
        the optimizer steps: a finite loss can still have NaN gradients (a bf16 overflow, a sqrt
        at 0 in backward), and clipping by a NaN norm would put NaN in every weight and in the
        next checkpoint. Gradients are already averaged over ranks: all stop together."""
        params = [p for p in params if p.grad is not None]
        clip, guard = self.cfg["optim"]["grad_clip"], self.cfg["train"]["nan_guard"]
        if clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        elif guard:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        else:
            return None
        if guard and not math.isfinite(norm):
            raise self._stop(f"{what} is {norm} at step {self.step}")
        return norm

    def _stop(self, what: str) -> NonFiniteLossError:
        """The NaN guard's error, to raise: what happened, and which checkpoint is left."""
        latest = self.ckpt_dir / "latest.pt"
        kept = (
            f"the last good checkpoint is {latest}"
            if latest.exists()
            else "no checkpoint was written"
        )
        return NonFiniteLossError(
            f"{what}: stopped without saving, {kept}. "
            "Try a lower optim.lr, optim.grad_clip > 0, or train.bf16=false."
        )

    def _forward(self, x):
        try:
            return self.forward_model(x, quantize=self.cfg["train"]["vq"])
        except RuntimeError as e:
            unused = self.cfg["train"]["find_unused_parameters"]
            if "find_unused_parameters" not in str(e) or unused:
                raise
            raise RuntimeError(
                "DDP: some parameters got no gradient in the last step (a quantizer whose loss "
                "weights leave them untrained?); set train.find_unused_parameters=true"
            ) from e
        except NonFiniteError as e:
            # A quantizer refuses NaN or Inf latents before its codebook update, so the loss
            # never gets to be NaN: without this the guard missed every blow-up of the encoder
            # (and the error advised turning the quantizer's check off).
            if not self.cfg["train"]["nan_guard"]:
                raise
            raise self._stop(f"NaN or Inf reached the model's quantizer at step {self.step}") from e

    def train_step(self, batches) -> dict:
        """One optimizer step over accum_steps micro-batches; returns float logs."""
        cfg, t = self.cfg, self.cfg["train"]
        accum = cfg["optim"]["accum_steps"]
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=t["bf16"])
        self.model.train()
        if t["overfit_one_batch"] and self.fixed_batch is None:
            # Taken before the hypergradient step, which else drew a batch of its own first.
            self.fixed_batch = next(batches)
        if self.meta_opt is not None and self.step % cfg["meta"]["codebook_every"] == 0:
            self._meta_step(batches)
        if self.disc is not None:
            # The GAN term's gradient must reach the decoder through the discriminator, but not
            # accumulate into the discriminator's own parameters (its step follows, separately).
            self.disc.requires_grad_(False)
        xs, recons, logs_sum, total = [], [], {}, 0.0
        # The micro-batches update EMA codebooks once, as one batch of them all.
        with defer_codebook_updates(self.model):
            for i in range(accum):
                x = self.fixed_batch if t["overfit_one_batch"] else next(batches)
                # DDP all-reduces the gradients once per step, in the last micro-batch's backward.
                last = self.ddp is None or i == accum - 1
                with contextlib.nullcontext() if last else self.ddp.no_sync():
                    with autocast:
                        out = self._forward(x)
                        loss, logs = self._generator_loss(x, out, self.step)
                    value, logs = self._check_finite(loss, logs)
                    (loss / accum).backward()
                total += value / accum
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + v / accum
                if out.indices is not None and self.codebook_sizes:
                    self.window_codes.update(out.indices)
                xs.append(x)
                recons.append(out.recon.detach())
        # The parameters this optimizer steps: under MQVAE not the hyper-net's, whose gradients
        # here are discarded (the hypergradient step owns them).
        norm = self._clip_gradients([p for group in self.opt.param_groups for p in group["params"]])
        if norm is not None:
            logs_sum["grad_norm"] = norm
        logs_sum["lr"] = self.opt.param_groups[0]["lr"]  # this step's, before the schedule moves
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        if self.meta_opt is not None:
            self.meta_opt.zero_grad(set_to_none=True)  # the lower step's codebook gradients
            self.meta_sched.step()
        if self._disc_active(self.step):
            logs_sum["d_loss"] = self._disc_step(xs, recons, autocast)
        self._update_ema()
        logs_sum["loss"] = total
        return logs_sum

    def _meta_step(self, batches) -> None:
        """MQVAE's upper level: one hypergradient step of the quantizer's (hyper-net) parameters
        on a fresh batch, through one unrolled inner step of the encoder-decoder."""
        from fastvq.train.meta import hypergradient, split_parameters

        m, t = self.cfg["meta"], self.cfg["train"]
        model = _unwrap(self.model)
        lower, upper = split_parameters(model)
        x = self.fixed_batch if self.fixed_batch is not None else next(batches)

        def loss(mixed: bool = True):
            with torch.autocast(self.device.type, torch.bfloat16, enabled=t["bf16"] and mixed):
                out = model(x)
                return self._generator_loss(x, out, self.step)[0]

        # The hypergradient's four passes run in train mode, two at perturbed weights: what they
        # update (EMA codebook, dead-code usage and replacement, k-means state, BatchNorm
        # statistics) is put back, for the lower step's own pass to update once. It restores the
        # lower parameters itself. Buffers are looked up again: a quantizer may assign new ones.
        saved = [p.detach().clone() for p in [*upper, *model.buffers()]]
        try:
            # The finite-difference passes in float32 (hypergradient's fd_loss says why).
            grads, _ = hypergradient(
                lower, upper, loss, None, m["inner_lr"], m["fd_eps"], fd_loss=lambda: loss(False),
                all_reduce=self.world > 1,
            )  # fmt: skip
        finally:
            with torch.no_grad():
                for p, value in zip([*upper, *model.buffers()], saved, strict=True):
                    p.copy_(value)
        for p, g in zip(upper, grads, strict=True):
            p.grad = g.to(p.dtype)
        self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)

    def _disc_step(self, xs, recons, autocast) -> float:
        self.disc.requires_grad_(True)
        self.disc.train()
        accum, total = len(xs), 0.0
        for x, recon in zip(xs, recons, strict=True):
            with autocast:
                d_loss, _ = self.loss_fn.discriminator_loss(
                    x, recon, self.step, micro_batches=accum
                )
            total += self._check_finite(d_loss, {"d_loss": d_loss.detach()})[0] / accum
            (d_loss / accum).backward()
        if self.world > 1:
            # Not wrapped in DDP (the generator pass runs it too): average its gradients here.
            import torch.distributed as dist

            for p in self.disc.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        self._clip_gradients(self.disc.parameters(), "the discriminator's gradient norm")
        self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)
        self.disc_sched.step()
        return total

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.cfg["train"]["ema_decay"]
        model = _unwrap(self.model)
        ema_p = [p for p in self.ema.parameters()]
        live_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, live_p, 1 - decay)
        # Buffers (BatchNorm statistics, EMA codebooks) are already running averages: copy.
        for b_ema, b in zip(self.ema.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def fit(self) -> dict:
        """Train to cfg.train.steps (from the resumed step), evaluating and checkpointing as
        configured; returns {"step", "history", "eval"} with the final evaluation."""
        t = self.cfg["train"]
        main = self.rank == 0
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.out_dir / "config.yaml")
        writer, csv_file, tb = self._open_logs() if main else (None, None, None)
        progress = Progress(t["steps"], t["progress"] and main)
        batches = self._batches()
        images_per_step = t["batch_size"] * self.cfg["optim"]["accum_steps"] * self.world
        tick, tick_step = time.perf_counter(), self.step
        result = {}
        try:
            while self.step < t["steps"]:
                logs = self.train_step(batches)
                self.history.append(logs["loss"])
                self.step += 1
                last = self.step == t["steps"]
                if self.step % t["log_every"] == 0 or last:
                    now = time.perf_counter()
                    logs["images_per_s"] = images_per_step * (self.step - tick_step) / (now - tick)
                    tick, tick_step = now, self.step
                    st = self.window_codes.stats() if self.cfg["train"]["vq"] else {}
                    if st:
                        logs["usage"], logs["perplexity"] = st["usage"], st["perplexity"]
                        self.window_codes.zero_()
                    progress.update(self.step, {
                        k: logs[k] for k in ("loss", "usage", "perplexity", "images_per_s")
                        if k in logs
                    }, force=True)  # fmt: skip
                    self._log(writer, csv_file, tb, logs)
                else:
                    progress.update(self.step, {"loss": logs["loss"]})
                if (t["eval_every"] and self.step % t["eval_every"] == 0) and not last:
                    self._log(writer, csv_file, tb, self._eval_logs(self.evaluate()))
                if (t["ckpt_every"] and self.step % t["ckpt_every"] == 0) or last:
                    self.save()
            progress.close()
            result = self.evaluate()
            self._log(writer, csv_file, tb, self._eval_logs(result))
            if main:
                with open(self.out_dir / "eval.json", "w") as f:
                    json.dump(result, f, indent=2)
        finally:
            if csv_file is not None:
                csv_file.close()
            if tb is not None:
                tb.close()
        return {"step": self.step, "history": list(self.history), "eval": result}

    def _eval_logs(self, r: dict) -> dict:
        out = {"step": self.step, "eval_psnr": r["psnr"], "eval_ssim": r["ssim"]}
        if "usage" in r:
            out.update(eval_usage=r["usage"], eval_perplexity=r["perplexity"])
        return out

    def _open_logs(self):
        path = self.out_dir / "log.csv"
        rows = []
        if path.exists() and self.step > 0:
            # Resumed: keep the rows up to the checkpoint's step; a killed run may have logged
            # past it, and those steps are about to run (and be logged) again.
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]
        csv_file = open(path, "w", newline="")
        writer = csv.DictWriter(csv_file, self.CSV_FIELDS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
        tb = None
        try:  # TensorBoard only when the tensorboard package is installed
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.out_dir / "tb"))
        except ImportError:
            pass
        return writer, csv_file, tb

    def _log(self, writer, csv_file, tb, logs: dict) -> None:
        if writer is None:
            return
        row = {"step": self.step, **logs}
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        csv_file.flush()
        if tb is not None:
            for key, v in logs.items():
                if isinstance(v, int | float) and key != "step":
                    tb.add_scalar(key, v, self.step)

    # ---------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, use_ema: bool = True, save_images: bool = True) -> dict:
        """Metrics over the whole evaluation split (this rank's shard, all-reduced): MSE, PSNR,
        SSIM, code usage / perplexity / entropy from accumulated counts, LPIPS and rFID when
        their weights are given; the image metrics of the reconstructions rounded to 8 bits.
        Saves a reconstruction grid and a usage histogram (rank 0)."""
        cfg, e = self.cfg, self.cfg["eval"]
        self._broadcast_buffers()
        model = self.ema if (use_ema and self.ema is not None) else _unwrap(self.model)
        was = model.training
        model.eval()
        feature_fn = load_feature_fn(e["fid_features"], self.device) if e["fid_features"] else None
        sizes = self.codebook_sizes if cfg["train"]["vq"] else None
        ev = Evaluator(sizes, self.device, feature_fn)
        lpips = getattr(self.loss_fn, "lpips", None)
        lpips_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=cfg["train"]["bf16"])
        shown = []  # (images, reconstructions) of the grid, per batch
        # eval.max_batches counts batches of one process: under torchrun the ranks share those
        # images rather than each taking max_batches batches of its own shard (world times as
        # many images, and other metrics than one process reports).
        items = e["max_batches"] * e["batch_size"]
        workers = resolve_num_workers(cfg["train"]["num_workers"], self.device)
        loader = eval_loader(
            self.eval_set, e["batch_size"], self.rank, self.world, workers, items,
            pin_memory=self.device.type == "cuda",
        )  # fmt: skip
        for x in loader:
            x = x.to(self.device, non_blocking=True)
            with autocast:
                out = model(x, quantize=cfg["train"]["vq"])
            recon = to_8bit(out.recon.float())  # the saved image, which every metric scores
            ev.update(x, recon, out.indices)
            if lpips is not None:  # against the 8-bit reference, as every other metric
                lpips_sum += lpips(to_8bit(x.float()), recon).double().sum()
            take = e["num_images"] - sum(len(a) for a, _ in shown)  # the first ones, any batches
            if take > 0:
                shown.append((x[:take], out.recon[:take].float()))
        if self.world > 1:
            import torch.distributed as dist

            ev.all_reduce()
            dist.all_reduce(lpips_sum)
        result = {"step": self.step, **ev.result()}
        if lpips is not None:
            result["lpips"] = float(lpips_sum) / result["images"]
        model.train(was)
        if save_images and self.rank == 0 and shown:
            img_dir = self.out_dir / "images"
            x, recon = (torch.cat(part) for part in zip(*shown, strict=True))
            save_grid(x, recon, img_dir / f"recon_{self.step:07d}.png")
            codes = ev.codes.counts if ev.codes is not None else None
            if codes is not None and not codes.is_sparse:  # sparse: too many codes to draw
                save_usage_histogram(ev.codes.every_code(), img_dir / f"usage_{self.step:07d}.png")
        return result
