"""Bad input to every fastvq.nn module: a clear TypeError / ValueError naming the argument, at
construction or call, never a crash inside torch (module-specific cases live in each module's
test file)."""

import pytest
import torch

import fastvq
import fastvq.lattice
import fastvq.nn as fnn

D = 8
# name -> (constructor taking codebook_size (None: the module has none), input shape)
MODULES = {
    "VectorQuantize": (lambda k=16: fnn.VectorQuantize(D, k), (2, 5, D)),
    "HouseholderVQ": (lambda k=16: fnn.HouseholderVQ(D, k), (2, 5, D)),
    "HyperCodebook": (lambda k=16: fnn.HyperCodebook(D, k, codebook_dim=4), (2, 5, D)),
    "ResidualVQ": (lambda k=16: fnn.ResidualVQ(dim=D, num_quantizers=2, codebook_size=k),
                   (2, 5, D)),
    "GroupedResidualVQ": (
        lambda k=16: fnn.GroupedResidualVQ(dim=D, groups=2, num_quantizers=2, codebook_size=k),
        (2, 5, D),
    ),
    "ResidualLFQ": (lambda k=16: fnn.ResidualLFQ(dim=D, num_quantizers=2, codebook_size=k),
                    (2, 5, D)),
    "LFQ": (lambda k=16: fnn.LFQ(dim=D, codebook_size=k), (2, 5, D)),
    "BSQ": (lambda k=16: fnn.BSQ(dim=D, codebook_size=k), (2, 5, D)),
    "SimVQ": (lambda k=16: fnn.SimVQ(D, k), (2, 5, D)),
    "ResidualSimVQ": (lambda k=16: fnn.ResidualSimVQ(dim=D, num_quantizers=2, codebook_size=k),
                      (2, 5, D)),
    "RandomProjectionQuantizer": (
        lambda k=16: fnn.RandomProjectionQuantizer(dim=D, codebook_size=k, codebook_dim=4),
        (2, 5, D),
    ),
    "E8Quantize": (lambda k=None: fnn.E8Quantize(dim=D, codebook_size=k), (2, 5, D)),
    "LeechQuantize": (lambda k=None: fnn.LeechQuantize(dim=D, codebook_size=k), (2, 5, D)),
    "FSQ": (lambda: fnn.FSQ([5, 5], dim=D), (2, 5, D)),
    "ResidualFSQ": (lambda: fnn.ResidualFSQ(dim=D, levels=[5, 5], num_quantizers=2), (2, 5, D)),
    "LatentQuantize": (lambda: fnn.LatentQuantize([5, 5], dim=D), (2, D, 5)),  # channel-first
}  # fmt: skip


def test_every_export_is_covered():
    not_layers = {"CodebookMLP", "GroupedResidualFSQ", "GroupedResidualLFQ"}
    assert set(fnn.__all__) - not_layers - {"defer_codebook_updates"} == set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_bad_calls(name):
    make, shape = MODULES[name]
    module = make()
    with pytest.raises(TypeError, match=r"(x|z) must be"):
        module(torch.randint(0, 3, shape))  # not floating
    with pytest.raises(TypeError, match=r"(x|z) must be"):
        module(torch.randn(shape).tolist())  # not a tensor
    wrong = list(shape)
    wrong[1 if name == "LatentQuantize" else -1] += 1
    with pytest.raises(ValueError, match=str(D)):
        module(torch.randn(wrong))  # wrong feature dimension: the message names dim
    with pytest.raises(ValueError):
        module(torch.randn(D))  # wrong layout: one vector without a batch


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"FSQ", "ResidualFSQ", "LatentQuantize"}))
def test_bad_codebook_size(name):
    make, _ = MODULES[name]
    for k in (0, -3):
        with pytest.raises(ValueError, match="codebook_size"):
            make(k)
    with pytest.raises(TypeError, match="codebook_size"):
        make(2.5)


@pytest.mark.parametrize("cls, dim", [(fnn.E8Quantize, 8), (fnn.LeechQuantize, 24)])
def test_codebook_dim_with_a_lattice_codebook(cls, dim):
    with pytest.raises(ValueError, match="codebook_dim .* fixed .* lattice"):
        cls(dim=D, codebook_dim=4)
    cls(dim=D, codebook_dim=dim)  # repeating the fixed value is fine


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(name, training):
    # An empty batch (or empty sequence) flows through with the same layout as a full one: no
    # reshape of 0 elements with an inferred -1, no NaN loss from a mean over nothing.
    make, shape = MODULES[name]
    module = make().train(training)
    full = module(torch.randn(shape))
    axis = 2 if name == "LatentQuantize" else 1
    for empty_shape in ((0, *shape[1:]), tuple(0 if i == axis else s for i, s in enumerate(shape))):
        out = module(torch.randn(empty_shape))
        for got, ref in zip(out, full, strict=False):
            if not isinstance(got, torch.Tensor):
                continue
            assert got.dim() == ref.dim(), (name, empty_shape, got.shape, ref.shape)
            assert got.numel() == 0 or not got.dtype.is_floating_point or got.isfinite().all()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_input_dtype_against_the_projection(name):
    # A float32 module given fp16 x: a TypeError naming the input where a Linear projects it
    # (not nn.Linear's "mat1 and mat2 must have the same dtype"), and autocast still runs.
    make, shape = MODULES[name]
    module = make()
    x = torch.randn(shape).half()
    if isinstance(getattr(module, "project_in", None), torch.nn.Linear):
        with pytest.raises(TypeError, match=r"(x|z) is torch.float16 .* project_in"):
            module(x)
    else:
        module(x)  # no projection: any floating dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(torch.randn(shape))
        module(torch.randn(shape).bfloat16())  # autocast casts for the projection: no TypeError


def test_decoders_take_narrow_index_dtypes_and_name_the_rest():
    # SimVQ indexed with uint8 as a boolean mask (3 codes for 16 indices); uint16 / uint32 failed
    # inside torch ("aminmax_cpu" not implemented); a 0-d index raised IndexError.
    idx = torch.tensor([3, 0, 5] + [0] * 12 + [1])
    simvq = fnn.SimVQ(D, 16)
    want = simvq.indices_to_codes(idx)
    for dtype in (torch.uint8, torch.int16):
        assert torch.equal(simvq.indices_to_codes(idx.to(dtype)), want), dtype
    # Every decoder and op names the same dtypes (VectorQuantize and the scalar ops took uint16,
    # the lattice ones said "must be an integer tensor, got torch.uint16").
    wide = idx[:, None].to(torch.uint16)
    for decode in (
        fnn.FSQ(levels=[5, 5]).indices_to_codes,
        fnn.VectorQuantize(D, 16).get_codes_from_indices,
        fnn.LeechQuantize().get_codes_from_indices,
        fnn.E8Quantize().get_output_from_indices,
        lambda i: fastvq.fsq_codes(i, [5, 5]),
        lambda i: fastvq.lattice.leech_codes(i),
        lambda i: fastvq.code_counts(i, 16),
    ):
        with pytest.raises(TypeError, match="indices must be an int64, .* got torch.uint16"):
            decode(wide)
    zero_d = torch.tensor(3)
    for layer in (
        fnn.VectorQuantize(D, 16, heads=2),
        fnn.FSQ(levels=[5, 5], dim=4, num_codebooks=2),
        fnn.LFQ(dim=D, codebook_size=16, num_codebooks=2),
        fnn.GroupedResidualVQ(dim=D, groups=2, codebook_size=16, num_quantizers=2),
    ):
        decode = getattr(layer, "indices_to_codes", None) or layer.get_output_from_indices
        with pytest.raises(ValueError, match="indices"):
            decode(zero_d)


def test_masks_and_indices_on_another_device_are_named():
    # A mask on another device failed deep in torch (after the Triton EMA scatter's fake had let
    # the statistics decay); indices on another device gave SimVQ uninitialised codes.
    x = torch.randn(2, 5, D)
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    for layer in (
        fnn.VectorQuantize(D, 16),
        fnn.ResidualVQ(dim=D, num_quantizers=2, codebook_size=16),
        fnn.GroupedResidualVQ(dim=D, groups=2, num_quantizers=2, codebook_size=16),
        fnn.LFQ(dim=D, codebook_size=16),
    ):
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with pytest.raises(ValueError, match="mask must be on x's device cpu, got meta"):
            layer(x, mask=mask)
        assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    idx = torch.zeros(2, 5, dtype=torch.long, device="meta")
    vq, simvq = fnn.VectorQuantize(D, 16), fnn.SimVQ(D, 16)
    for decode in (vq.get_codes_from_indices, simvq.indices_to_codes):
        with pytest.raises(ValueError, match="indices must be on the codebook's device cpu"):
            decode(idx)
    with pytest.raises(ValueError, match="lens must be an integer tensor"):  # torch's promotion
        fnn.VectorQuantize(D, 16)(x, lens=torch.tensor([3, 4], dtype=torch.uint16))


def test_init_from_takes_any_floating_outputs_and_names_its_generator():
    # With projections, float16 outputs failed in the matmul; a str generator in kmeans.
    for layer in (
        fnn.VectorQuantize(D, 16, codebook_dim=3),
        fnn.ResidualVQ(dim=D, num_quantizers=2, codebook_size=16, codebook_dim=3),
    ):
        rows = torch.randn(64, D)
        layer.init_from(rows.half(), generator=torch.Generator().manual_seed(0))
        half = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.init_from(rows.half().float(), generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(v, layer.state_dict()[k]) for k, v in half.items())
        with pytest.raises(TypeError, match="generator must be a torch.Generator, got str"):
            layer.init_from(rows[:3], generator="seed")


def test_residual_seed_and_scale_range():
    rvq = fnn.ResidualVQ(dim=D, num_quantizers=3, codebook_size=16, quantize_dropout=True)
    x = torch.randn(2, 4, D)
    for seed, error in ((True, TypeError), (3.5, TypeError), ("1", TypeError), (-1, ValueError)):
        with pytest.raises(error, match="rand_quantize_dropout_fixed_seed"):
            rvq(x, rand_quantize_dropout_fixed_seed=seed)
    # 65536^-11 underflows float32: residual / scale was inf, the output NaN
    with pytest.raises(ValueError, match="leaves float32's range"):
        fnn.ResidualFSQ(levels=[65536, 65536], num_quantizers=12)


@pytest.mark.parametrize("check", [True, False])
def test_sync_codebook_without_a_process_group_is_named(check):
    # The synced NaN check's all-reduce gave torch's "Default process group has not been
    # initialized"; without the check the statistics' all-reduce named the setting.
    vq = fnn.VectorQuantize(8, 16, sync_codebook=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="needs torch.distributed to be initialized"):
        vq(x, check_inputs_finite=check)
    vq.eval()(x)  # no collectives in eval
