"""The one transformer block: causality, KV cache equals full recomputation."""

import torch

from rqgen.stage2.block import RowLinear, Transformer, gpt_init


def model(layers=2, width=32, heads=4):
    torch.manual_seed(0)
    m = Transformer(width, layers, heads).eval()
    gpt_init(m, layers)
    return m


def test_later_tokens_never_change_earlier_outputs():
    m = model()
    x = torch.randn(2, 10, 32)
    y = m(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 32)
    y2 = m(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_cached_steps_equal_full_forward():
    m = model()
    x = torch.randn(3, 9, 32)
    full = m(x)
    cache = m.new_cache(3, 9)
    prefix = m(x[:, :4], cache)  # a prefix of 4 in one call (masked), then one token at a time
    steps = [m(x[:, t : t + 1], cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat([prefix, *steps], 1), full, atol=1e-5, rtol=1e-5)
    for c in cache:
        c.reset()
    torch.testing.assert_close(m(x[:, :1], cache), full[:, :1], atol=1e-5, rtol=1e-5)


def test_official_parameter_names():
    names = set(model(layers=1).state_dict())
    for n in ("ln1", "ln2", "attn.query", "attn.key", "attn.value", "attn.proj", "mlp.0", "mlp.2"):
        assert f"blocks.0.{n}.weight" in names


def test_fused_inference_projection_equals_training_path_and_follows_updates():
    m = model()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        fused = m(x)  # one concatenated q/k/v matmul, cached per weight version
    torch.testing.assert_close(fused, m(x), atol=1e-6, rtol=1e-5)  # autograd: separate matmuls
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).square().mean().backward()
    opt.step()  # in-place update: the fused weights must be rebuilt
    with torch.no_grad():
        after = m(x)
    assert not torch.allclose(after, fused)
    torch.testing.assert_close(after, m(x), atol=1e-6, rtol=1e-5)
    # a cache filled with autograd on holds the same keys and values
    cache = m.new_cache(2, 7)
    torch.testing.assert_close(m(x, cache), m(x), atol=1e-5, rtol=1e-5)


def test_row_linear_equals_linear_at_one_and_two_rows_and_follows_updates():
    torch.manual_seed(0)
    lin = RowLinear(16, 48)  # wide: one and two rows take the transposed copy
    narrow = RowLinear(48, 16)  # narrow: always nn.Linear's own layout
    for rows in (1, 2, 5):
        x = torch.randn(rows, 1, 16)
        with torch.no_grad():
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
            y = narrow(torch.randn(rows, 48))
        assert y.shape == (rows, 16)
    assert "_row_weight" in lin.__dict__ and "_row_weight" not in narrow.__dict__
    x = torch.randn(1, 16)
    with torch.no_grad():
        before = lin(x)
        lin.weight.mul_(2)  # an optimizer step in place: the cached copy must follow
        torch.testing.assert_close(lin(x), 2 * before - lin.bias)
    # with autograd on, gradients flow as through nn.Linear
    lin(x).sum().backward()
    assert lin.weight.grad is not None
    assert list(lin.state_dict()) == ["weight", "bias"]  # keys of nn.Linear
