"""torch.compile of a small model containing the quantizer layers: no graph break in training or
eval (fullgraph=True), the same outputs, gradients and codebook state as eager (VectorQuantize's
top-k forward and ResidualVQ's beam search included). Few tests: compiling is slow on CPU. Known
breaks, by design: k-means init (the step that runs it, not the later ones), dead-code
replacement, quantize dropout's seed and a Parameter codebook's EMA (orthogonal regulariser)."""

import copy

import pytest
import torch
from torch import nn

import fastvq
from fastvq.nn import (
    BSQ,
    FSQ,
    LFQ,
    E8Quantize,
    LatentQuantize,
    LeechQuantize,
    ResidualFSQ,
    ResidualVQ,
    SimVQ,
    VectorQuantize,
)

DIM = 8


class _Stack(nn.Module):
    """Every layer quantizes the previous one's output; losses add up."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.layers = nn.ModuleList(
            [
                VectorQuantize(DIM, 32, codebook_dim=4, use_cosine_sim=True),  # rotation trick
                ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=16, shared_codebook=True),
                ResidualFSQ(dim=DIM, levels=[5, 5, 5], num_quantizers=2),
                FSQ([5, 5, 5], dim=DIM),
                LFQ(dim=DIM, codebook_size=16),
                SimVQ(DIM, 32),
                E8Quantize(dim=DIM),
                LeechQuantize(dim=DIM),
            ]
        )
        self.latent = LatentQuantize([5, 5, 5], dim=DIM)  # channel-first

    def forward(self, x):
        h, loss, indices = self.proj(x), 0.0, []
        for layer in self.layers:
            out = layer(h)
            h = out[0]
            indices.append(out[1].flatten())
            if len(out) > 2:
                loss = loss + out[2].sum()
        h, idx, latent_loss = self.latent(h.transpose(1, 2))
        return h.square().mean() + loss + latent_loss, torch.cat([*indices, idx.flatten()])


def test_stack_trains_compiled_without_graph_breaks():
    # Training mode: the harder case (EMA updates in the graph); eval takes a subset of its paths.
    torch.manual_seed(0)
    eager = _Stack()
    initial = copy.deepcopy(eager)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    # backend "eager": fullgraph=True is dynamo's check (no graph break), no codegen needed.
    compiled = torch.compile(compiled_model, fullgraph=True, backend="eager")
    for step in range(2):
        x = torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(step))
        want_loss, want_idx = eager(x)
        got_loss, got_idx = compiled(x)
        assert torch.equal(got_idx, want_idx)
        torch.testing.assert_close(got_loss, want_loss)
        want_loss.backward()
        got_loss.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, msg=name)
    # the EMA ran inside the graph
    assert not torch.equal(compiled_model.layers[0].embed, initial.layers[0].embed)


def test_topk_and_beam_search_compile_without_graph_breaks():
    # VectorQuantize.forward(topk=) and ResidualVQ's beam search trace whole (fullgraph=True),
    # in eval and in training (the post-search EMA update of every layer included).
    torch.manual_seed(0)
    eager = nn.ModuleList(
        [
            VectorQuantize(DIM, 32, codebook_dim=4, use_cosine_sim=True),  # rotation trick
            ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=16, beam_size=3),
        ]
    )
    initial = copy.deepcopy(eager)
    compiled_layers = copy.deepcopy(eager)

    def run(layers, x):
        q, idx, loss = layers[0](x, topk=3)
        r, ridx, rloss = layers[1](q[:, :, 1])
        total = q.square().mean() + loss.sum() + r.square().mean() + rloss.sum()
        return total, torch.cat([idx.flatten(), ridx.flatten()])

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    for step, train in enumerate((False, True, True)):
        eager.train(train)
        compiled_layers.train(train)
        x = torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(step))
        want_loss, want_idx = run(eager, x)
        got_loss, got_idx = compiled(compiled_layers, x)
        assert torch.equal(got_idx, want_idx)
        torch.testing.assert_close(got_loss, want_loss)
        want_loss.backward()
        got_loss.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_layers.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    for (name, a), b in zip(eager.state_dict().items(), compiled_layers.state_dict().values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, msg=name)
    # the beam search's EMA ran inside the graph, for the last layer too
    assert not torch.equal(compiled_layers[1].layers[2].embed, initial[1].layers[2].embed)


def test_eval_beam_search_over_a_parameter_codebook_compiles_whole():
    # Only a step that updates the codebook copies it first (the update itself breaks the
    # graph, by design): in eval, beam search over a Parameter codebook traces whole.
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=DIM, num_quantizers=2, codebook_size=16, beam_size=2, orthogonal_reg_weight=0.1
    ).eval()
    x = torch.randn(2, 5, DIM)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(rvq, fullgraph=True, backend="eager")(x)[1], rvq(x)[1])


def test_deliberate_graph_breaks_run_eagerly_under_compile():
    # k-means init, dead-code replacement and quantize dropout's seed are eager islands
    # (fastvq.nn.vector_quantize.eager_only): compiled without fullgraph, the model takes the
    # same steps as eager, and dynamo records the breaks.
    from torch._dynamo.utils import counters

    def make():
        torch.manual_seed(0)
        return nn.ModuleList(
            [
                VectorQuantize(DIM, 16, kmeans_init=True, threshold_ema_dead_code=0.5),
                ResidualVQ(
                    dim=DIM, num_quantizers=3, codebook_size=8, quantize_dropout=True,
                    threshold_ema_dead_code=0.5,
                ),
            ]
        )  # fmt: skip

    def run(layers, x):
        h, idx, loss = layers[0](x)
        r, ridx, rloss = layers[1](h)
        indices = torch.cat([idx.flatten(), ridx.flatten()])
        return r.square().mean() + loss.sum() + rloss.sum(), indices

    eager, compiled_layers = make(), make()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(run, backend="eager")
    for step in range(3):
        x = torch.randn(4, 6, DIM, generator=torch.Generator().manual_seed(step))
        torch.manual_seed(100 + step)  # dead-code rows and the dropout layer draw from it
        want_loss, want_idx = run(eager, x)
        torch.manual_seed(100 + step)
        got_loss, got_idx = compiled(compiled_layers, x)
        assert torch.equal(got_idx, want_idx)
        torch.testing.assert_close(got_loss, want_loss)
    for (name, a), b in zip(eager.state_dict().items(), compiled_layers.state_dict().values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, msg=name)
    assert bool(compiled_layers[0].initted) and counters["graph_break"]


def _summed_outputs(layers: nn.ModuleList):
    return lambda x: sum(m(x)[0].sum() for m in layers)


def _fresh_like(layers: nn.ModuleList) -> nn.ModuleList:
    fresh = copy.deepcopy(layers)
    for m in fresh.modules():
        if isinstance(m, VectorQuantize):
            m.initted.zero_()
    fresh.load_state_dict(layers.state_dict())
    return fresh


def test_kmeans_init_layers_compile_without_breaks_once_initted():
    """The init is an eager island for one step; after it, a training step compiles whole (dynamo
    guards on `initted` having been seen True, no version counter read in the graph), and a
    state dict whose `initted` is False makes the compiled step run the init again."""
    torch.manual_seed(0)
    layers = nn.ModuleList(
        [
            VectorQuantize(DIM, 16, kmeans_init=True),
            ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8, kmeans_init=True),
            ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8, kmeans_init=True, beam_size=2),
        ]
    )

    def run(x):
        return sum(layer(x)[0].square().mean() for layer in layers)

    x = torch.randn(4, 6, DIM)
    run(x)  # the inits, eagerly
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    for step in range(2):
        compiled(torch.randn(4, 6, DIM, generator=torch.Generator().manual_seed(step)))
    state = {k: v.zero_() if k.endswith("initted") else v for k, v in layers.state_dict().items()}
    layers.load_state_dict(state)
    embed = layers[0].embed.clone()
    torch.compile(run, backend="eager")(x)
    initted = [layers[0].initted] + [q.initted for rvq in layers[1:] for q in rvq.layers]
    assert all(bool(t) for t in initted)
    assert not torch.equal(layers[0].embed, embed)  # k-means ran again on x
    # A resumed or copied model: its `initted` is read at the load or copy, so its first compiled
    # step is whole too (it was a graph break into the eager init check: fullgraph failed).
    for fresh in (copy.deepcopy(layers), _fresh_like(layers)):
        torch._dynamo.reset()
        step = torch.compile(_summed_outputs(fresh), fullgraph=True, backend="eager")
        step(x)


def test_import_leaves_dynamo_unloaded():
    # `import fastvq.nn` must not pay for torch._dynamo (1.5 s) until something compiles.
    import subprocess
    import sys

    code = "import sys, fastvq.nn; assert 'torch._dynamo' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dynamic_batch_trains_in_one_graph():
    # torch.compile(dynamic=True): one graph for every batch size, no break. LFQ / BSQ broke the
    # graph on math.isfinite of the SymFloat temperature; beam search recompiled per batch size
    # (its candidate loop over range(M) specialized M).
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = nn.ModuleList(
        [
            LFQ(dim=DIM, codebook_size=16),
            BSQ(dim=DIM, codebook_size=16),
            ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=16, beam_size=2),
        ]
    )
    compiled_layers = copy.deepcopy(eager)

    def run(layers, x):
        outs = [layer(x) for layer in layers]
        loss = sum(q.square().mean() + aux.sum() for q, _, aux in outs)
        return loss, torch.cat([idx.flatten() for _, idx, _ in outs])

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(run, dynamic=True, fullgraph=True, backend="eager")
    for batch in (2, 3, 5):
        x = torch.randn(batch, 6, DIM, generator=torch.Generator().manual_seed(batch))
        want_loss, want_idx = run(eager, x)
        got_loss, got_idx = compiled(compiled_layers, x)
        assert torch.equal(got_idx, want_idx)
        torch.testing.assert_close(got_loss, want_loss)
        got_loss.backward()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(
    "annealed",
    [
        "decay",
        pytest.param(
            "inv_temperature",
            marks=pytest.mark.skipif(
                torch.__version__ < "2.13",
                reason="torch 2.11 specializes the float at an .item() guard of its own",
            ),
        ),
    ],
)
def test_annealed_hyperparameters_compile_once_not_per_value(annealed):
    # A float changed from step to step (LFQ / BSQ's inv_temperature argument, a decay warm-up or
    # a loss weight on the module) becomes a graph input at its second value (dynamo's automatic
    # dynamic), after which no value compiles again, provided it reaches the graph only through
    # torch arithmetic: passed to the entropy and EMA kernels as a float, each value compiled a
    # new graph.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    eager = nn.ModuleList(
        [LFQ(dim=DIM, codebook_size=16), BSQ(dim=DIM, codebook_size=16), VectorQuantize(DIM, 32)]
    )
    compiled_layers = copy.deepcopy(eager)

    def run(layers, x, inv_temperature):
        lfq, bsq, vq = layers
        outs = [lfq(x, inv_temperature), bsq(x, inv_temperature), vq(x)]
        loss = sum(q.square().mean() + aux.sum() for q, _, aux in outs)
        return loss, torch.cat([idx.flatten() for _, idx, _ in outs])

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # the scalars become tensors in AOTAutograd
    compiled = torch.compile(run, fullgraph=True, backend=counter)
    for step, value in enumerate([0.5, 0.8, 0.9] * 2):
        inv_temperature = 100 * value if annealed == "inv_temperature" else 100.0
        decay = value if annealed == "decay" else 0.8
        for vq in (eager[2], compiled_layers[2]):
            vq.decay, vq.commitment_weight = decay, 1 - decay
        x = torch.randn(4, 6, DIM, generator=torch.Generator().manual_seed(step))
        x.requires_grad_()
        want_loss, want_idx = run(eager, x, inv_temperature)
        got_loss, got_idx = compiled(compiled_layers, x, inv_temperature)
        assert torch.equal(got_idx, want_idx)
        torch.testing.assert_close(got_loss, want_loss)
        (want_grad,) = torch.autograd.grad(want_loss, x)
        (got_grad,) = torch.autograd.grad(got_loss, x)
        torch.testing.assert_close(got_grad, want_grad)
    for (name, a), b in zip(eager.state_dict().items(), compiled_layers.state_dict().values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, msg=name)
    assert counter.frame_count == 2


def test_export_with_dynamic_batch_saves_and_loads(tmp_path):
    # torch.export in eval with a dynamic batch: the program runs other batch sizes with eager's
    # indices and values, and survives save / load (LFQ returns a namedtuple: it needs a
    # registered name); a fresh process loads it after `import fastvq` alone (the lattice ops are
    # defined in Python, in fastvq.lattice).
    import subprocess
    import sys

    torch.manual_seed(0)
    layers = {
        "vq": VectorQuantize(DIM, 32, codebook_dim=4, use_cosine_sim=True),
        "beam": ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=16, beam_size=2),
        "lfq": LFQ(dim=DIM, codebook_size=16),
        "leech": LeechQuantize(dim=DIM),
    }
    x, x2 = torch.randn(4, 6, DIM), torch.randn(7, 6, DIM)
    for name, layer in layers.items():
        layer.eval()
        program = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
        path = tmp_path / f"{name}.pt2"
        torch.export.save(program, path)
        with torch.no_grad():
            want = layer(x2)
            for got in (program.module()(x2), torch.export.load(path).module()(x2)):
                assert torch.equal(got[1], want[1]), name
                torch.testing.assert_close(got[0], want[0], msg=name)
    torch.save(x2, tmp_path / "x2.pt")
    code = (
        "import sys, torch, fastvq; d = sys.argv[1]; "
        "q, idx, _ = torch.export.load(d + '/leech.pt2').module()(torch.load(d + '/x2.pt')); "
        "torch.save(idx, d + '/idx.pt')"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert torch.equal(torch.load(tmp_path / "idx.pt"), layers["leech"](x2)[1])


def test_export_saves_and_loads_the_returned_namedtuples(tmp_path):
    # Each namedtuple a forward returns needs its own registered name to be saved, and loads as
    # its own class: LFQ's and VectorQuantize's LossBreakdown (one class name, two modules), and
    # the Tokenizer's output.
    from fastvq.models import Tokenizer

    torch.manual_seed(0)
    x = torch.randn(2, 6, DIM)
    conv, deconv = nn.Conv2d(3, 2, 2, stride=2), nn.ConvTranspose2d(2, 3, 2, stride=2)
    cases = {
        "lfq": (LFQ(dim=DIM, codebook_size=16), x, {"return_loss_breakdown": True}),
        "vq": (VectorQuantize(DIM, 16), x, {"return_loss_breakdown": True}),
        "tokenizer": (Tokenizer(conv, FSQ(levels=[3, 3]), deconv), torch.rand(2, 3, 8, 8), {}),
    }
    for name, (layer, inp, kwargs) in cases.items():
        layer.eval()
        path = tmp_path / f"{name}.pt2"
        torch.export.save(torch.export.export(layer, (inp,), kwargs=kwargs), path)
        with torch.no_grad():
            want, got = layer(inp, **kwargs), torch.export.load(path).module()(inp, **kwargs)
        assert [type(o) for o in (got, *got)] == [type(o) for o in (want, *want)], name
        torch.testing.assert_close(got, want, msg=name)


def test_export_leaves_eager_calls_real_tensors():
    # FSQ's radix tables were cached on first use: built while a non-strict export traced the
    # layer, they were fake tensors, and every later eager call with those levels returned
    # FakeTensors of symbols. Levels no other test uses: the export is their first use.
    from torch._subclasses.fake_tensor import FakeTensor

    torch.manual_seed(0)
    layer = ResidualFSQ(dim=6, levels=[11, 9, 7], num_quantizers=2).eval()
    x = torch.randn(3, 5, 6)
    program = torch.export.export(layer, (x,), strict=False)
    q, idx = layer(x)
    assert not isinstance(idx, FakeTensor) and not isinstance(q, FakeTensor)
    want_q, want_idx = program.module()(x)
    assert torch.equal(idx, want_idx) and torch.equal(q, want_q)
    codes = fastvq.fsq_codes(idx[..., 0], [11, 9, 7])
    assert type(codes) is torch.Tensor


def test_random_projection_loss_compiles_once_for_every_batch_size():
    # The cross-entropy's row chunks specialized N: a recompile per batch size, and an export
    # with a dynamic batch failed ("Constraints violated").
    from torch._dynamo.testing import CompileCounter

    from fastvq.nn import RandomProjectionQuantizer

    torch.manual_seed(0)
    m = RandomProjectionQuantizer(dim=DIM, codebook_size=32, codebook_dim=4)
    counter = CompileCounter()
    loss = torch.compile(lambda x, t: m(x, t), dynamic=True, backend=counter)
    for b in (2, 3, 5):
        x = torch.randn(b, 5, DIM)
        torch.testing.assert_close(loss(x, m(x)), m(x, m(x)))
    assert counter.frame_count == 1
    x, batch = torch.randn(2, 5, DIM), torch.export.Dim("b")
    program = torch.export.export(m, (x, m(x)), dynamic_shapes=({0: batch}, {0: batch}))
    x = torch.randn(4, 5, DIM)
    torch.testing.assert_close(program.module()(x, m(x)), m(x, m(x)))
