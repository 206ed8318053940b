"""EMA weights: update math, warmup, swapping and checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.diffusion.ema import EMA


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def set_params(model: nn.Module, values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def test_update_lerps_parameters_and_copies_buffers():
    model = net()
    p0 = params(model)
    ema = EMA(model, decay=0.9, warmup=False)
    p1 = [p + 1.0 for p in p0]
    set_params(model, p1)
    model.train()(torch.randn(8, 3))  # moves BatchNorm's running stats
    ema.update(model)
    for shadow, a, b in zip(ema.module.parameters(), p0, p1):
        torch.testing.assert_close(shadow, 0.9 * a + 0.1 * b)
    for shadow, b in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(shadow, b.to(shadow.dtype))
    p2 = [p * 2.0 for p in p0]
    set_params(model, p2)
    ema.update(model)
    for shadow, a, b, c in zip(ema.module.parameters(), p0, p1, p2):
        torch.testing.assert_close(shadow, 0.9 * (0.9 * a + 0.1 * b) + 0.1 * c)
    assert int(ema.num_updates) == 2


def test_warmup_decay():
    model = net()
    p0 = params(model)
    ema = EMA(model, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    p1 = [p + 1.0 for p in p0]
    set_params(model, p1)
    ema.update(model)
    for shadow, a, b in zip(ema.module.parameters(), p0, p1):
        torch.testing.assert_close(shadow, 0.1 * a + 0.9 * b)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates.fill_(10**6)
    assert ema.current_decay() == 0.999


def test_shadow_is_frozen_fp32_and_independent():
    model = net().to(torch.bfloat16)
    ema = EMA(model)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(ema.module.parameters()), next(model.parameters()).float())
    ema.update(model)  # bf16 model, fp32 shadow


def test_copy_to_and_swapped_restore():
    model = net()
    ema = EMA(model, decay=0.5, warmup=False)
    set_params(model, [p + 1.0 for p in params(model)])
    ema.update(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model) as swapped:
        assert swapped is model
        for p, shadow in zip(model.parameters(), ema.module.parameters()):
            assert torch.equal(p, shadow)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k])
    with pytest.raises(RuntimeError), ema.swapped(model):
        raise RuntimeError("sampling failed")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    other = net(seed=1)
    ema.copy_to(other)
    assert all(torch.equal(p, s) for p, s in zip(other.parameters(), ema.module.parameters()))


def test_state_dict_round_trip():
    model = net()
    ema = EMA(model, decay=0.9)
    set_params(model, [p + 1.0 for p in params(model)])
    ema.update(model)
    ema.update(model)
    state = ema.state_dict()
    assert "num_updates" in state and any(k.startswith("module.") for k in state)
    restored = EMA(net(seed=1), decay=0.9)
    restored.load_state_dict(state)
    assert int(restored.num_updates) == 2
    for k, v in restored.state_dict().items():
        assert torch.equal(v, state[k])
