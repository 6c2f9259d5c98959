"""How the gradient crosses the quantizer (`gradient_estimator`): straight-through, the
rotation trick (Fifty et al., Eq. 4) onto Ẑ, and per depth; the forward value never changes."""

import pytest
import torch
from test_quantizer import trained

from rqgen import ResidualQuantizer


def test_straight_through_gradient():
    q, x = trained()
    x = x[:10].clone().requires_grad_(True)
    q(x).quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_rotation_trick_keeps_the_forward_and_rotates_the_gradient():
    q, x = trained()
    x = x[:10].clone().double()
    rot = ResidualQuantizer(8, 64, 4, gradient_estimator="rotation")
    rot.load_state_dict(q.state_dict())
    rot.eval()
    z = x.clone().requires_grad_(True)
    out = rot(z)
    zhat = q.decode_codes(q.quantize(x)[0]).double()  # Ẑ, the reconstruction
    torch.testing.assert_close(out.quantized, zhat, rtol=0, atol=1e-6)  # forward unchanged
    assert torch.equal(out.codes, q(x).codes)
    g = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.quantized.backward(g)
    for i in range(10):  # dL/dz = (λR)ᵀ g, with R built as the paper writes it
        want = rotation_matrix(x[i], zhat[i]).T @ g[i]
        torch.testing.assert_close(z.grad[i], want, rtol=1e-4, atol=1e-5)  # fp32 inside
    assert not torch.allclose(z.grad, g)  # not the straight-through gradient
    with pytest.raises(ValueError, match="use ste, rotation, rotation_per_depth"):
        ResidualQuantizer(8, 64, 4, gradient_estimator="gumbel")


def rotation_matrix(e: torch.Tensor, qv: torch.Tensor) -> torch.Tensor:
    """λR of the rotation trick, built as the paper writes it; checks that it carries e onto qv."""
    u, qh = e / e.norm(), qv / qv.norm()
    r = (u + qh) / (u + qh).norm()
    R = torch.eye(len(e), dtype=e.dtype) - 2 * torch.outer(r, r) + 2 * torch.outer(qh, u)
    torch.testing.assert_close(R @ e * (qv.norm() / e.norm()), qv)
    return R * (qv.norm() / e.norm())


def test_rotation_per_depth_averages_each_residuals_rotation_onto_its_code():
    q, x = trained()
    x = x[:6].clone().double()
    rot = ResidualQuantizer(8, 64, 4, gradient_estimator="rotation_per_depth")
    rot.load_state_dict(q.state_dict())
    rot.eval()
    codes, residuals = q.quantize(x)  # r_{d-1} per depth
    e = q.embed(codes).double()  # e(k_d)
    depths = torch.tensor([4, 1, 2, 4, 3, 1])  # quantizer dropout's prefixes
    g = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for cut in (None, depths):
        z = x.clone().requires_grad_(True)
        out = rot(z, depths=cut)
        ends = [4] * 6 if cut is None else cut.tolist()
        want = torch.stack([e[i, : ends[i]].sum(0) for i in range(6)])
        torch.testing.assert_close(out.quantized, want, rtol=0, atol=1e-6)  # Ẑ(d) forward
        out.quantized.backward(g)
        for i, n in enumerate(ends):  # dL/dz = mean over j ≤ d of (λ_j R_j)ᵀ g
            mats = [rotation_matrix(residuals[i, j].double(), e[i, j]) for j in range(n)]
            want = sum(m.T @ g[i] for m in mats) / n
            torch.testing.assert_close(z.grad[i], want, rtol=1e-4, atol=1e-5)
    single = ResidualQuantizer(8, 64, 1, gradient_estimator="rotation_per_depth")
    plain = ResidualQuantizer(8, 64, 1, gradient_estimator="rotation")
    grads = []
    for m in (single, plain):  # at D = 1 it is the rotation trick
        m.load_state_dict(q.state_dict())  # the shared codebook
        m.eval()
        z = x.clone().requires_grad_(True)
        m(z).quantized.backward(g)
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1])
