"""Image data for tokenizer training: image folders, CIFAR-10 (python format), bundled samples.

Every dataset yields (3, R, R) float32 images in [-1, 1]. Training items are addressed by
(index, seed) pairs from StreamSampler, so a random crop is a pure function of its key: a run
resumed at item k sees exactly the crops the uninterrupted run saw, with or without workers.
Nothing is ever downloaded; a missing path raises FileNotFoundError saying what was expected.
"""

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def _to_unit(img: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 in [-1, 1]. Out of place: a float input is not the caller's
    to overwrite (float() returns it itself)."""
    return img.float() / 127.5 - 1.0


def _crop(img: torch.Tensor, res: int, key, flip: bool, box=None) -> torch.Tensor:
    """Random (key = (index, seed)) or fixed (box = (top, left)) res x res crop of (3, H, W)."""
    _, h, w = img.shape
    if box is None:
        g = torch.Generator().manual_seed(int(key[1]))
        top = int(torch.randint(h - res + 1, (1,), generator=g))
        left = int(torch.randint(w - res + 1, (1,), generator=g))
        flip = flip and bool(torch.randint(2, (1,), generator=g))
    else:
        (top, left), flip = box, False
    out = img[:, top : top + res, left : left + res]
    return out.flip(-1) if flip else out


def _fit(img: torch.Tensor, res: int, scale: float) -> torch.Tensor:
    """Resize uint8 (3, H, W) by `scale`, and up so the shorter side is at least res."""
    h, w = img.shape[1:]
    s = max(scale, res / min(h, w))
    if s == 1.0:
        return img
    size = (max(res, round(h * s)), max(res, round(w * s)))
    out = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=s < 1)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def check_resolution(model, resolution: int) -> None:
    """ValueError unless the images' resolution is a multiple of the model's downsampling factor:
    else the decoder's output misses the input's size (training fails deep in torch, and tokens
    decode to another size than their image's)."""
    factor = getattr(getattr(model, "encoder", None), "downsample_factor", None)
    if factor and resolution % factor:
        raise ValueError(
            f"data.resolution must be a multiple of the model's downsampling factor {factor}, "
            f"got {resolution}"
        )


def load_image(path) -> torch.Tensor:
    """An image file as uint8 (3, H, W) RGB; ValueError naming the file where it cannot be read
    (a truncated file fails in the middle of a long run: the message says which)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode == "F":  # convert("RGB") clips floats in [0, 1] to black
                raise ValueError("floating-point images (PIL mode F) are not supported")
            if im.mode.startswith("I"):  # 16-bit grayscale: convert("RGB") would clip at 255
                gray = np.asarray(im, dtype=np.float64) / 257
                arr = np.repeat(np.rint(gray).clip(0, 255).astype(np.uint8)[..., None], 3, -1)
            else:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:  # PIL: UnidentifiedImageError, "image file is truncated"
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFolder(torch.utils.data.Dataset):
    """Images under a directory (recursively), random crops when training, centre crops else."""

    def __init__(
        self,
        files: list,
        resolution: int,
        scale: float = 1.0,
        train: bool = True,
        flip: bool = True,
    ):
        self.files, self.res, self.scale, self.train, self.flip = (
            files,
            resolution,
            scale,
            train,
            flip,
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> torch.Tensor:
        idx = key[0] if self.train else key
        img = _fit(load_image(self.files[idx]), self.res, self.scale)
        if self.train:
            return _to_unit(_crop(img, self.res, key, self.flip))
        h, w = img.shape[1:]
        box = ((h - self.res) // 2, (w - self.res) // 2)
        return _to_unit(_crop(img, self.res, None, False, box))


class TensorImages(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) images (CIFAR-10), resized to the resolution, flipped when training."""

    def __init__(
        self, images: torch.Tensor, resolution: int, train: bool = True, flip: bool = True
    ):
        # Float pixels have no agreed range ([0, 1], [0, 255]?): scaled as 8-bit levels they
        # trained on near-black images without a word.
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a uint8 tensor (N, 3, H, W), got {got}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        self.images, self.res, self.train, self.flip = images, resolution, train, flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> torch.Tensor:
        idx = key[0] if self.train else key
        img = self.images[idx]
        if img.shape[-1] != self.res or img.shape[-2] != self.res:
            img = F.interpolate(
                img[None].float(), size=(self.res, self.res), mode="bilinear", antialias=True
            )[0]
        if self.train and self.flip:
            if bool(torch.randint(2, (1,), generator=torch.Generator().manual_seed(int(key[1])))):
                img = img.flip(-1)
        return _to_unit(img)


class Crops(torch.utils.data.Dataset):
    """Crops of a few large photographs: training crops come from the left (1 - val_fraction) of
    each image's width, evaluation crops tile the held-out right strip, so no evaluated pixel is
    trained on (unless the strip is narrower than one crop)."""

    def __init__(
        self,
        images: list,
        resolution: int,
        val_fraction: float,
        train: bool,
        epoch_size: int = 1024,
        flip: bool = True,
    ):
        self.res, self.train, self.flip, self.epoch_size = resolution, train, flip, epoch_size
        self.images, self.boxes = [], []
        for n, img in enumerate(images):
            h, w = img.shape[1:]
            split = max(resolution, min(w - resolution, round(w * (1 - val_fraction))))
            if train:
                self.images.append(img[:, :, :split])
                continue
            self.images.append(img)
            left0 = min(split, w - resolution)
            for top in range(0, h - resolution + 1, resolution):
                for left in range(left0, w - resolution + 1, resolution):
                    self.boxes.append((n, top, left))

    def __len__(self) -> int:
        return self.epoch_size if self.train else len(self.boxes)

    def __getitem__(self, key) -> torch.Tensor:
        if self.train:
            img = self.images[key[0] % len(self.images)]
            return _to_unit(_crop(img, self.res, key, self.flip))
        n, top, left = self.boxes[key]
        return _to_unit(_crop(self.images[n], self.res, None, False, (top, left)))


def sample_images() -> list[tuple[str, torch.Tensor]]:
    """The photographs installed packages ship, as (name, uint8 (3, H, W)): scikit-learn's
    china.jpg and flower.jpg (427 x 640), plus scikit-image's colour photographs when installed."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise ImportError(
            "data.kind=samples uses the photographs shipped with scikit-learn: "
            "pip install scikit-learn (or point data.kind=folder at your own images)"
        ) from e
    found = load_sample_images()
    out = [
        (Path(name).name, torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous())
        for name, img in zip(found.filenames, found.images, strict=True)
    ]
    try:
        from skimage import data as skdata
    except ImportError:
        return out
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - a missing or unreadable bundled file just skips it
            continue
        if img.ndim == 3 and img.shape[2] == 3:
            out.append((name, torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous()))
    return out


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _split_folder(root: Path, val_fraction: float) -> tuple[list, list]:
    """root/train and root/val when both exist, else a fixed random val_fraction held out."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        splits = _image_files(root / "train"), _image_files(root / "val")
        for name, files in zip(("train", "val"), splits, strict=True):
            if not files:  # an empty val/ failed only at the evaluation after training
                raise ValueError(
                    f"data.path {str(root)!r}: its {name}/ folder holds no images "
                    f"(files ending in {sorted(IMAGE_SUFFIXES)})"
                )
        return splits
    files = _image_files(root)
    if len(files) < 2:
        raise ValueError(
            f"data.path {str(root)!r} holds {len(files)} images; need at least 2 "
            f"(files ending in {sorted(IMAGE_SUFFIXES)})"
        )
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    return [files[i] for i in sorted(order[n_val:])], [files[i] for i in sorted(order[:n_val])]


def load_cifar10(root) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's python pickles (data_batch_1..5, test_batch) from root or root/cifar-10-batches-py
    as uint8 (50000, 3, 32, 32) train and (10000, 3, 32, 32) test images."""
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = sorted(root.glob("data_batch_*"))
    if not train_files or not (root / "test_batch").is_file():
        raise FileNotFoundError(
            f"data.path {str(root)!r} has no CIFAR-10 python batches: expected data_batch_1 ... "
            "data_batch_5 and test_batch (cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html, extracted)"
        )

    def read(path):
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)  # (n, 3072): R, G, B planes
            return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{str(path)!r} is not a CIFAR-10 python batch (a pickled dict whose b'data' "
                f"holds rows of 3072 bytes): {type(e).__name__}: {e}"
            ) from e

    return torch.cat([read(p) for p in train_files]), read(root / "test_batch")


def build_datasets(
    data: dict, augment: bool = True
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset]:
    """(train, eval) datasets for the config's `data` section; see DEFAULTS in config.py.

    augment=False gives the training split the evaluation's fixed transform (centre crops, no
    flips), indexed by plain integers, to tokenize it; data.kind=samples then has no training
    split (its training images are random crops): None."""
    kind, res, flip = data["kind"], data["resolution"], data["flip"]
    if kind == "samples":
        images = [_fit(img, res, data["scale"]) for _, img in sample_images()]
        train = Crops(images, res, data["val_fraction"], True, data["epoch_size"], flip)
        return train if augment else None, Crops(images, res, data["val_fraction"], False)
    root = Path(data["path"]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path {str(root)!r} is not a directory (data.kind={kind})")
    if kind == "cifar10":
        train, test = load_cifar10(root)
        return TensorImages(train, res, augment, flip), TensorImages(test, res, False)
    train_files, val_files = _split_folder(root, data["val_fraction"])
    return (
        ImageFolder(train_files, res, data["scale"], augment, flip),
        ImageFolder(val_files, res, data["scale"], False),
    )


class StreamSampler(torch.utils.data.Sampler):
    """An endless stream of (index, seed) keys: epoch e visits a permutation of range(n) seeded by
    (seed, e), sharded across `world` ranks; item k of this rank's stream is a pure function of k,
    so starting at `start` resumes the stream exactly where a run that consumed `start` items was.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ):
        if n < world:
            raise ValueError(f"dataset has {n} items, fewer than the {world} processes")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.start, self.shuffle = start, shuffle
        self.per_rank = n // world  # the last n % world items of each epoch are dropped

    def _perm(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        k = self.start
        epoch, perm = -1, None
        while True:
            e, pos = divmod(k, self.per_rank)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            index = int(perm[pos * self.world + self.rank])
            # A distinct crop seed per (rank, item): 2**61 - 1 is prime, so seeds never collide
            # for streams shorter than that.
            yield index, (self.seed * 2_654_435_761 + k * self.world + self.rank) % (2**61 - 1)
            k += 1

    def __len__(self) -> int:  # endless; DataLoader only asks when it is given no batch size
        return 2**62


def train_loader(
    dataset,
    batch_size: int,
    seed: int,
    start_item: int = 0,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Endless loader of (B, 3, R, R) batches starting at this rank's item `start_item`; the same
    batches for any num_workers (each item's crop is seeded by its position in the stream)."""
    sampler = StreamSampler(len(dataset), seed, rank, world, start_item)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        # A private generator: DataLoader otherwise draws its worker base seed from the global
        # torch RNG, and a resumed run would draw it at a different point than the original.
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(
    dataset,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    items: int = 0,
    pin_memory: bool = False,
):
    """This rank's shard (items rank, rank + world, ...) of the evaluation set, in order; of its
    first `items` items only when items > 0 (the same images whatever the number of ranks)."""
    n = min(len(dataset), items) if items > 0 else len(dataset)
    shard = torch.utils.data.Subset(dataset, range(rank, n, world))
    return torch.utils.data.DataLoader(
        shard,
        batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )
