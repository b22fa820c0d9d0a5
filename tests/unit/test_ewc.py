"""EWC plugin: the penalty, its gradient and the Fisher against hand formulas; saved state; config."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from keel.config import EwcConfig
from keel.mitigation import build, ewc
from keel.mitigation.base import Mitigation
from keel.train.step import train_step

from tests.conftest import compose

IGNORE = -100
V = 5  # toy vocabulary


class Bigram(torch.nn.Module):
    """Toy LM: the logits of the next token are a learned row per current token."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, position_ids=None):
        return SimpleNamespace(logits=self.table[input_ids])


SEQUENCES = [  # (input_ids, targets): pre-shifted targets, -100 not trained
    (np.array([0, 1, 2, 3]), np.array([1, 2, 3, IGNORE])),
    (np.array([2, 2, 4]), np.array([IGNORE, 4, IGNORE])),
    (np.array([4, 0, 1, 1, 3]), np.array([0, 1, 1, 3, IGNORE])),
]


def _analytic_grad(table: torch.Tensor, ids: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    """d(token-mean NLL)/d table: (softmax(row) − onehot(target)) / n on the row of each trained token."""
    grad = torch.zeros_like(table, dtype=torch.float64)
    trained = [(i, t) for i, t in zip(ids, targets) if t != IGNORE]
    for i, t in trained:
        onehot = torch.nn.functional.one_hot(torch.tensor(t), V)
        grad[i] += (torch.softmax(table[i].double(), 0) - onehot) / len(trained)
    return grad


def test_fisher_is_the_mean_of_squared_per_sequence_gradients():
    model = Bigram()

    def backward(seq):
        model.zero_grad()
        ewc.sequence_nll(model, *seq).backward()

    (fisher,) = ewc.mean_squared_grads(SEQUENCES, backward, lambda: [model.table.grad])
    grads = [_analytic_grad(model.table.detach(), *seq) for seq in SEQUENCES]
    want = sum(g**2 for g in grads) / len(grads)
    torch.testing.assert_close(fisher.double(), want, rtol=1e-6, atol=1e-9)
    batch_mean_squared = (sum(grads) / len(grads)) ** 2
    assert (want - batch_mean_squared).abs().max() > 1e-3  # per-sequence, not a batch gradient squared


def test_dot64_sums_across_chunks_in_float64():
    a, b = torch.rand(1000, generator=torch.Generator().manual_seed(3)), torch.rand(1000)
    want = float((a.double() * b.double()).sum())
    assert ewc.dot64(a, b, chunk=64) == pytest.approx(want, rel=1e-12)
    assert ewc.dot64(a.reshape(10, 100), b.reshape(10, 100)) == pytest.approx(want, rel=1e-12)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _setup(lam: float) -> tuple[torch.nn.Module, list, list]:
    """A net moved away from its anchor, and a random non-negative Fisher."""
    net = _net()
    anchor = [p.detach().clone() for p in net.parameters()]
    gen = torch.Generator().manual_seed(1)
    fisher = [torch.rand(p.shape, generator=gen) for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return net, fisher, anchor


def _hand_penalty(params, fisher, anchor, lam):
    return lam / 2 * sum((f.double() * (p.double() - a.double()) ** 2).sum() for p, f, a in zip(params, fisher, anchor))


def test_penalty_and_its_gradient_match_the_hand_formula():
    lam = 3.0
    net, fisher, anchor = _setup(lam)
    params = list(net.parameters())
    total, grads = ewc.penalty_terms(fisher, [p.detach() for p in params], anchor, lam)
    hand = _hand_penalty(params, fisher, anchor, lam)
    assert lam / 2 * total == pytest.approx(hand.item(), rel=1e-6) and total > 0
    want = torch.autograd.grad(hand, params)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    zero, zero_grads = ewc.penalty_terms(fisher, anchor, anchor, lam)
    assert zero == 0 and all(not g.any() for g in zero_grads)


def test_after_backward_adds_the_penalty_gradient_to_the_loss_gradient(monkeypatch):
    """The plugin's hook, with the ZeRO-3 partition accessors swapped for whole local tensors."""
    monkeypatch.setattr(ewc, "local_param", lambda p: p.detach().reshape(-1))
    monkeypatch.setattr(ewc, "local_grad", lambda p: p.grad.reshape(-1).clone())
    monkeypatch.setattr(ewc, "set_local_grad", lambda p, v: p.grad.copy_(v.reshape(p.shape)))
    lam = 2.5
    net, fisher, anchor = _setup(lam)
    params = list(net.parameters())
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    loss = net(x).square().mean()
    want = torch.autograd.grad(loss.double() + _hand_penalty(params, fisher, anchor, lam), params, retain_graph=True)
    loss.backward()
    plugin = ewc.Ewc(EwcConfig(lam=lam))
    plugin.params, plugin.fisher = params, [f.reshape(-1) for f in fisher]
    plugin.anchor = [a.reshape(-1) for a in anchor]
    out = plugin.after_backward(engine=None)
    assert out["ewc_penalty"] == pytest.approx(_hand_penalty(params, fisher, anchor, lam).item(), rel=1e-6)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-8)


class _Engine:
    """Records the calls train_step makes; the loss is a bigram model's."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.model = Bigram()
        self.lr_scheduler = SimpleNamespace(get_last_lr=lambda: [0.1])

    device = torch.device("cpu")

    def __call__(self, input_ids, position_ids, **attention_kwargs):
        self.calls.append("forward")
        return self.model(input_ids)

    def backward(self, loss, scale_wrt_gas):
        self.calls.append("backward")

    def step(self):
        self.calls.append("step")

    def get_global_grad_norm(self):
        return 1.0


class _Probe(Mitigation):
    def after_backward(self, engine):
        engine.calls.append("after_backward")
        return {"probe": 7.0}


def test_after_backward_runs_once_between_the_last_backward_and_the_step():
    cfg = compose("trainer.grad_accum=3", "trainer.micro_batch_size=1")
    ids = np.array([[0, 1, 2, 3]] * 3)
    bundle = {"input_ids": ids, "targets": np.array([[1, 2, 3, IGNORE]] * 3),
              "position_ids": np.tile(np.arange(4), (3, 1)), "seq_lens": [[4]] * 3}
    engine = _Engine()
    m = train_step(engine, bundle, cfg, world=1, plugins=[_Probe(None)])
    assert engine.calls == ["forward", "backward", "step"] * 2 + ["forward", "backward", "after_backward", "step"]
    assert m["probe"] == 7.0
    plain = _Engine()
    assert "probe" not in train_step(plain, bundle, cfg, world=1) and "after_backward" not in plain.calls


def test_saved_state_reloads_only_with_the_same_fingerprint_and_base_weights(tmp_path):
    fisher, anchor = [torch.rand(6), torch.rand(3)], [torch.randn(6), torch.randn(3)]
    params = [["a", [2, 3]], ["b", [3]]]
    path = ewc.rank_file(tmp_path, 0)
    ewc.save_state(path, "fp1", params, fisher, anchor)
    assert path.name == "rank_00000.pt" and path.parent.name == "ewc"
    got_f, got_a = ewc.load_state(path, "fp1", anchor)
    assert all(torch.equal(a, b) for a, b in zip(got_f + got_a, fisher + anchor))
    assert torch.load(path, weights_only=True)["params"] == params
    assert ewc.load_state(path, "fp2", anchor) is None
    assert ewc.load_state(path, "fp1", [torch.zeros(5), torch.zeros(3)]) is None
    assert ewc.load_state(path, "fp1", [anchor[0], anchor[1] + 1e-6]) is None  # other base weights
    assert ewc.load_state(tmp_path / "missing.pt", "fp1", anchor) is None
    path.write_bytes(b"torn")
    assert ewc.load_state(path, "fp1", anchor) is None


def test_fingerprint_covers_model_reference_set_world_size_and_parameters():
    params = [["w", [2, 2]]]
    base = ewc.fingerprint("/m", SEQUENCES, 2, params)
    assert base == ewc.fingerprint("/m", [(a.copy(), b.copy()) for a, b in SEQUENCES], 2, params)
    assert len({base, ewc.fingerprint("/other", SEQUENCES, 2, params), ewc.fingerprint("/m", SEQUENCES[:2], 2, params),
                ewc.fingerprint("/m", SEQUENCES, 1, params), ewc.fingerprint("/m", SEQUENCES, 2, [["w", [4]]])}) == 5


def test_composes_with_replay_and_has_documented_defaults():
    cfg = compose("mitigation=[replay,ewc]")
    assert cfg.mitigation.enabled == ["replay", "ewc"] and [p.name for p in build(cfg)] == ["replay", "ewc"]
    o = cfg.mitigation.ewc
    assert (o.lam, o.samples, o.data.task, o.data.masking) == (1e8, 64, "text", "all_tokens")
    assert o == EwcConfig()  # the YAML and the dataclass agree


@pytest.mark.parametrize(("override", "key"), [
    ("mitigation.ewc.lam=0", "mitigation.ewc.lam"),
    ("mitigation.ewc.lam=-1", "mitigation.ewc.lam"),
    ("mitigation.ewc.lam=nan", "mitigation.ewc.lam"),
    ("mitigation.ewc.samples=0", "mitigation.ewc.samples"),
    ("mitigation.ewc.data.num_examples=10", "mitigation.ewc.data.num_examples"),
    ("mitigation.ewc.data.kind=file", "mitigation.ewc.data.path"),
])
def test_bad_options_name_the_key(override, key):
    with pytest.raises(ValueError, match=f"config error: {key}"):
        compose("mitigation=ewc", override)


def test_configure_refuses_other_zero_stages_and_too_small_reference_sets():
    cfg = compose("mitigation=ewc", "deepspeed=zero2")
    with pytest.raises(ValueError, match="config error: mitigation.ewc needs deepspeed.stage=3"):
        build(cfg)[0].configure(cfg)
    short = compose("mitigation=ewc", "packing.max_len=8")  # every text example is over-length: dropped
    with pytest.raises(ValueError, match=r"config error: mitigation.ewc.samples=64 exceeds the 0 usable"):
        build(short)[0].configure(short)


def test_reference_set_is_the_first_samples_of_the_source(tiny_path):
    cfg = compose("mitigation=ewc", "mitigation.ewc.samples=5")
    seqs = ewc.reference_set(cfg.mitigation.ewc, cfg, tiny_path)
    more = ewc.reference_set(EwcConfig(samples=9), cfg, tiny_path)
    assert len(seqs) == 5 and all(np.array_equal(a[0], b[0]) for a, b in zip(seqs, more))
    for ids, targets in seqs:  # all tokens trained: every next token is a target
        assert np.array_equal(targets[:-1], ids[1:]) and targets[-1] == IGNORE
