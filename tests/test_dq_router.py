"""The entropy router: entropy behaves, and the fitted threshold hits the target fraction."""

import math

import pytest
import torch

from rqgen.data import BundledDigits
from rqgen.errors import ConfigError
from rqgen.stage1.dq_router import EntropyRouter, region_entropy


def test_entropy_of_flat_and_spread_regions():
    black = torch.full((1, 3, 32, 32), -1.0)
    assert region_entropy(black, 4).abs().max() < 1e-6  # all weight in one bin
    # any flat region splits at most between two neighbouring bins: at most log 2
    assert region_entropy(torch.zeros(1, 3, 32, 32), 4).max() <= math.log(2) + 1e-6
    # pixels spread evenly over [-1, 1]: close to the maximum log(32)
    spread = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8).expand(1, 3, 8, 8)
    assert region_entropy(spread, 1)[0, 0, 0] > 0.9 * math.log(32)


@pytest.mark.parametrize("r", [0.25, 0.5, 0.75])
def test_fitted_threshold_hits_the_fine_fraction_on_held_out_digits(r):
    train, val = BundledDigits(32, "train"), BundledDigits(32, "val")
    x = torch.stack([train[i][0] for i in range(len(train))])
    xv = torch.stack([val[i][0] for i in range(len(val))])
    router = EntropyRouter(coarse_size=4, fine_fraction=r)
    router.fit(x.split(256))
    assert abs(float(router(x).float().mean()) - r) < 0.02  # on the data it was fitted on
    assert abs(float(router(xv).float().mean()) - r) < 0.05  # on held-out digits


def test_unfitted_router_and_bad_grid_are_refused():
    with pytest.raises(ConfigError, match="fit"):
        EntropyRouter(4)(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="divisible"):
        region_entropy(torch.zeros(1, 3, 30, 30), 4)


def test_budget_loss_pulls_the_learned_router_to_the_target():
    from rqgen.stage1.dq_router import LearnedRouter

    torch.manual_seed(0)
    router = LearnedRouter(coarse_channels=16, fine_channels=8, fine_fraction=0.3)
    with torch.no_grad():
        router.mlp[-1].bias.copy_(torch.tensor([-3.0, 3.0]))  # starts almost all fine
    hc, hf = torch.randn(32, 16, 4, 4), torch.randn(32, 8, 8, 8)
    router.eval()
    start = float(router(hc, hf)[0].mean())
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    router.train()
    for _ in range(300):
        gate, budget = router(hc, hf)
        assert set(gate.unique().tolist()) <= {0.0, 1.0}  # hard decisions in training too
        opt.zero_grad()
        budget.backward()  # straight-through: the hard sample still passes gradients
        opt.step()
    router.eval()
    end = float(router(hc, hf)[0].mean())
    assert start > 0.9 and abs(end - 0.3) < 0.1
    gate, budget = router(hc, hf)
    assert torch.equal(gate, router(hc, hf)[0])  # evaluation is deterministic
