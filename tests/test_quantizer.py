"""ResidualQuantizer: Eq. 3-5 (search, partial sums), Eq. 7 (commitment), Eq. 15 (Q_τ), EMA."""

import pytest
import torch
import torch.nn.functional as F

from rqgen import ResidualQuantizer


def clustered(n_clusters=16, per=64, dim=8, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g) * 3
    x = centers.repeat_interleave(per, 0) + spread * torch.randn(n_clusters * per, dim, generator=g)
    return x, centers


def trained(depth=4, K=64, dim=8, steps=30, **kw):
    torch.manual_seed(0)
    q = ResidualQuantizer(dim, K, depth, **kw).train()
    x = torch.randn(2048, dim)
    for _ in range(steps):
        q(x)
    return q.eval(), x


def test_output_shapes_and_dtype():
    q = ResidualQuantizer(16, 32, 3)
    z = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.codes.shape == (2, 5, 7, 3) and out.codes.dtype == torch.long
    assert out.codes.min() >= 0 and out.codes.max() < 32
    assert out.commitment_loss.ndim == 0


def test_residual_norms_shrink_with_depth():
    q, x = trained(depth=6)
    _, residuals = q.quantize(x)  # r_0 .. r_{D-1}
    codes, _ = q.quantize(x)
    final = x - q.decode_codes(codes)  # r_D
    norms = torch.cat([residuals, final[:, None]], 1).norm(dim=-1).mean(0)
    assert torch.all(norms[1:] < norms[:-1]), norms


def test_partial_sums_rebuild_zhat():
    q, x = trained(depth=4)
    codes, residuals = q.quantize(x)
    partial = q.partial_sums(codes)  # Ẑ(1..D)
    assert partial.shape == (*codes.shape, 8)
    for d in range(1, 5):
        torch.testing.assert_close(q.decode_codes(codes, d), partial[:, d - 1])
        if d < 4:  # r_d = z - Ẑ(d)  (Eq. 4)
            torch.testing.assert_close(residuals[:, d], x - partial[:, d - 1])
    # forward's output is Ẑ = Ẑ(D) (eval mode: no codebook update)
    torch.testing.assert_close(q(x).quantized, partial[:, -1])


def test_codes_are_greedy_nearest_neighbours():
    q, x = trained(depth=3)
    codes, residuals = q.quantize(x[:100])
    cb = q.codebook[0]
    for d in range(3):
        brute = torch.cdist(residuals[:, d], cb).argmin(1)
        assert torch.equal(codes[:, d], brute)


def test_chunked_search_equals_unchunked():
    q, x = trained(depth=3)
    full, _ = q.quantize(x)
    q.max_distance_elements, q.min_rows = 64 * 7, 1  # 7 rows per chunk, ragged last chunk
    chunked, _ = q.quantize(x)
    assert torch.equal(full, chunked)


def test_commitment_loss_is_beta_times_sum_over_depths():
    q, x = trained(depth=4)
    x = x.clone().requires_grad_(True)
    out = q(x)
    partial = q.partial_sums(out.codes)
    expected = 0.25 * sum(F.mse_loss(x, partial[:, d]) for d in range(4))
    torch.testing.assert_close(out.commitment_loss, expected)


def test_final_commitment_pulls_z_towards_the_decoded_sum_only():
    q, x = trained(depth=4)
    x = x[:64].clone().requires_grad_(True)
    ref, q.commitment = q(x), "final"
    out = q(x)  # the forward pass is the same; only the loss differs
    torch.testing.assert_close(out.quantized, ref.quantized)
    zhat = q.partial_sums(out.codes)[:, -1]
    torch.testing.assert_close(out.commitment_loss, 0.25 * F.mse_loss(x, zhat))
    (grad,) = torch.autograd.grad(out.commitment_loss, x)
    torch.testing.assert_close(grad, 0.25 * 2 * (x - zhat).detach() / x.numel())
    # under quantizer dropout the output, and so the target, is each vector's own Ẑ(d)
    depths = torch.randint(1, 5, (64,), generator=torch.Generator().manual_seed(0))
    cut = q(x, depths=depths)
    own = q.partial_sums(cut.codes)[torch.arange(64), depths - 1]
    torch.testing.assert_close(cut.quantized, own)
    torch.testing.assert_close(cut.commitment_loss, 0.25 * F.mse_loss(x, own))


def test_soft_labels_tau_to_zero_equal_argmin():
    q, x = trained(depth=4)
    codes, residuals = q.quantize(x[:200])
    for d in range(4):
        probs = q.soft_labels(residuals[:, d], d, tau=1e-6)
        assert torch.allclose(probs.sum(-1), torch.ones(200))
        assert torch.equal(probs.argmax(-1), codes[:, d])
        assert probs.max(-1).values.min() > 0.99  # one-hot in the limit
    # stochastic sampling with τ → 0 is the argmin path too
    sampled, _ = q.quantize(x[:200], tau=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, codes)


def test_soft_labels_match_eq15_formula():
    q, x = trained(depth=2)
    r = x[:5]
    tau = 0.5
    d2 = torch.cdist(r, q.codebook[0]).pow(2)
    expected = torch.softmax(-d2 / tau, -1)  # Q_τ(k | r) ∝ exp(-||r - e(k)||² / τ)
    torch.testing.assert_close(q.soft_labels(r, 0, tau), expected, atol=1e-5, rtol=1e-4)


def test_stochastic_codes_follow_q_tau():
    q, x = trained(depth=1)
    tau = 2.0
    r = x[:1]
    probs = q.soft_labels(r, 0, tau)[0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([q.quantize(r.expand(4000, -1), tau=tau, generator=g)[0][:, 0]])
    freq = torch.bincount(draws.flatten(), minlength=q.codebook_size).float() / draws.numel()
    assert (freq - probs).abs().max() < 0.03
    assert (probs > 0.05).sum() > 1, "test needs a non-degenerate distribution"


def test_tau_in_units_of_the_quantization_error_is_scale_free():
    """The same features and codebook at 100x the scale: with τ times each depth's mean
    squared quantization error, Q_τ and the drawn codes do not change; absolute τ does."""
    q, x = trained(depth=3)
    big = ResidualQuantizer(8, 64, 3).eval()
    big.codebook.copy_(q.codebook * 100)
    err, err_big = q.quantization_error(x), big.quantization_error(x * 100)
    torch.testing.assert_close(err_big, err * 1e4, rtol=1e-4, atol=0)
    assert (err[1:] < err[:-1]).all()  # deeper residuals are shorter
    codes, res = q.quantize(x[:64])
    _, res_big = big.quantize(x[:64] * 100)
    for d in range(3):
        torch.testing.assert_close(big.soft_labels(res_big[:, d], d, 0.5 * float(err_big[d])),
                                   q.soft_labels(res[:, d], d, 0.5 * float(err[d])),
                                   atol=1e-4, rtol=1e-3)  # fmt: skip
        near_uniform = big.soft_labels(res_big[:, d], d, 0.5).max(-1).values.mean()
        assert near_uniform > 0.99  # absolute τ = 0.5 at this scale: one-hot, not soft
    taus = [0.5 * float(e) for e in err]
    a, _ = q.quantize(x[:64], taus, torch.Generator().manual_seed(1))
    b, _ = big.quantize(x[:64] * 100, [t * 1e4 for t in taus], torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, codes)  # drawn, not argmin


def test_same_generator_same_stochastic_codes():
    q, x = trained(depth=3)
    a, _ = q.quantize(x, tau=0.5, generator=torch.Generator().manual_seed(3))
    b, _ = q.quantize(x, tau=0.5, generator=torch.Generator().manual_seed(3))
    c, _ = q.quantize(x, tau=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ema_converges_on_clustered_data():
    x, centers = clustered(n_clusters=16)
    torch.manual_seed(0)
    # start every code half a unit off its cluster: EMA must pull it onto the centroid
    q = ResidualQuantizer(8, 16, 1, init_from_data=False, restart_unused_codes=False)
    start = centers + 0.5 * torch.randn_like(centers)
    q.codebook[0], q.embed_sum[0] = start, start
    q.train()
    errors = []
    for _ in range(100):
        q(x[torch.randperm(len(x))])
        errors.append((q.codebook[0] - centers).norm(dim=1).max().item())
    # the pull of the initial position decays like 1 / (1 + usage·t)
    assert all(b <= a + 1e-4 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.05 < 0.5 < errors[0], errors[::10]  # floor: centroid noise ~0.02


def test_data_init_and_restarts_cover_every_cluster():
    x, centers = clustered(n_clusters=16)
    torch.manual_seed(0)
    q = ResidualQuantizer(8, 64, 1).train()  # over-complete codebook, data-dependent init
    for _ in range(60):
        q(x[torch.randperm(len(x))])
    assert torch.cdist(centers, q.codebook[0]).min(1).values.max() < 0.1


def test_ema_update_is_applied_once_per_step_from_all_depths():
    torch.manual_seed(0)
    q = ResidualQuantizer(4, 8, 3, restart_unused_codes=False, init_from_data=False)
    x = torch.randn(256, 4)
    before = q.codebook.clone()
    codes_before, residuals = q.quantize(x)
    out = q.train()(x)
    # the train-mode forward used the codebook as it was BEFORE the step at every depth
    assert torch.equal(out.codes, codes_before)
    # and the new codebook is one EMA step on statistics pooled over all depths
    counts = torch.zeros(8)
    sums = torch.zeros(8, 4)
    for d in range(3):
        counts += torch.bincount(codes_before[:, d], minlength=8)
        sums.index_add_(0, codes_before[:, d], residuals[:, d])
    decay = 0.99**3  # per depth: the shared codebook takes 3 depths' worth of updates
    size = decay * 1.0 + (1 - decay) * counts
    embed = decay * before[0] + (1 - decay) * sums
    n = size.sum()
    smoothed = (size + 1e-5) / (n + 8 * 1e-5) * n
    torch.testing.assert_close(q.codebook[0], embed / smoothed[:, None])


def test_restarts_revive_dead_codes():
    x, _ = clustered(n_clusters=4, dim=8)
    torch.manual_seed(0)
    q = ResidualQuantizer(8, 32, 2).train()
    q(x)  # data init
    q.codebook[0, :16] = 1e3  # 16 codes far from every vector: dead
    q.cluster_size[0, :16] = 0.0
    q.embed_sum[0, :16] = 1e3 * 0.0
    q(x)
    assert (q.codebook[0, :16].abs() < 100).all(), "dead codes were not moved onto data"
    assert (q.cluster_size[0] >= 1.0 - 1e-6).all()
    # with restarts off they stay dead
    q2 = ResidualQuantizer(8, 32, 2, restart_unused_codes=False).train()
    q2(x)
    q2.codebook[0, :16] = 1e3
    q2.cluster_size[0, :16] = 0.0
    q2.embed_sum[0, :16] = 0.0
    q2(x)
    assert (q2.codebook[0, :16].abs() > 100).any() or (q2.codebook[0, :16] == 0).all()


def test_separate_codebooks_one_per_depth():
    q, x = trained(depth=3, shared_codebook=False)
    assert q.codebook.shape == (3, 64, 8)
    codes, residuals = q.quantize(x[:50])
    for d in range(3):
        brute = torch.cdist(residuals[:, d], q.codebook[d]).argmin(1)
        assert torch.equal(codes[:, d], brute)
    expected = sum(q.codebook[d][codes[:, d]] for d in range(3))
    torch.testing.assert_close(q.decode_codes(codes), expected)


def test_bf16_autocast_search_stays_fp32():
    q, x = trained(depth=4)
    ref, _ = q.quantize(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x.to(torch.bfloat16))
    assert out.quantized.dtype == torch.bfloat16
    # the input was rounded to bf16, so compare against fp32 codes of the rounded input
    ref_rounded, _ = q.quantize(x.to(torch.bfloat16).float())
    assert torch.equal(out.codes, ref_rounded)
    assert (ref != ref_rounded).float().mean() < 0.2


def test_rejects_wrong_dim_and_unknown_commitment():
    with pytest.raises(ValueError, match="last dim"):
        ResidualQuantizer(8, 16, 2)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="use all .Eq. 7. or final"):
        ResidualQuantizer(8, 64, 4, commitment="last")


def test_depth_scale_is_separate_codebooks_of_scaled_codes():
    """A shared codebook c with per-depth scales s_d quantizes exactly like D separate
    codebooks s_d·c: the same argmin codes, residuals, Q_τ (τ keeps its meaning) and draws."""
    q, x = trained(depth=3, depth_scale=True)
    table = q.code_table()
    assert table.shape == (3, 64, 8) and not q.shared_table
    for d in range(3):
        torch.testing.assert_close(table[d], q.scale[d] * q.codebook[0])
    ref = ResidualQuantizer(8, 64, 3, shared_codebook=False).eval()
    ref.codebook.copy_(table)
    codes, res = q.quantize(x[:256])
    ref_codes, ref_res = ref.quantize(x[:256])
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(res, ref_res)
    torch.testing.assert_close(q.decode_codes(codes), ref.decode_codes(codes))
    torch.testing.assert_close(q(x[:256]).quantized, q.decode_codes(codes))
    for d in range(3):
        a, b = q.soft_labels(res[:, d], d, 0.5), ref.soft_labels(res[:, d], d, 0.5)
        torch.testing.assert_close(a, b)
    a, _ = q.quantize(x[:256], 0.5, torch.Generator().manual_seed(1))
    b, _ = ref.quantize(x[:256], 0.5, torch.Generator().manual_seed(1))
    assert (a == b).float().mean() > 0.99 and not torch.equal(a, codes)  # rounding may flip a tie


def test_depth_scale_tracks_the_residual_norm_and_spreads_the_codes():
    """s_d follows the mean norm of r_{d-1}; on features whose residuals shrink with depth the
    deeper depths of a scaled shared codebook pick from more codes than unscaled ones do."""
    x, _ = clustered(n_clusters=64, per=32, spread=0.3)
    used, mse = {}, {}
    for scaled in (False, True):
        torch.manual_seed(0)
        q = ResidualQuantizer(8, 64, 4, depth_scale=scaled, decay=0.9).train()
        for _ in range(60):
            q(x)
        codes, res = q.eval().quantize(x)
        used[scaled] = [codes[:, d].unique().numel() for d in range(4)]
        mse[scaled] = float((x - q.decode_codes(codes)).pow(2).mean())
    norms = res.norm(dim=-1).mean(0)
    torch.testing.assert_close(q.scale, norms, rtol=0.1, atol=0)
    assert norms[3] < norms[0] / 4  # the scales the test is about
    assert sum(used[True][1:]) > sum(used[False][1:]) and mse[True] < mse[False], (used, mse)


def test_depth_scale_is_saved_only_where_it_is_used():
    assert "scale" not in ResidualQuantizer(8, 16, 2).state_dict()  # old checkpoints load
    q, _ = trained(depth=2, K=16, depth_scale=True)
    fresh = ResidualQuantizer(8, 16, 2, depth_scale=True)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh.scale, q.scale)
    assert not torch.allclose(q.scale, torch.ones(2))


def test_quantize_a_prefix_only():
    q, x = trained(depth=4)
    codes, res = q.quantize(x[:64])
    short, short_res = q.quantize(x[:64], depth=2)
    assert torch.equal(short, codes[:, :2])
    torch.testing.assert_close(short_res, res[:, :2])


# ------------------------------------------------------------------ dynamic depth


def test_dynamic_allocation_is_optimal_on_shrinking_gains_and_always_a_prefix():
    import itertools

    from rqgen.quantize.dynamic import allocate

    torch.manual_seed(0)
    # energies whose gains shrink with depth: the greedy allocation is the exhaustive optimum
    gains = torch.rand(4, 3, 4).sort(-1, descending=True).values
    total = gains.sum(-1, keepdim=True)
    energy = torch.cat([total, total - gains.cumsum(-1)], -1)  # e_0..e_4
    for budget in (3, 5, 8, 12):
        depths = allocate(energy, budget)
        assert (depths.sum(1) == budget).all() and depths.min() >= 1 and depths.max() <= 4
        got = energy.gather(-1, depths[..., None]).sum((1, 2))
        for b in range(4):
            feasible = [ds for ds in itertools.product(range(1, 5), repeat=3) if sum(ds) == budget]
            best = min(sum(float(energy[b, n, d]) for n, d in enumerate(ds)) for ds in feasible)
            assert float(got[b]) == pytest.approx(best, abs=1e-6)
    # any energies: the budget is met exactly and within the depth range
    rough = torch.rand(2, 16, 9).sort(-1, descending=True).values + torch.rand(2, 16, 9) * 0.1
    for budget in (16, 40, 128):
        d = allocate(rough, budget)
        assert (d.sum(1) == budget).all() and d.min() >= 1 and d.max() <= 8
    with pytest.raises(ValueError, match="does not fit"):
        allocate(rough, 200)


def test_dynamic_stacks_decode_each_position_from_its_own_prefix():
    from rqgen.quantize.dynamic import decode_stacks, stack_depths, truncate

    q, x = trained(depth=4)
    codes, _ = q.quantize(x[:32])
    depths = torch.randint(1, 5, (32,))
    stacks = truncate(codes, depths, stop=q.codebook_size)
    assert torch.equal(stack_depths(stacks, q.codebook_size), depths)
    assert (stacks[torch.arange(4)[None] >= depths[:, None]] == q.codebook_size).all()
    want = torch.stack([q.decode_codes(codes[i], int(depths[i])) for i in range(32)])
    torch.testing.assert_close(decode_stacks(q, stacks), want)
