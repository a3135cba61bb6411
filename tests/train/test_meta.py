"""MQVAE's one-step-unrolled hypergradient against finite differences of the unrolled objective,
and a few meta-enabled trainer steps."""

import pytest
import torch

from fastvq.train.meta import hypergradient, split_parameters


def _problem():
    """A tiny bi-level problem in float64 with a genuine psi-w coupling (so the indirect term is
    not zero): lower w (3,) and W (2, 3), upper psi (4,) and c (2,)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    psi = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(data, w, m, psi, c):
        h = torch.tanh(data @ w[:, None] * psi[:3] + psi[3])  # (5, 3)
        return (h @ m.T - c).square().mean() + 0.1 * (w * psi[:3]).square().sum()

    return a, b, (w, m), (psi, c), loss


def _unrolled(a, b, lower, upper, loss, xi):
    """L_val(w - xi grad_w L_train(w, psi), psi) as a function of psi, exactly (autograd)."""
    gw = torch.autograd.grad(loss(a, *lower, *upper), lower, create_graph=True)
    stepped = [p - xi * g for p, g in zip(lower, gw, strict=True)]
    return loss(b, *stepped, *upper)


@pytest.mark.parametrize("xi", [0.0, 0.3])
def test_hypergradient_matches_finite_differences(xi):
    a, b, lower, upper, loss = _problem()
    before = [p.detach().clone() for p in lower]
    grads, logs = hypergradient(
        lower, upper, lambda: loss(a, *lower, *upper), lambda: loss(b, *lower, *upper),
        inner_lr=xi, fd_eps=1e-5,
    )  # fmt: skip
    assert all(torch.equal(p, q) for p, q in zip(lower, before, strict=True))  # restored exactly
    # Central differences of the unrolled objective in every coordinate of psi and c.
    h = 1e-6
    for p, grad in zip(upper, grads, strict=True):
        assert grad.shape == p.shape and grad.dtype == p.dtype
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += h
            up = _unrolled(a, b, lower, upper, loss, xi).item()
            with torch.no_grad():
                p.view(-1)[i] -= 2 * h
            down = _unrolled(a, b, lower, upper, loss, xi).item()
            with torch.no_grad():
                p.view(-1)[i] += h
            fd.view(-1)[i] = (up - down) / (2 * h)
        torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)
    if xi > 0:
        # The second-order (indirect) term matters here: dropping it would fail the check above.
        assert logs["indirect_norm"] > 1e-3 * logs["direct_norm"]
    else:
        assert logs["indirect_norm"] == 0


def test_hypergradient_finite_difference_passes():
    """The two finite-difference passes run fd_loss (the trainer's float32 closure under bf16)
    and draw the same dropout masks: with dropout in the loss, the indirect term stays put as
    fd_eps shrinks (independent masks would add a difference of order 1 / fd_eps)."""
    a, b, lower, upper, loss = _problem()
    calls = []

    def fd_loss():
        calls.append(1)
        return loss(a, *lower, *upper)

    plain, _ = hypergradient(lower, upper, lambda: loss(a, *lower, *upper), inner_lr=0.3)
    via, _ = hypergradient(
        lower, upper, lambda: loss(a, *lower, *upper), None, 0.3, fd_loss=fd_loss
    )
    assert len(calls) == 2
    for p, q in zip(plain, via, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    def dropped():
        h = torch.nn.functional.dropout(torch.tanh(a @ lower[0][:, None] * upper[0][:3]), 0.5)
        return (h @ lower[1].T - upper[1]).square().mean()

    def indirect(eps):
        torch.manual_seed(0)  # the same masks in both calls' passes
        return hypergradient(lower, upper, dropped, inner_lr=0.3, fd_eps=eps)[1]["indirect_norm"]

    coarse, fine = indirect(1e-3).item(), indirect(1e-5).item()
    assert coarse > 0 and fine == pytest.approx(coarse, rel=1e-2)


def test_hypergradient_errors():
    a, b, lower, upper, loss = _problem()
    with pytest.raises(ValueError, match="at least one"):
        hypergradient([], upper, lambda: loss(a, *lower, *upper))
    with pytest.raises(ValueError, match="fd_eps"):
        hypergradient(lower, upper, lambda: loss(a, *lower, *upper), fd_eps=0.0)


def test_meta_trainer_steps_update_the_hyper_net(make_config, datasets):
    from fastvq.train.trainer import Trainer

    cfg = make_config(
        "model.quantizer={type: HyperCodebook, codebook_size: 16, codebook_dim: 8, embed_dim: 4,"
        " hidden_dim: 8}",
        "meta.enabled=true",
        "meta.codebook_every=2",
        "meta.inner_lr=1e-2",
        "train.steps=4",
    )
    trainer = Trainer(cfg, datasets=datasets)
    lower, upper = split_parameters(trainer.model)
    assert {id(p) for p in upper} == {id(p) for p in trainer.model.quantizer.parameters()}
    assert not {id(p) for p in upper} & {id(p) for g in trainer.opt.param_groups
                                          for p in g["params"]}  # fmt: skip
    calls = []
    step = trainer._meta_step
    trainer._meta_step = lambda batches: (calls.append(trainer.step), step(batches))
    psi0 = [p.detach().clone() for p in upper]
    result = trainer.fit()
    assert calls == [0, 2]  # one upper step per codebook_every lower steps
    assert all(not torch.equal(p, q) for p, q in zip(upper, psi0, strict=True))
    assert all(torch.isfinite(torch.tensor(result["history"])))


def test_meta_step_overfits_the_same_batch(make_config, datasets):
    """train.overfit_one_batch: the hypergradient step takes the fixed batch too (its first step
    drew a batch of its own before the fixed one was taken: 16 items, two batches)."""
    from fastvq.train.trainer import Trainer

    cfg = make_config(
        "model.quantizer={type: HyperCodebook, codebook_size: 16, codebook_dim: 8, embed_dim: 4,"
        " hidden_dim: 8}",
        "meta.enabled=true",
        "train.overfit_one_batch=true",
    )
    trainer = Trainer(cfg, datasets=datasets)
    batches = trainer._batches()
    for _ in range(2):
        trainer.train_step(batches)
    assert trainer.items == 8


def test_meta_trainer_clips_only_what_its_optimizer_steps(make_config, datasets, monkeypatch):
    # The hyper-net's gradients from the lower step are discarded: they must not weigh in the
    # clipping norm of the encoder-decoder (nor in the logged grad_norm).
    from fastvq.train.trainer import Trainer

    cfg = make_config(
        "model.quantizer={type: HyperCodebook, codebook_size: 16, codebook_dim: 8, embed_dim: 4,"
        " hidden_dim: 8}",
        "meta.enabled=true",
        "optim.grad_clip=1.0",
        "train.steps=1",
    )
    trainer = Trainer(cfg, datasets=datasets)
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda ps, c: clipped.append(list(ps)) or clip(ps, c)
    )
    trainer.fit()
    stepped = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    assert clipped and all({id(p) for p in ps} == stepped for ps in clipped)


def test_meta_step_leaves_the_buffers_alone(make_config, datasets):
    # An EMA quantizer with trainable projections (the upper level): the hypergradient's passes,
    # two at perturbed weights, must not move its EMA codebook or usage counts; the lower step's
    # own pass does, once.
    from fastvq.train.trainer import Trainer

    cfg = make_config(
        "model.quantizer={type: VectorQuantize, codebook_size: 16, decay: 0.8, codebook_dim: 4}",
        "meta.enabled=true",
    )
    trainer = Trainer(cfg, datasets=datasets)
    _, upper = split_parameters(trainer.model)
    buffers = {n: b.clone() for n, b in trainer.model.named_buffers()}
    psi0 = [p.detach().clone() for p in upper]
    batches = trainer._batches()
    trainer.model.train()
    trainer._meta_step(batches)
    assert any(not torch.equal(p, q) for p, q in zip(upper, psi0, strict=True))
    for name, b in trainer.model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    trainer.train_step(batches)  # the lower step still updates the EMA codebook
    assert not torch.equal(trainer.model.quantizer.embed, buffers["quantizer.embed"])


def test_meta_step_changes_the_codebook_by_its_optimizer_only(make_config, datasets):
    # A learnable codebook whose every code is dead (threshold 100): the hypergradient's passes
    # replace codes in place, which must not outlive them. At learning rate 0 the meta step then
    # leaves the codebook as it was.
    from fastvq.train.trainer import Trainer

    quantizer = ("{type: VectorQuantize, codebook_size: 16, ema_update: false, "
                 "learnable_codebook: true, threshold_ema_dead_code: 100}")  # fmt: skip
    trainer = Trainer(make_config(f"model.quantizer={quantizer}", "meta.enabled=true"),
                      datasets=datasets)  # fmt: skip
    codebook = trainer.model.quantizer.embed
    before = codebook.detach().clone()
    trainer.meta_opt.param_groups[0]["lr"] = 0.0
    trainer.model.train()
    trainer._meta_step(trainer._batches())
    assert torch.equal(codebook, before)
    trainer.train_step(trainer._batches())  # the lower step's pass replaces them
    assert not torch.equal(codebook, before)


def test_meta_optimizer_applies_no_weight_decay(make_config, datasets):
    # MQVAE: "No weight decay is applied to the quantizer". AdamW's default is 0.01; the
    # encoder-decoder keeps optim.weight_decay on its matrices.
    from fastvq.train.trainer import Trainer

    cfg = make_config(
        "model.quantizer={type: HyperCodebook, codebook_size: 16, codebook_dim: 8, embed_dim: 4,"
        " hidden_dim: 8}",
        "meta.enabled=true",
        "optim.weight_decay=0.1",
    )
    trainer = Trainer(cfg, datasets=datasets)
    assert [g["weight_decay"] for g in trainer.meta_opt.param_groups] == [0.0]
    assert [g["weight_decay"] for g in trainer.opt.param_groups] == [0.1, 0.0]


def test_hyper_codebook_projections_are_lower_level(make_config):
    # dim 8 != codebook_dim 4: project_in / project_out map latents into code space and back,
    # part of the encoder-decoder; psi is the hyper-net and its embedding (MQVAE section 4.1).
    from fastvq.models import build_tokenizer

    cfg = make_config(
        "model.quantizer={type: HyperCodebook, codebook_size: 16, codebook_dim: 4, embed_dim: 4,"
        " hidden_dim: 8}",
    )
    model = build_tokenizer(cfg["model"])
    assert model.quantizer.has_projections
    lower, upper = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in upper) == sorted(
        f"quantizer.codebook_generator.{n}"
        for n, _ in model.quantizer.codebook_generator.named_parameters()
    )
    lower_names = {names[id(p)] for p in lower}
    assert {"quantizer.project_in.weight", "quantizer.project_out.weight"} <= lower_names
    assert len(lower) + len(upper) == len(list(model.parameters()))


def test_resuming_a_run_written_before_the_projection_split_names_the_way_out(
    make_config, datasets, monkeypatch
):
    # Before the split, a HyperCodebook's projections trained with the meta optimizer: such a
    # checkpoint's optimizers hold other parameter groups than this run's, and torch's bare
    # "doesn't match the size of optimizer's group" left the user guessing.
    import fastvq.train.meta as meta
    from fastvq.train.trainer import Trainer

    cfg = make_config(
        "model.quantizer={type: HyperCodebook, codebook_size: 16, codebook_dim: 4, embed_dim: 4,"
        " hidden_dim: 8}",
        "meta.enabled=true",
        "train.steps=1",
    )

    def old_split(tokenizer):
        upper = [p for p in tokenizer.quantizer.parameters() if p.requires_grad]
        ids = {id(p) for p in upper}
        return [p for p in tokenizer.parameters() if id(p) not in ids], upper

    with monkeypatch.context() as m:
        m.setattr(meta, "split_parameters", old_split)
        Trainer(cfg, datasets=datasets).fit()
    with pytest.raises(
        ValueError, match=r"its opt optimizer holds other parameters .* init\.checkpoint"
    ):
        Trainer({**cfg, "train": {**cfg["train"], "steps": 2}}, datasets=datasets)


def test_meta_needs_a_quantizer_with_parameters(make_config, datasets):
    from fastvq.train.trainer import Trainer

    cfg = make_config("meta.enabled=true")  # the EMA VectorQuantize: its codebook is a buffer
    with pytest.raises(ValueError, match="meta.enabled needs a quantizer with trainable"):
        Trainer(cfg, datasets=datasets)


def test_meta_trainer_descends_the_hypergradient(make_config, datasets, monkeypatch):
    """The upper step moves the hyper-net against its hypergradient: AdamW's first step from the
    returned gradient g is psi (1 - lr wd) - lr g / (|g| + eps), at the warmup learning rate; the
    hyper-net's schedule advances with the main one."""
    from fastvq.models import build_tokenizer
    from fastvq.train import meta
    from fastvq.train.trainer import Trainer

    lr = 2e-3
    cfg = make_config(
        "model.quantizer={type: HyperCodebook, codebook_size: 16, codebook_dim: 8, embed_dim: 4,"
        " hidden_dim: 8}",
        "meta.enabled=true",
        "meta.inner_lr=1e-2",
        f"optim.lr={lr}",
        "optim.warmup_steps=2",
        "train.steps=3",
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, model=build_tokenizer(cfg["model"]).double(), datasets=datasets)
    _, upper = split_parameters(trainer.model)
    returned = []
    hypergradient = meta.hypergradient

    def recorded(*args, **kwargs):
        grads, logs = hypergradient(*args, **kwargs)
        returned.append([g.clone() for g in grads])
        return grads, logs

    monkeypatch.setattr(meta, "hypergradient", recorded)
    psi0 = [p.detach().clone() for p in upper]
    g = torch.Generator().manual_seed(3)
    xs = [torch.rand(8, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(4)]
    trainer.train_step(iter(xs[:2]))  # one batch for the upper step, one for the lower
    assert len(returned) == 1
    group = trainer.meta_opt.param_groups[0]
    step_lr, wd, eps = lr / 2, group["weight_decay"], group["eps"]
    moved = 0
    for p, p0, grad in zip(upper, psi0, returned[0], strict=True):
        want = p0 * (1 - step_lr * wd) - step_lr * grad / (grad.abs() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12)
        moved += int((grad.abs() > 1e-6).sum())
    assert moved > 0
    trainer.step = 1
    trainer.train_step(iter(xs[2:]))
    assert trainer.meta_opt.param_groups[0]["lr"] == trainer.opt.param_groups[0]["lr"] != lr / 2


def test_finite_difference_step_moves_w_by_fd_eps_in_norm():
    """DARTS' step: the two finite-difference passes run at w +- r v with r = fd_eps / |v|, so w
    moves by exactly fd_eps in norm whatever the scale of v."""
    a, b, lower, upper, loss = _problem()
    w0 = [p.detach().clone() for p in lower]
    moves = []

    def fd_loss():
        step = [(p - q).flatten() for p, q in zip(lower, w0, strict=True)]
        moves.append(torch.linalg.vector_norm(torch.cat(step)))
        return loss(a, *lower, *upper)

    for scale in (1.0, 50.0):  # |v| grows with the loss's scale; the step must not
        moves.clear()
        hypergradient(
            lower, upper, lambda: loss(a, *lower, *upper),
            lambda s=scale: s * loss(b, *lower, *upper), inner_lr=0.3, fd_eps=1e-3,
            fd_loss=fd_loss,
        )  # fmt: skip
        assert len(moves) == 2
        assert [m.item() for m in moves] == pytest.approx([1e-3, 1e-3], rel=1e-9)
