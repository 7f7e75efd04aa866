"""The weight average that updates a sparse table's rows lazily equals the every-row average."""

from __future__ import annotations

import torch
from torch import nn

from elmo_core.classifier_optim import Optimizers, clip_grad_norm, mark_sparse_parameters
from elmo_core.classifier_training import ema_decay
from elmo_core.ema import WeightAverage


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 4, sparse=True)
        self.out = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embedding(ids).mean(1))


def test_lazy_rows_equal_the_dense_average_and_untouched_rows_stay() -> None:
    torch.manual_seed(0)
    model = Tiny()
    mark_sparse_parameters(model)
    params = list(model.parameters())
    opt = Optimizers([{"params": params, "lr": 0.05}], 0.05, 0.0)
    ema = WeightAverage(model, ema_decay)
    reference = [p.detach().clone() for p in params]  # every row, every update
    for step in range(40):
        ids = torch.randint(0, 20, (8, 1))  # a few rows a step; rows 20..49 never
        loss = nn.functional.cross_entropy(model(ids), torch.randint(0, 3, (8,)))
        opt.zero_grad()
        loss.backward()
        assert model.embedding.weight.grad is not None and model.embedding.weight.grad.is_sparse
        clip_grad_norm(params, 0.5)
        ema.prepare(model)
        opt.step()
        ema.update(model)
        if step == 0:
            reference = [p.detach().clone() for p in params]
        else:
            w = 1.0 - ema_decay(step)
            reference = [r.lerp(p.detach(), w) for r, p in zip(reference, params, strict=True)]
    ema.sync(model)
    for a, r in zip(ema.module.parameters(), reference, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    # rows no batch touched: neither the optimizer nor the average moved them
    torch.testing.assert_close(ema.module.embedding.weight[20:], model.embedding.weight[20:])
    # the sparse table took the row-sparse Adam, the rest the fused one
    assert [len(o.param_groups[0]["params"]) for o in opt.all] == [2, 1]


def test_clip_grad_norm_matches_torch_on_dense_and_sparse() -> None:
    torch.manual_seed(1)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    b.embedding.sparse = False
    ids = torch.tensor([[1, 1, 2], [3, 1, 4]])
    for m in (a, b):
        (m(ids).pow(2).sum() * 100).backward()
    total = clip_grad_norm(list(a.parameters()), 1.0)
    expected = nn.utils.clip_grad_norm_(list(b.parameters()), 1.0)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(a.embedding.weight.grad.to_dense(), b.embedding.weight.grad)
    torch.testing.assert_close(a.out.weight.grad, b.out.weight.grad)


def test_clip_grad_norm_under_the_limit_leaves_every_gradient_bit_for_bit() -> None:
    torch.manual_seed(2)
    m = Tiny()
    m(torch.tensor([[1, 2, 3]])).sum().backward()
    before = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    total = clip_grad_norm(list(m.parameters()), 1e6)
    assert float(total) > 0
    after = [p.grad for p in m.parameters() if p.grad is not None]
    assert all(torch.equal(x.to_dense(), y.to_dense()) for x, y in zip(before, after, strict=True))
