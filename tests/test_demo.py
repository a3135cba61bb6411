import pytest

pytest.importorskip("sklearn")


def test_demo_trains_a_tokenizer_on_real_images(tmp_path, capsys):
    import torch

    from fastvq.demo import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: 2 threads on the shared 2-core CI are slower
    try:
        result = main(["--quiet", "train.steps=30", "train.batch_size=16", "model.ch=16",
                       "model.num_res_blocks=1", "model.quantizer.codebook_size=128",
                       f"train.out_dir={tmp_path}"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    # Training on the photographs' left parts lowers the error on their held-out right strips
    # several-fold from the untrained model's, and uses a real share of the codebook.
    assert result["mse"] < 0.4 * result["initial_mse"], result  # 0.037 vs 0.147 here
    assert result["usage"] > 0.05 and result["perplexity"] > 4, result
    assert 0 < result["mean_colour_mse"] < result["initial_mse"]
    out = capsys.readouterr().out
    assert "held-out evaluation" in out and "mean-colour baseline" in out
    assert (tmp_path / "eval.json").is_file()


def test_demo_on_an_image_folder(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from fastvq.demo import main

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.png"
        )
    main(["--quiet", "train.steps=2", "train.batch_size=4", "model.ch=8", "data.kind=folder",
          f"data.path={tmp_path / 'images'}", f"train.out_dir={tmp_path / 'run'}"])  # fmt: skip
    assert f"from data.path {tmp_path / 'images'};" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override,says",
    [
        ("model.quantizer={type: FSQ, levels: [4, 4]}", "with 16 codes"),
        ("train.vq=false", "no codebook"),
    ],
)
def test_demo_takes_another_quantizer_or_none(tmp_path, capsys, override, says):
    """Both crashed: the FSQ config has no codebook_size key, and without VQ the evaluation has
    no code usage to print."""
    from fastvq.demo import main

    result = main(["--quiet", "train.steps=1", "train.batch_size=4", "model.ch=8",
                   "eval.max_batches=1", override, f"train.out_dir={tmp_path}"])  # fmt: skip
    out = capsys.readouterr().out
    assert says in out and "held-out evaluation" in out
    assert ("codes_used" in result) == ("FSQ" in override)


def test_recipes_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    from fastvq.demo import load_demo_config
    from fastvq.train.config import load_config

    monkeypatch.chdir(tmp_path)  # no configs/ here: the names resolve to the installed recipes
    assert load_demo_config(["train.steps=7"])["train"]["steps"] == 7
    cfg = load_config("vqgan_65k", ["data.path=/data"])
    assert cfg["model"]["quantizer"]["codebook_size"] == 65536
    with pytest.raises(FileNotFoundError, match="no_such_recipe"):
        load_config("no_such_recipe")
