"""Datasets from tiny synthetic directories: image folders and CIFAR-10's python format; the
resumable sample stream; missing paths are clear errors."""

import pickle

import numpy as np
import pytest
import torch

from fastvq.train.data import StreamSampler, build_datasets, train_loader

DATA = {"resolution": 8, "val_fraction": 0.25, "scale": 1.0, "flip": True, "epoch_size": 16}


def _write_pngs(root, n, size=(12, 10), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(n):
        arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        arrays.append(arr)
    return arrays


def test_image_folder_with_train_and_val(tmp_path):
    _write_pngs(tmp_path / "train" / "cats", 3)
    val = _write_pngs(tmp_path / "val", 2, size=(10, 12), seed=1)
    train_set, eval_set = build_datasets({**DATA, "kind": "folder", "path": str(tmp_path)})
    assert len(train_set) == 3 and len(eval_set) == 2
    x = train_set[(1, 123)]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1
    assert torch.equal(x, train_set[(1, 123)])  # a crop is a pure function of its key
    assert any(not torch.equal(x, train_set[(1, s)]) for s in range(5))
    # Evaluation: the centre crop, exactly the file's pixels mapped to [-1, 1].
    want = torch.from_numpy(val[0][1:9, 2:10]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(eval_set[0], want)


def test_image_folder_split_and_errors(tmp_path):
    _write_pngs(tmp_path / "flat", 8)
    train_set, eval_set = build_datasets({**DATA, "kind": "folder", "path": str(tmp_path / "flat")})
    assert (len(train_set), len(eval_set)) == (6, 2)
    assert not set(train_set.files) & set(eval_set.files)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_datasets({**DATA, "kind": "folder", "path": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds 0 images"):
        build_datasets({**DATA, "kind": "folder", "path": str(tmp_path / "empty")})


@pytest.mark.parametrize("empty", ["train", "val"])
def test_image_folder_with_an_empty_split_is_named(tmp_path, empty):
    """An empty val/ gave a 0-image evaluation set: the run trained, then failed ("no images
    were evaluated"). Files of other kinds do not count."""
    for split in ("train", "val"):
        if split != empty:
            _write_pngs(tmp_path / split, 2)
    (tmp_path / empty).mkdir()
    (tmp_path / empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"its {empty}/ folder holds no images .*'.png'"):
        build_datasets({**DATA, "kind": "folder", "path": str(tmp_path)})


def test_tensor_images_take_uint8_only_and_leave_them_alone():
    """Float pixels were scaled as 8-bit levels in place: every read rescaled the caller's
    tensor again."""
    from fastvq.train.data import TensorImages, _to_unit

    images = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8).float() % 256
    with pytest.raises(TypeError, match="images must be a uint8 tensor .*got torch.float32"):
        TensorImages(images, 8)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got shape \(2, 8, 8\)"):
        TensorImages(images[:, 0].byte(), 8)
    kept = images.clone()
    torch.testing.assert_close(_to_unit(images), kept / 127.5 - 1, rtol=0, atol=0)
    assert torch.equal(images, kept)


def _write_cifar(root, n_train=(6, 4), n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    batches = []
    names = [f"data_batch_{i + 1}" for i in range(len(n_train))] + ["test_batch"]
    for name, n in zip(names, [*n_train, n_test], strict=True):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * n}, f)
        batches.append(data)
    return batches


def test_cifar10_python_format(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    cfg = {**DATA, "kind": "cifar10", "path": str(tmp_path), "resolution": 32, "flip": False}
    train_set, eval_set = build_datasets(cfg)
    assert (len(train_set), len(eval_set)) == (10, 5)
    # Row layout: 1024 red values, then green, then blue, each row-major 32 x 32.
    img = eval_set[2]
    red = torch.from_numpy(batches[2][2, :1024].reshape(32, 32)).float() / 127.5 - 1
    blue = torch.from_numpy(batches[2][2, 2048:].reshape(32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(img[0], red)
    torch.testing.assert_close(img[2], blue)
    second = torch.from_numpy(batches[1][0].reshape(3, 32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(train_set[(6, 0)], second)  # batch 2 follows batch 1
    # augment=False (fastvq tokenize): the training split by plain index, no crops or flips
    fixed = build_datasets({**cfg, "flip": True}, augment=False)[0]
    torch.testing.assert_close(fixed[6], second)
    small = build_datasets({**cfg, "resolution": 16})[1][0]
    assert small.shape == (3, 16, 16)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        build_datasets({**cfg, "path": str(tmp_path / "other")})
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    for bad in (
        b"",
        pickle.dumps({b"labels": [1]}),
        pickle.dumps([1, 2]),
    ):  # empty; no b"data"; a list
        batch.write_bytes(bad)
        with pytest.raises(ValueError, match="test_batch' is not a CIFAR-10 python batch"):
            build_datasets(cfg)


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path):
    from PIL import Image

    from fastvq.train.data import load_image

    gray = np.random.default_rng(0).integers(0, 65536, (12, 20)).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")  # mode I;16
    img = load_image(tmp_path / "g16.png")
    assert img.shape == (3, 12, 20) and img.dtype == torch.uint8
    want = torch.from_numpy(np.rint(gray / 257).astype(np.uint8))
    assert all(torch.equal(channel, want) for channel in img)
    # 32-bit integer images (mode I): values outside 16 bits saturate, not wrap
    Image.fromarray(np.array([[70000, -5, 257]], np.int32)).save(tmp_path / "i32.tif")
    assert load_image(tmp_path / "i32.tif")[0].tolist() == [[255, 0, 1]]


def test_unreadable_images_are_named(tmp_path):
    # A truncated file failed a long run with PIL's "image file is truncated", naming no file;
    # a float image (mode F, values in [0, 1]) became black silently.
    from PIL import Image

    from fastvq.train.data import load_image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.random.default_rng(0).random((8, 8), np.float32)).save(tmp_path / "f.tif")
    (tmp_path / "text.png").write_text("not an image")
    for name, why in (("cut.png", "truncated"), ("f.tif", "mode F"), ("text.png", "identify")):
        with pytest.raises(ValueError, match=f"cannot read image '.*{name}': .*{why}"):
            load_image(tmp_path / name)


def test_stream_resumes_exactly_and_shards():
    full = list(zip(range(40), StreamSampler(10, seed=3), strict=False))
    resumed = list(zip(range(25), StreamSampler(10, seed=3, start=15), strict=False))
    assert [k for _, k in full[15:]] == [k for _, k in resumed]
    # Each epoch is a permutation; two ranks split every epoch between them without overlap.
    assert sorted(i for _, (i, _) in full[:10]) == list(range(10))
    r0 = [i for _, (i, _) in zip(range(5), StreamSampler(10, 3, rank=0, world=2), strict=False)]
    r1 = [i for _, (i, _) in zip(range(5), StreamSampler(10, 3, rank=1, world=2), strict=False)]
    assert sorted(r0 + r1) == list(range(10))
    with pytest.raises(ValueError, match="fewer than"):
        StreamSampler(1, world=2)


def test_train_loader_resume(tmp_path):
    _write_pngs(tmp_path, 5)
    train_set, _ = build_datasets({**DATA, "kind": "folder", "path": str(tmp_path)})
    it = iter(train_loader(train_set, 2, seed=0))
    batches = [next(it) for _ in range(4)]
    later = iter(train_loader(train_set, 2, seed=0, start_item=4))
    assert torch.equal(next(later), batches[2]) and torch.equal(next(later), batches[3])


def test_samples_have_held_out_strips():
    pytest.importorskip("sklearn")
    train_set, eval_set = build_datasets(
        {**DATA, "kind": "samples", "resolution": 32, "scale": 0.25}
    )
    assert len(train_set) == 16 and len(eval_set) > 0
    assert train_set[(0, 1)].shape == eval_set[0].shape == (3, 32, 32)
    # Training crops come from the left of each photograph, evaluation tiles from its right strip.
    widths = [img.shape[-1] for img in train_set.images]
    assert all(w < full.shape[-1] for w, full in zip(widths, eval_set.images, strict=True))
    assert all(left >= widths[n] for n, _, left in eval_set.boxes)


def test_stream_reshuffles_each_epoch_and_never_reuses_a_crop_seed():
    """Each epoch is its own permutation; crop seeds differ across items and across ranks (two
    ranks drawing the same seed for different items would crop every image the same way)."""
    stream = [k for _, k in zip(range(30), StreamSampler(10, seed=5), strict=False)]
    epochs = [[i for i, _ in stream[e * 10 : (e + 1) * 10]] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and len({*map(tuple, epochs)}) == 3
    ranks = [[s for _, (_, s) in zip(range(20), StreamSampler(10, 5, rank=r, world=2),
                                     strict=False)] for r in range(2)]  # fmt: skip
    assert len(set(ranks[0] + ranks[1])) == 40


def test_eval_shards_cover_the_set_and_crops_respect_the_split(tmp_path):
    from fastvq.train.data import Crops, eval_loader

    g = torch.Generator().manual_seed(0)
    data = torch.rand(7, 3, 4, 4, generator=g)
    shards = [torch.cat(list(eval_loader(data, 2, rank=r, world=2))) for r in range(2)]
    torch.testing.assert_close(torch.cat(shards).sort(0).values, data.sort(0).values)
    assert len(shards[0]) == 4 and len(shards[1]) == 3
    img = torch.randint(0, 256, (3, 8, 40), generator=g, dtype=torch.uint8)
    train = Crops([img], 8, 0.25, train=True, flip=False)
    assert train.images[0].shape[-1] == 30  # the left 1 - val_fraction of the width
    # flip=False: every training crop is the image's own pixels, never mirrored.
    unit = img.float() / 127.5 - 1
    for key in range(6):
        crop = train[(0, key)]
        assert any(torch.equal(crop, unit[:, :, left : left + 8]) for left in range(23))


def test_training_crops_come_from_every_photograph():
    """Training keys pick the photograph by key[0] modulo their number: every crop from the first
    one trained on a single image without a word."""
    from fastvq.train.data import Crops

    images = [torch.full((3, 8, 16), v, dtype=torch.uint8) for v in (0, 255)]
    train = Crops(images, 8, 0.25, train=True, epoch_size=4, flip=False)
    means = [train[(key, 7)].mean().item() for key in range(4)]
    assert means == [-1.0, 1.0, -1.0, 1.0]  # keys 2 and 3 wrap around


def test_evaluation_tiles_include_the_bottom_row():
    """Evaluation tiles cover the held-out strip down to its last full row: range(0, h - res)
    dropped the bottom row of tiles (of a 16-px high image at res 8, only the top one was kept)."""
    from fastvq.train.data import Crops

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 16, 24), generator=g, dtype=torch.uint8)
    tiles = Crops([img], 8, 1 / 3, train=False)
    assert tiles.boxes == [(0, 0, 16), (0, 8, 16)]
    unit = img.float() / 127.5 - 1
    assert torch.equal(tiles[1], unit[:, 8:16, 16:24])


@pytest.mark.parametrize("train", [True, False])
def test_tensor_images_resize_when_only_the_height_differs(train):
    """Images as wide as the resolution but taller were returned unresized (20 x 16 at 16): the
    size check looked at the width alone."""
    from fastvq.train.data import TensorImages

    images = torch.randint(0, 256, (2, 3, 20, 16), dtype=torch.uint8)
    data = TensorImages(images, 16, train=train)
    assert data[(1, 0) if train else 1].shape == (3, 16, 16)


def test_image_folder_takes_upper_case_suffixes(tmp_path):
    """Cameras write B.JPG: the suffix is compared in lower case, else the file was skipped."""
    from PIL import Image

    for name, value in (("a.png", 30), ("B.JPG", 200)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name)
    train_set, eval_set = build_datasets({**DATA, "kind": "folder", "path": str(tmp_path)})
    assert sorted(f.name for f in [*train_set.files, *eval_set.files]) == ["B.JPG", "a.png"]
    assert eval_set[0].shape == (3, 8, 8) and train_set[(0, 0)].shape == (3, 8, 8)
