"""Host syncs per call, pinned: on a GPU each one stalls the stream (a VectorQuantize step at
65,536 codes is about 1 ms of kernels), so a change that adds one fails here. Counted on the CPU
by fastvq.testing.count_syncs; the remaining ones are the documented NaN/Inf input check (one
per op call, one per residual stack, grouped stack or multi-head layer) and nothing else: a
k-means init that ran costs none in later steps."""

import contextlib
import copy
import pickle
import warnings

import pytest
import torch

import fastvq
from fastvq.nn import (
    GroupedResidualVQ,
    HouseholderVQ,
    ResidualSimVQ,
    ResidualVQ,
    SimVQ,
    VectorQuantize,
)
from fastvq.ops._backends import backends
from fastvq.ops._validate import NonFiniteError, check_index_range
from fastvq.testing import count_syncs

BACKENDS = ["torch"] + (["cpu"] if backends()["cpu"].available else [])
FINITE = ("tolist", "ops/_validate.py")  # check_finite's one sync


def locations(syncs):
    return [where for _, where in syncs]


def assert_finite_checks(syncs, n: int) -> None:
    assert len(syncs) == n, syncs
    assert all(what == FINITE[0] and where.startswith(FINITE[1]) for what, where in syncs), syncs


def train_step(module, x, **kwargs):
    module.train()
    module(x, **kwargs)  # a first step outside the count (k-means init and such)
    with count_syncs() as syncs:
        out = module(x, **kwargs)
        loss = out[0].square().mean() + out[2].sum()
        loss.backward()
    return syncs


def eval_forward(module, x, **kwargs):
    module.eval()
    with torch.no_grad(), count_syncs() as syncs:
        module(x, **kwargs)
    return syncs


def test_counter_sees_every_kind():
    x = torch.randn(6)
    with count_syncs() as syncs:
        x[0].item()
        bool(x.sum() > 0)
        x.tolist()
        x[x > 0]
        torch.unique(x)
        torch.bincount(torch.tensor([1, 2]), minlength=4)
        f"{x.sum():.3g}"
    kinds = [what for what, _ in syncs]
    assert kinds == ["_local_scalar_dense"] * 2 + ["tolist", "index[mask]", "_unique2"] + [
        "bincount",
        "_local_scalar_dense",
    ]
    assert all("test_host_syncs.py:" in where for where in locations(syncs)), syncs


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops(backend):
    z = torch.randn(97, 16, requires_grad=True)
    codebook = torch.randn(33, 16)
    with count_syncs() as syncs:
        fastvq.nearest_code(z.detach(), codebook, backend=backend)
    assert_finite_checks(syncs, 1)
    with count_syncs() as syncs:
        fastvq.nearest_code(z.detach(), codebook, backend=backend, check_inputs_finite=False)
    assert syncs == []
    for grad in ("ste", "rotation", "householder"):
        with count_syncs() as syncs:
            z_q, idx = fastvq.quantize(z, codebook.requires_grad_(), grad=grad, backend=backend)
            z_q.square().sum().backward()
        assert_finite_checks(syncs, 1)
    cluster_size, embed_sum = torch.ones(33), codebook.detach().clone()
    with count_syncs() as syncs:
        fastvq.ema_update_(cluster_size, embed_sum, z, idx, 0.9, backend=backend)
    with count_syncs() as index_range:  # where check_index_range syncs
        check_index_range("indices", idx, 0, 33)
    assert len(syncs) == 1 and syncs == index_range, syncs
    with count_syncs() as syncs:
        fastvq.ema_update_(
            cluster_size, embed_sum, z, idx, 0.9, backend=backend, check_indices=False
        )
        fastvq.ema_codebook(cluster_size, embed_sum)
    assert syncs == []


MODULES = {
    # name: (constructor, syncs per training step, per eval forward)
    "vq": (lambda b: VectorQuantize(dim=16, codebook_size=64, backend=b), 1, 1),
    "vq_rotation_mask": (
        lambda b: VectorQuantize(dim=16, codebook_size=64, rotation_trick=True, backend=b),
        1,
        1,
    ),
    "vq_heads": (
        lambda b: VectorQuantize(
            dim=16, codebook_size=64, heads=2, separate_codebook_per_head=True, backend=b
        ),
        1,
        1,
    ),
    "vq_heads_sampling": (  # sampled codes: checked too (a NaN row reached the EMA)
        lambda b: VectorQuantize(
            dim=16,
            codebook_size=64,
            heads=2,
            separate_codebook_per_head=True,
            stochastic_sample_codes=True,
            sample_codebook_temp=1.0,
            backend=b,
        ),
        1,
        1,
    ),
    "vq_learnable": (
        lambda b: VectorQuantize(dim=16, codebook_size=64, learnable_codebook=True, backend=b),
        1,
        1,
    ),
    "rvq": (lambda b: ResidualVQ(dim=16, num_quantizers=4, codebook_size=64, backend=b), 1, 1),
    "rvq_shared": (
        lambda b: ResidualVQ(
            dim=16, num_quantizers=4, codebook_size=64, shared_codebook=True, backend=b
        ),
        1,
        1,
    ),
    "rvq_beam": (
        lambda b: ResidualVQ(dim=16, num_quantizers=3, codebook_size=64, beam_size=4, backend=b),
        1,
        1,
    ),
    "grouped_rvq": (
        lambda b: GroupedResidualVQ(
            dim=16, groups=2, num_quantizers=2, codebook_size=64, backend=b
        ),
        1,  # every group at once
        1,
    ),
    "grouped_rvq_beam": (
        lambda b: GroupedResidualVQ(
            dim=16, groups=2, num_quantizers=2, codebook_size=64, beam_size=2, backend=b
        ),
        1,
        1,
    ),
    # k-means init: the first step (outside the count) runs it; later steps do not read
    # `initted` again (a read per step was a sync per step for good).
    "vq_kmeans": (
        lambda b: VectorQuantize(dim=16, codebook_size=64, kmeans_init=True, backend=b),
        1,
        1,
    ),
    "householder_kmeans": (lambda b: HouseholderVQ(16, 64, kmeans_init=True, backend=b), 1, 1),
    "rvq_kmeans": (  # and the stack's one check again, once its layers are known initted
        lambda b: ResidualVQ(
            dim=16, num_quantizers=3, codebook_size=32, kmeans_init=True, backend=b
        ),
        1,
        1,
    ),
    "rvq_kmeans_shared_beam": (
        lambda b: ResidualVQ(
            dim=16,
            num_quantizers=3,
            codebook_size=32,
            kmeans_init=True,
            shared_codebook=True,
            beam_size=2,
            backend=b,
        ),
        1,
        1,
    ),
    "grouped_rvq_kmeans": (
        lambda b: GroupedResidualVQ(
            dim=16, groups=2, num_quantizers=2, codebook_size=32, kmeans_init=True, backend=b
        ),
        1,
        1,
    ),
}


MASKED = ("vq_rotation_mask", "rvq", "rvq_kmeans", "grouped_rvq_kmeans")  # called with a mask
# Beam-search modules: their layers' top-k searches per forward.
BEAM_SEARCHES = {"rvq_beam": 3, "grouped_rvq_beam": 2 * 2, "rvq_kmeans_shared_beam": 3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules(name, backend):
    make, train, evaluate = MODULES[name]
    torch.manual_seed(0)
    module = make(backend)
    x = torch.randn(2, 48, 16, requires_grad=True)
    kwargs = {"mask": torch.rand(2, 48) > 0.3} if name in MASKED else {}
    for syncs, n in (
        (train_step(module, x, **kwargs), train),
        (eval_forward(module, x, **kwargs), evaluate),
    ):
        if name in BEAM_SEARCHES and backend == "torch":
            # The reference top-k's tie fix (fastvq.reference.topk_scores): two nonzero per
            # layer; on GPUs "auto" runs Triton's top-k, which has none.
            ties = [s for s in syncs if s[1].startswith("reference/nearest_code.py")]
            assert len(ties) == 2 * BEAM_SEARCHES[name], syncs
            syncs = [s for s in syncs if s not in ties]
        assert_finite_checks(syncs, n)


@contextlib.contextmanager
def gpu_syncs():
    """The syncs the GPU itself reports (torch.cuda.set_sync_debug_mode): their messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        found = []
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
        found += [str(w.message) for w in caught if "synchronizing" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ops_on_cuda_sync_only_where_counted(backend):
    """count_syncs is blind inside CUDA glue and Triton launchers: on a GPU the ops of test_ops
    make the counted syncs and no others."""
    if not backends()[backend].available:
        pytest.skip(backends()[backend].reason)
    z = torch.randn(97, 16, device="cuda", requires_grad=True)
    codebook = torch.randn(33, 16, device="cuda")
    fastvq.nearest_code(z.detach(), codebook, backend=backend)  # compiled and loaded, untimed
    with gpu_syncs() as found:
        fastvq.nearest_code(z.detach(), codebook, backend=backend)
    assert len(found) == 1, found
    with gpu_syncs() as found:
        fastvq.nearest_code(z.detach(), codebook, backend=backend, check_inputs_finite=False)
        op = (
            torch.ops.fastvq.nearest_code_triton
            if backend == "triton"
            else torch.ops.fastvq.nearest_code
        )
        op(z.detach(), codebook, None, None, False, screen=True)
    assert found == []
    for grad in ("ste", "rotation", "householder"):
        z_q, idx = fastvq.quantize(z, codebook.requires_grad_(), grad=grad, backend=backend)
        z_q.square().sum().backward()
        with gpu_syncs() as found:
            z_q, idx = fastvq.quantize(z, codebook, grad=grad, backend=backend)
            z_q.square().sum().backward()
        assert len(found) == 1, (grad, found)
    cluster_size, embed_sum = torch.ones(33, device="cuda"), codebook.detach().clone()
    fastvq.ema_update_(cluster_size, embed_sum, z, idx, 0.9, backend=backend)
    with gpu_syncs() as found:
        fastvq.ema_update_(cluster_size, embed_sum, z, idx, 0.9, backend=backend)
    assert len(found) == 1, found  # the index range
    with gpu_syncs() as found:
        fastvq.ema_update_(
            cluster_size, embed_sum, z, idx, 0.9, backend=backend, check_indices=False
        )
        fastvq.ema_codebook(cluster_size, embed_sum)
    assert found == []


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_on_cuda_sync_only_where_counted(name):
    """test_modules' training step and eval forward on CUDA tensors ("auto": the Triton kernels),
    counted by the GPU."""
    make, train, evaluate = MODULES[name]
    torch.manual_seed(0)
    module = make("auto").cuda()
    x = torch.randn(2, 48, 16, device="cuda", requires_grad=True)
    kwargs = {"mask": torch.rand(2, 48, device="cuda") > 0.3} if name in MASKED else {}
    module.train()
    module(x, **kwargs)  # k-means init, kernel compiles
    with gpu_syncs() as found:
        out = module(x, **kwargs)
        (out[0].square().mean() + out[2].sum()).backward()
    assert len(found) == train, found
    module.eval()
    with torch.no_grad(), gpu_syncs() as found:
        module(x, **kwargs)
    assert len(found) == evaluate, found


SKIPPABLE = {
    "simvq": lambda: SimVQ(dim=16, codebook_size=64),
    "rvq": lambda: ResidualVQ(dim=16, num_quantizers=3, codebook_size=64),
    "rvq_beam": lambda: ResidualVQ(dim=16, num_quantizers=2, codebook_size=64, beam_size=2),
    "grouped_rvq": lambda: GroupedResidualVQ(dim=16, groups=2, num_quantizers=2, codebook_size=64),
    "residual_simvq": lambda: ResidualSimVQ(dim=16, num_quantizers=2, codebook_size=64),
}


@pytest.mark.parametrize("name", sorted(SKIPPABLE))
def test_layers_whose_check_names_check_inputs_finite_take_it(name):
    """Their NaN error says "pass check_inputs_finite=False": they take it, and then neither
    check nor wait for the GPU (the beam search's reference top-k aside)."""
    module = SKIPPABLE[name]()
    x = torch.randn(2, 24, 16)
    bad = x.index_fill(1, torch.tensor([5]), float("nan"))
    with pytest.raises(NonFiniteError, match="pass check_inputs_finite=False"):
        module(bad)
    module.eval()(bad, check_inputs_finite=False)
    syncs = train_step(SKIPPABLE[name](), x.requires_grad_(), check_inputs_finite=False)
    assert [s for s in syncs if not s[1].startswith("reference/nearest_code.py")] == []


def test_residual_layers_still_check():
    """The stack's one check replaces its layers' own: NaN input or a NaN codebook of any layer
    still raises, before any layer updates its statistics."""
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16)
    x = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        rvq(x.index_fill(1, torch.tensor([3]), float("nan")))
    before = [layer.cluster_size.clone() for layer in rvq.layers]
    with torch.no_grad():
        rvq.layers[2].embed[0, 5, 1] = float("inf")
    for beam in (None, 2):
        with pytest.raises(ValueError, match="codebook contains NaN or Inf"):
            rvq(x, beam_size=beam)
    assert all(
        torch.equal(b, layer.cluster_size) for b, layer in zip(before, rvq.layers, strict=True)
    )
    rvq.eval()
    with pytest.raises(ValueError, match="codebook contains NaN or Inf"):
        rvq(x)


def test_multi_head_layer_still_checks_every_head():
    """The heads' one check covers every head's rows and codebook, before any update."""
    vq = VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True)
    x = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        vq(x.index_fill(2, torch.tensor([7]), float("nan")))  # the last head's rows
    before = vq.cluster_size.clone()
    with torch.no_grad():
        vq.embed[1, 5, 1] = float("inf")
    for mode in (vq.train, vq.eval):
        mode()
        with pytest.raises(ValueError, match="codebook contains NaN or Inf"):
            vq(x)
    assert torch.equal(before, vq.cluster_size)


def test_sampled_codes_are_checked_too():
    """Sampling codes has no search to check its rows: a NaN row reached the EMA codebook."""
    sampling = dict(stochastic_sample_codes=True, sample_codebook_temp=1.0)
    x = torch.randn(2, 10, 8).index_fill(1, torch.tensor([3]), float("nan"))
    for layer in (
        VectorQuantize(dim=8, codebook_size=16, **sampling),
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **sampling),
    ):
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with pytest.raises(ValueError, match="z contains NaN or Inf"):
            layer(x)
        assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
        layer(x, check_inputs_finite=False)  # told not to: it samples (and the EMA takes NaN)


def test_topk_forward_checks_its_rows_unless_told_not_to():
    vq = VectorQuantize(dim=8, codebook_size=16).eval()
    x = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        vq(x.index_fill(1, torch.tensor([4]), float("nan")), topk=2)
    with count_syncs() as syncs:
        vq(x, topk=2)
    assert_finite_checks(syncs, 1)
    with count_syncs() as syncs:
        vq(x, topk=2, check_inputs_finite=False)
    assert syncs == []


def test_residual_stack_leaves_generated_codebooks_and_kmeans_init_to_its_layers():
    """A generated codebook is computed once per layer per forward (the stack's check would
    compute it again); a layer whose k-means init is pending checks its own input, named x."""
    from fastvq.nn.vector_quantize import CodebookMLP

    generator, calls = CodebookMLP(4, 8, embed_dim=4, hidden_dim=8), []
    generator.register_forward_hook(lambda *_: calls.append(None))
    rvq = ResidualVQ(
        dim=8,
        num_quantizers=2,
        codebook_size=4,
        codebook_generator=generator,
        learnable_codebook=True,
        ema_update=False,
    )
    x = torch.randn(2, 10, 8)
    for mode in (rvq.train, rvq.eval):
        mode()
        calls.clear()
        rvq(x)
        assert len(calls) == 2
        for beam in (None, 2):  # the stack does not check: its layers must
            with pytest.raises(ValueError, match="NaN or Inf"):
                rvq(x.index_fill(1, torch.tensor([3]), float("nan")), beam_size=beam)
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, kmeans_init=True)
    with pytest.raises(ValueError, match="^x contains NaN or Inf"):
        rvq(x.index_fill(1, torch.tensor([3]), float("nan")))
    assert not rvq.layers[0].initted


def test_grouped_generated_codebooks_skip_every_check_when_told():
    """Groups whose layers check themselves (a generated codebook) skip those checks too under
    check_inputs_finite=False: no error on NaN rows, no wait for the GPU."""
    from fastvq.nn.vector_quantize import CodebookMLP

    grouped = GroupedResidualVQ(
        dim=16,
        groups=2,
        num_quantizers=2,
        codebook_size=4,
        codebook_generator=CodebookMLP(4, 8, embed_dim=4, hidden_dim=8),
        learnable_codebook=True,
        ema_update=False,
    ).eval()
    bad = torch.randn(2, 10, 16).index_fill(1, torch.tensor([3]), float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        grouped(bad)
    assert eval_forward(grouped, bad, check_inputs_finite=False) == []


def test_residual_stack_in_eval_checks_once_before_any_init():
    """Eval forwards never run the k-means init: a stack whose layers are not known initted
    (fresh, or just loaded, as load_tokenizer's) still checks once, not once per layer."""
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, kmeans_init=True)
    assert_finite_checks(eval_forward(rvq, torch.randn(2, 10, 8)), 1)


def test_residual_stack_checks_float64_rows_as_the_float32_it_searches():
    """1e39 is finite in float64 and Inf in the float32 search: the stack's check, which lets its
    layers skip theirs, must see the float32 value."""
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    x[0, 3, 1] = 1e39
    with pytest.raises(NonFiniteError, match="^z contains NaN or Inf"):
        rvq(x)


def test_decoding_a_stack_checks_its_indices_once():
    """indices -> codes: one range check for the whole stack, not one more per layer."""
    indices = torch.randint(-1, 64, (2, 10, 4))
    for rvq in (
        ResidualVQ(dim=16, num_quantizers=4, codebook_size=64),
        ResidualSimVQ(dim=16, num_quantizers=4, codebook_size=64),
    ):
        for decode in (rvq.get_codes_from_indices, rvq.get_output_from_indices):
            with count_syncs() as syncs:
                decode(indices)
            assert [where.split(":")[0] for _, where in syncs] == ["nn/residual.py"], syncs


def _kmeans_inits(vq) -> list:
    """A list that grows by one at each k-means init of vq (its _kmeans_into_state)."""
    calls, kmeans = [], vq._kmeans_into_state

    def counted(*args):
        calls.append(None)
        return kmeans(*args)

    vq._kmeans_into_state = counted
    return calls


def _restore_buffers(module, saved):
    """The trainer's meta step: every buffer written back in place with its saved value."""
    with torch.no_grad():
        for b, value in zip(module.buffers(), saved, strict=True):
            b.copy_(value)


@pytest.mark.parametrize(
    "write",
    [
        "load_state_dict",
        "load_state_dict_assign",
        "fill_",
        "new_buffer",
        "new_buffer_same_version",
        "restore",
    ],
)
def test_kmeans_init_sees_initted_written_false(write):
    """Once its init ran, a layer stops reading `initted` (a host sync per step), yet a False
    written by load_state_dict (in place or assigned), by hand (fill_, a new tensor) or by the
    trainer's meta step (its buffers put back in place) re-runs the init at the next training
    forward, and only there: eval forwards still leave the codebook alone."""
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True)
    fresh = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True).state_dict()
    saved = [b.clone() for b in vq.buffers()]
    inits = _kmeans_inits(vq)
    x = torch.randn(2, 40, 8)
    vq(x)
    with count_syncs() as syncs:
        vq(x)
    assert_finite_checks(syncs, 1)
    assert len(inits) == 1
    if write == "load_state_dict":
        vq.load_state_dict(fresh)
    elif write == "load_state_dict_assign":
        vq.load_state_dict(fresh, assign=True)
    elif write == "fill_":
        with torch.no_grad():
            vq.initted.fill_(False)
    elif write == "new_buffer":
        vq.initted = torch.tensor(False)
    elif write == "new_buffer_same_version":  # the version alone cannot tell them apart
        flag = torch.tensor(False)
        while flag._version < vq.initted._version:
            flag.fill_(False)
        vq.initted = flag
    else:
        _restore_buffers(vq, saved)
    assert not vq.initted
    vq.eval()(x)
    assert len(inits) == 1 and not vq.initted
    vq.train()(x)
    assert len(inits) == 2 and vq.initted and vq.embed.abs().sum() > 0
    with count_syncs() as syncs:
        vq(x)
    assert_finite_checks(syncs, 1)
    assert len(inits) == 2


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_layer_reads_initted_afresh(how):
    """A copy's `initted` starts a new version counter: the original's record of it (known True
    at version v) must not carry over, or v writes of False in the copy went unseen."""
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True)
    x = torch.randn(2, 40, 8)
    vq.load_state_dict(vq.state_dict())  # a version of 2 after the init: a copy's starts at 1
    vq(x)
    version = vq.initted._version
    m = copy.deepcopy(vq) if how == "deepcopy" else pickle.loads(pickle.dumps(vq))
    inits = _kmeans_inits(m)
    with torch.no_grad():
        m.initted.fill_(False)
        while m.initted._version < version:
            m.initted.fill_(False)
    m(x)
    assert len(inits) == 1 and m.initted


def test_loaded_initted_true_is_read_once():
    """A state dict whose `initted` is True: no init, one read of the loaded flag at the load
    (not in the next training step, where compiled it was a graph break), none after; casts
    keep the init."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 8)
    trained = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True)
    trained(x)
    vq = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True)
    inits = _kmeans_inits(vq)
    with count_syncs() as syncs:
        vq.load_state_dict(trained.state_dict())
    assert [s[0] for s in syncs] == ["_local_scalar_dense"], syncs
    for _ in range(2):
        with count_syncs() as syncs:
            vq(x)
        assert_finite_checks(syncs, 1)
    vq.double()(x.double())
    vq.float()(x)
    assert not inits


def test_kmeans_init_in_inference_mode():
    """A module built under inference_mode (its `initted` an inference tensor, which has no
    version counter) still initializes once."""
    with torch.inference_mode():
        vq = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True)
        inits = _kmeans_inits(vq)
        x = torch.randn(2, 40, 8)
        for _ in range(2):
            vq(x)
    assert len(inits) == 1 and vq.initted


def test_residual_stack_rereads_a_loaded_initted():
    """ResidualVQ after load_state_dict: the layer loaded with initted False re-runs its init, the
    others do not; the stack's one check waits until every layer is known initted again."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, kmeans_init=True)
    inits = [_kmeans_inits(layer) for layer in rvq.layers]
    x = torch.randn(2, 40, 8)
    rvq(x)
    state = rvq.state_dict()
    state["layers.1.initted"] = torch.tensor(False)
    with count_syncs() as syncs:
        rvq.load_state_dict(state)
    assert len(syncs) == 3, syncs  # every layer's loaded initted, once, at the load
    with count_syncs() as syncs:
        rvq(x)
    assert [len(i) for i in inits] == [1, 2, 1]
    reads = [s for s in syncs if s[1].startswith("nn/vector_quantize.py")]
    assert len(reads) == 1, syncs  # layer 1's False, before its init
    with count_syncs() as syncs:
        rvq(x)
    assert_finite_checks(syncs, 1)
    assert [len(i) for i in inits] == [1, 2, 1]


def test_grouped_stack_checks_every_group_at_once():
    """GroupedResidualVQ's one check covers every group's rows (after its projection) and every
    codebook, names the group, and raises before any group updates its statistics (checked group
    by group, group 0 updated before group 1's NaN raised)."""
    torch.manual_seed(0)
    grouped = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16)
    x = torch.randn(2, 10, 8)
    grouped(x)

    def stats(module):
        return [layer.cluster_size.clone() for rvq in module.rvqs for layer in rvq.layers]

    before = stats(grouped)
    for group in (0, 1):
        bad = x.index_fill(2, torch.tensor([4 * group + 1]), float("nan"))
        for mode, beam in ((grouped.train, None), (grouped.train, 2), (grouped.eval, None)):
            mode()
            with pytest.raises(NonFiniteError, match=f"^z of group {group} contains NaN or Inf"):
                grouped(bad, beam_size=beam)
    grouped.train()
    for group, layer in ((0, 1), (1, 0), (1, 1)):
        broken = copy.deepcopy(grouped)
        with torch.no_grad():
            broken.rvqs[group].layers[layer].embed[0, 3, 1] = float("inf")
        with pytest.raises(NonFiniteError, match=f"^codebook of group {group} contains NaN"):
            broken(x)
        assert all(map(torch.equal, stats(broken), before))
    assert all(map(torch.equal, stats(grouped), before))
    projected = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16,
                                  codebook_dim=3)  # fmt: skip
    with torch.no_grad():
        projected.rvqs[1].project_in.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="^z of group 1 contains NaN or Inf"):
        projected(x)
    pending = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=4,
                                kmeans_init=True)  # fmt: skip
    with pytest.raises(ValueError, match="^x contains NaN or Inf"):  # the layers' own checks
        pending(x.index_fill(2, torch.tensor([5]), float("nan")))
    assert not pending.rvqs[1].layers[0].initted
