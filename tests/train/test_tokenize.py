"""A trained tokenizer read back (load_tokenizer) and `fastvq tokenize`: every row of the token
file is what the checkpoint's tokenizer gives that image under the evaluation transform."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastvq.train
from fastvq.train import checkpoint as ckpt
from fastvq.train.cli import main
from fastvq.train.data import ImageFolder, TensorImages
from fastvq.train.tokens import index_dtype, write_tokens
from fastvq.train.trainer import Trainer


def _folder(root, sizes) -> None:
    """Random-blob PNGs of the given (h, w) sizes under root/train/<class> and root/val."""
    g = torch.Generator().manual_seed(3)
    for n, (h, w) in enumerate(sizes):
        low = torch.rand(1, 3, 3, 3, generator=g)
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0]
        sub = root / ("val" if n % 4 == 3 else f"train/c{n % 2}")
        sub.mkdir(parents=True, exist_ok=True)
        arr = (img * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(sub / f"im{n}.png")


@pytest.fixture
def trained(make_config, tmp_path):
    """A folder run of 4 steps with an EMA of the weights: (latest.pt, data root, config)."""
    root = tmp_path / "images"
    _folder(root, [(16, 16), (20, 31), (40, 18), (17, 17), (16, 24), (33, 33), (18, 16)] * 2)
    cfg = make_config(
        "data.kind=folder", f"data.path={root}", "train.steps=4", "train.ema_decay=0.5"
    )
    Trainer(cfg).fit()
    return tmp_path / "run" / "checkpoints" / "latest.pt", root, cfg


def _encode(model, images) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(torch.stack(list(images)))[1]


def test_load_tokenizer_gives_the_evaluated_weights_in_eval_mode(trained):
    path, _, _ = trained
    state = torch.load(path, weights_only=False)
    for ema, want in ((True, state["ema"]), (False, state["model"])):
        model = fastvq.train.load_tokenizer(path, ema=ema)
        assert not model.training
        got = model.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["ema"])

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.decode_indices(out.indices), out.recon)


def test_load_tokenizer_refuses_a_checkpoint_without_config(trained, tmp_path):
    path, _, _ = trained
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(path, weights_only=False)["model"], bare)
    with pytest.raises(ValueError, match="holds no config") as e:
        ckpt.load_tokenizer(bare)
    assert "--config" not in str(e.value)  # fastvq eval's option: neither here nor in tokenize


@pytest.mark.parametrize("split", ["train", "val"])
def test_tokenize_a_folder_row_by_row(trained, split, tmp_path):
    path, root, cfg = trained
    assert main(["tokenize", "--checkpoint", str(path), "--split", split]) == 0
    out = tmp_path / "run" / "tokens"
    tokens = np.load(out / f"tokens-{split}.npy")
    info = json.loads((out / f"tokens-{split}.json").read_text())
    files = (out / info["files"]).read_text().splitlines()

    want = sorted(p.relative_to(root).as_posix() for p in root.glob(f"{split}/**/*.png"))
    assert files == want and len(want) > 1
    images = ImageFolder([root / f for f in files], 16, train=False)
    expect = _encode(ckpt.load_tokenizer(path), images).numpy()
    assert tokens.dtype == np.uint16 and tokens.shape == expect.shape == (len(files), 4, 4)
    assert np.array_equal(tokens, expect)
    assert info["shape"] == list(tokens.shape) and info["dtype"] == "uint16"
    assert info["weights"] == "ema" and info["codebook_sizes"] == [16] and info["step"] == 4
    assert info["split"] == split and info["data"] == cfg["data"]
    assert not list(out.glob("*.partial"))


def test_tokenize_with_the_trained_weights_and_an_out_dir(trained, tmp_path):
    path, root, _ = trained
    out = tmp_path / "elsewhere"
    args = ["tokenize", "--checkpoint", str(path), "--out", str(out), "--weights", "model"]
    assert main(args) == 0
    info = json.loads((out / "tokens-train.json").read_text())
    files = (out / "tokens-train.txt").read_text().splitlines()
    images = ImageFolder([root / f for f in files], 16, train=False)
    expect = _encode(ckpt.load_tokenizer(path, ema=False), images).numpy()
    assert info["weights"] == "model"
    assert np.array_equal(np.load(out / "tokens-train.npy"), expect)


def test_tokenize_residual_indices_of_tensor_images(make_config, tmp_path):
    quantizer = "{type: ResidualVQ, num_quantizers: 3, codebook_size: 300, decay: 0.8}"
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(11, 3, 16, 16, generator=g) * 255).byte()
    data = TensorImages(images[:8], 16, train=True), TensorImages(images[8:], 16, train=False)
    cfg = make_config(f"model.quantizer={quantizer}", "train.steps=1", "eval.batch_size=2")
    trainer = Trainer(cfg, datasets=data)
    trainer.fit()
    model = ckpt.load_tokenizer(tmp_path / "run" / "checkpoints" / "latest.pt")
    dataset = TensorImages(images, 16, train=False)
    target = tmp_path / "t.npy"
    shape = write_tokens(model, dataset, target, batch_size=4, device=torch.device("cpu"))
    tokens = np.load(target)
    expect = _encode(model, dataset).numpy()
    assert shape == tokens.shape == expect.shape == (11, 4, 4, 3)
    assert tokens.dtype == np.uint16 and np.array_equal(tokens, expect)
    # In training mode each batch's forward would move the codebook (EMA) while it encodes.
    with pytest.raises(ValueError, match=r"eval mode: call model.eval\(\) first"):
        write_tokens(model.train(), dataset, target, batch_size=4, device=torch.device("cpu"))


def test_index_dtype_is_the_smallest_that_holds_the_codes():
    assert index_dtype([16]) == np.uint16
    assert index_dtype([2**16]) == np.uint16
    assert index_dtype([8, 2**16 + 1]) == np.int32
    assert index_dtype([196_560]) == np.int32
    assert index_dtype([2**31]) == np.int32
    assert index_dtype([2**31 + 1]) == np.int64
    assert index_dtype(None) == np.int64


@pytest.mark.parametrize("shift", [16, 0, -1])  # codes 16 ... 31, exactly 16 = K, or -1
def test_write_tokens_refuses_indices_the_file_cannot_hold(trained, tmp_path, shift):
    model = ckpt.load_tokenizer(trained[0])
    encode = model.encode

    def wrong(i):  # past the codebook, or -1 (a masked row) that uint16 would hold as 65535
        return {16: i + 16, 0: torch.full_like(i, 16), -1: i.clone().fill_(-1)}[shift]

    model.encode = lambda x: (lambda z, i, loss: (z, wrong(i), loss))(*encode(x))
    dataset = TensorImages((torch.rand(3, 3, 16, 16) * 255).byte(), 16, train=False)
    target = tmp_path / "tokens" / "t.npy"
    with pytest.raises(ValueError, match=r"outside \[0, 16\): " + ("-1 " if shift < 0 else "")):
        write_tokens(model, dataset, target, batch_size=2, device=torch.device("cpu"))
    assert list(target.parent.iterdir()) == []  # neither the file nor its partial rows


def test_write_tokens_refuses_an_empty_split(trained, tmp_path):
    empty = TensorImages(torch.zeros(0, 3, 16, 16, dtype=torch.uint8), 16, train=False)
    with pytest.raises(ValueError, match="the split to tokenize holds no images"):
        write_tokens(ckpt.load_tokenizer(trained[0]), empty, tmp_path / "t.npy", batch_size=2,
                     device=torch.device("cpu"))  # fmt: skip


def test_write_tokens_refuses_a_file_with_rows_missing(trained, tmp_path, monkeypatch):
    # Not expected (eval_loader's shards cover the split), but a file with rows never written
    # would hold zeros that read as code 0: refused, and nothing left behind.
    import fastvq.train.tokens as tokens

    real = tokens.eval_loader
    monkeypatch.setattr(tokens, "eval_loader", lambda *a, **k: list(real(*a, **k))[:-1])
    dataset = TensorImages((torch.rand(3, 3, 16, 16) * 255).byte(), 16, train=False)
    target = tmp_path / "tokens" / "t.npy"
    with pytest.raises(RuntimeError, match="wrote 2 of 3 rows"):
        write_tokens(
            ckpt.load_tokenizer(trained[0]), dataset, target, batch_size=2,
            device=torch.device("cpu"),
        )  # fmt: skip
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("bf16", [False, True])
def test_write_tokens_encodes_under_bf16_autocast_when_asked(trained, tmp_path, bf16):
    model = ckpt.load_tokenizer(trained[0])
    encode, seen = model.encode, []

    def spy(x):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return encode(x)

    model.encode = spy
    dataset = TensorImages((torch.rand(3, 3, 16, 16) * 255).byte(), 16, train=False)
    write_tokens(model, dataset, tmp_path / "t.npy", batch_size=2, device=torch.device("cpu"),
                 bf16=bf16)  # fmt: skip
    assert len(seen) == 3 and set(seen) == {torch.bfloat16 if bf16 else False}


def test_trained_config_leaves_the_checkpoint_alone(trained):
    path, _, cfg = trained
    state = torch.load(path, weights_only=False)
    got = ckpt.trained_config(state, path, ["train.steps=9", "data.resolution=8"])
    assert got["train"]["steps"] == 9 and got["data"]["resolution"] == 8
    assert state["config"]["train"]["steps"] == 4 and state["config"]["data"]["resolution"] == 16


def test_tokenize_refuses_the_training_split_of_the_sample_photographs(make_config, tmp_path):
    cfg = make_config("train.steps=0")
    trainer = Trainer(cfg, datasets=(None, None))
    path = trainer.save()
    with pytest.raises(ValueError, match="random crops"):
        main(["tokenize", "--checkpoint", str(path)])


@pytest.mark.parametrize(
    "quantizer",
    [
        "{type: SimVQ, codebook_size: 16}",  # indexed its codebook with int64 only
        "{type: ResidualVQ, num_quantizers: 2, codebook_size: [4, 32]}",  # layer 1 beyond 4
    ],
)
def test_decode_indices_of_the_token_file_reconstructs_the_forward(make_config, quantizer):
    cfg = make_config(f"model.quantizer={quantizer}", "train.steps=0")
    path = Trainer(cfg, datasets=(None, None)).save()
    model = ckpt.load_tokenizer(path)
    dataset = TensorImages((torch.rand(5, 3, 16, 16) * 255).byte(), 16, train=False)
    target = path.parent / "t.npy"
    write_tokens(model, dataset, target, batch_size=2, device=torch.device("cpu"))
    tokens = np.load(target)
    assert tokens.dtype == np.uint16 and tokens.max() >= 4
    with torch.no_grad():
        recon = model(torch.stack(list(dataset))).recon
        assert torch.equal(model.decode_indices(torch.from_numpy(tokens)), recon)


def test_tokenize_refuses_a_quantizer_it_was_not_trained_with(make_config):
    fsq = "model.quantizer={type: FSQ, levels: [2, 8]}"
    # The pretraining run (train.vq=false): its codebook never saw a latent.
    path = Trainer(
        make_config(fsq, "train.vq=false", "train.steps=0"), datasets=(None, None)
    ).save()
    args = ["tokenize", "--checkpoint", str(path), "--split", "val"]
    with pytest.raises(ValueError, match="train.vq=false"):
        main(args)
    with pytest.raises(ValueError, match="train.vq=false"):
        fastvq.train.load_tokenizer(path)
    # FSQ has no weights to disagree with: other levels were taken silently, other codes.
    Trainer(make_config(fsq, "train.steps=0"), datasets=(None, None)).save()
    for override in ("model.quantizer.levels=[8, 2]", " model.quantizer.levels=[8, 2]"):
        with pytest.raises(ValueError, match="model section"):
            main([*args, override])


def test_tokenize_names_images_from_any_directory_whatever_their_bytes(
    make_config, tmp_path, monkeypatch
):
    root = tmp_path / "images"
    _folder(root, [(16, 16)] * 8)
    latin1 = os.fsencode(root / "train" / "c0") + b"/caf\xe9 1.png"  # not UTF-8
    os.rename(root / "train" / "c0" / "im0.png", latin1)
    monkeypatch.chdir(tmp_path)
    path = Trainer(make_config("data.kind=folder", "data.path=images", "train.steps=0")).save()
    main(["tokenize", "--checkpoint", str(path), "--out", "tok", "train.bf16=true"])
    info = json.loads((tmp_path / "tok" / "tokens-train.json").read_text())
    names = (tmp_path / "tok" / "tokens-train.txt").read_bytes().splitlines()
    assert b"train/c0/caf\xe9 1.png" in names and len(names) == info["shape"][0] == 6
    monkeypatch.chdir(root)  # the JSON's data.path, not the directory tokenize ran in
    assert all((Path(info["data"]["path"]) / os.fsdecode(n)).is_file() for n in names)
    assert info["bf16"] is True  # the codes of bf16 autocast, not always float32's
    assert info["weights"] == "model"  # --weights ema, but the run kept no EMA


def test_tokenize_with_flips_holds_each_image_and_its_mirror(trained, tmp_path):
    path, root, _ = trained
    out = tmp_path / "flipped"
    args = ["tokenize", "--checkpoint", str(path), "--split", "val", "--out", str(out), "--flip"]
    assert main(args) == 0
    tokens = np.load(out / "tokens-val.npy")
    info = json.loads((out / "tokens-val.json").read_text())
    files = (out / "tokens-val.txt").read_text().splitlines()
    images = torch.stack(list(ImageFolder([root / f for f in files], 16, train=False)))
    model = ckpt.load_tokenizer(path)
    expect = [_encode(model, images).numpy(), _encode(model, images.flip(-1)).numpy()]
    assert info["flip"] is True and info["shape"] == [len(files), 2, 4, 4]
    assert np.array_equal(tokens[:, 0], expect[0]) and np.array_equal(tokens[:, 1], expect[1])
    assert not np.array_equal(expect[0], expect[1])  # the mirror images encode differently


def test_tokenize_checks_before_encoding_what_it_would_fail_on_after(trained, tmp_path):
    # A resolution the model cannot round-trip (tokens decoding to another size), as train and
    # eval refuse it; a tokens path that is a folder, or a folder that is a file (found by the
    # final rename, or by mkdir, after the whole split was encoded).
    path, _, _ = trained
    with pytest.raises(ValueError, match="multiple of the model's downsampling factor 4, got 18"):
        main(
            [
                "tokenize",
                "--checkpoint",
                str(path),
                "--out",
                str(tmp_path / "t"),
                "data.resolution=18",
            ]
        )
    model = ckpt.load_tokenizer(path)
    dataset = TensorImages((torch.rand(2, 3, 16, 16) * 255).byte(), 16, train=False)
    calls = []
    model.encode = lambda x: calls.append(x) or (_ for _ in ()).throw(AssertionError("encoded"))
    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "file").write_text("")
    for target, match in (
        (tmp_path / "dir.npy", "is a folder"),
        (tmp_path / "file" / "t.npy", "is a file"),
    ):
        with pytest.raises(ValueError, match=match):
            write_tokens(model, dataset, target, batch_size=2, device=torch.device("cpu"))
    assert not calls
