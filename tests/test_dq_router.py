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


@pytest.mark.parametrize("r", [0.1, 0.33, 0.6])
def test_the_learned_routers_held_out_fine_fraction_follows_the_target(r):
    """Evaluation thresholds the margin at a running quantile of the training margins: the
    held-out fraction follows r, where an argmax follows only the sign of the margin."""
    from rqgen.stage1.dq_router import LearnedRouter

    torch.manual_seed(0)
    router = LearnedRouter(coarse_channels=16, fine_channels=8, fine_fraction=r)
    with torch.no_grad():
        router.mlp[-1].bias.copy_(torch.tensor([0.0, -1.5]))  # margins mostly below 0
    router.train()
    with torch.no_grad():
        for _ in range(400):  # training batches: the threshold tracks their margins
            router(torch.randn(16, 16, 4, 4), torch.randn(16, 8, 8, 8))
    router.eval()
    hc, hf = torch.randn(256, 16, 4, 4), torch.randn(256, 8, 8, 8)  # held out
    fine = float(router(hc, hf)[0].mean())
    logits = router.logits(hc, hf)
    argmax = float((logits[..., 1] > logits[..., 0]).float().mean())
    assert abs(fine - r) < 0.05, (fine, r)
    assert abs(argmax - r) > 0.05  # what the argmax gave: not the target


def test_a_dq_vae_saved_without_the_routers_threshold_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    from rqgen.stage1.dqvae import DQVAE, DQVAEConfig

    cfg = DQVAEConfig(resolution=32, ch=8, ch_mult=[1, 2, 2, 2], decoder_ch_mult=[1, 2, 2],
                      num_res_blocks=1, attn_resolutions=[], decoder_attn_resolutions=[],
                      z_channels=8, embed_dim=8, codebook_size=16, router="learned")  # fmt: skip
    DQVAE(cfg).save_pretrained(tmp_path)
    w = load_file(str(tmp_path / "model.safetensors"))
    del w["router.eval_threshold"]  # as an older rqgen wrote it
    save_file(w, str(tmp_path / "model.safetensors"))
    model = DQVAE.from_pretrained(tmp_path)
    assert torch.isnan(model.router.eval_threshold)  # evaluation falls back to the argmax


class _RandomCrops(torch.utils.data.Dataset):
    """Crops of one textured image at offsets drawn from torch's global RNG, as training
    datasets draw them."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.image = torch.rand(3, 64, 64, generator=g) * 2 - 1
        self.image[:, :32] = self.image[:, :32].sign()  # flat and busy halves

    def __len__(self):
        return 300

    def __getitem__(self, i):
        y, x = torch.randint(0, 33, (2,)).tolist()
        return self.image[:, y : y + 32, x : x + 32], 0


def _fit_on_rank(rank: int, store: str, results) -> None:
    import torch.distributed as dist

    from rqgen.distributed import Runtime
    from rqgen.train.vae import fit_entropy_router

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = _Routed()
    torch.manual_seed(1000 + rank)  # each rank's RNG differs, as training seeds it
    before = torch.get_rng_state()
    th, _ = fit_entropy_router(model, _RandomCrops(), Runtime(rank, 2, torch.device("cpu")), 7)
    results[rank] = (th, torch.equal(before, torch.get_rng_state()))
    dist.destroy_process_group()


class _Routed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.router = EntropyRouter(coarse_size=4, fine_fraction=0.5)

    def fit_router(self, batches):
        return self.router.fit(batches)


def test_the_entropy_router_is_fitted_on_rank_0_and_broadcast(tmp_path):
    import torch.multiprocessing as mp

    from rqgen.distributed import Runtime
    from rqgen.train.vae import fit_entropy_router

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_fit_on_rank, args=(str(tmp_path / "store"), results), nprocs=2)
        results = dict(results)
    (th0, kept0), (th1, kept1) = results[0], results[1]
    assert th0 == th1 and kept0 and kept1  # one threshold everywhere; the run's RNG untouched
    # the same threshold a single process fits: the crops depend on the seed, not the rank
    single, _ = fit_entropy_router(_Routed(), _RandomCrops(), Runtime(0, 1, torch.device("cpu")), 7)
    assert single == th0
