"""Raw networks: shapes, class conditioning, errors, config round trips, determinism, a tiny overfit."""

from __future__ import annotations

import json

import pytest
import torch

from scorekit.denoiser import EDMPrecond, NetDenoiser
from scorekit.nets import MLP, NETS, UNet, _Attention, build, default_config, num_parameters


def _randomise_output(net: torch.nn.Module) -> torch.nn.Module:
    """The output layer starts at zero; give it random weights so outputs depend on the inputs."""
    torch.manual_seed(123)
    with torch.no_grad():
        net.out.weight.normal_(0, 0.5)
        net.out.bias.normal_(0, 0.5)
    return net


def _small_unet(**kw) -> UNet:
    kw = {"image_size": 8, "base_channels": 16, "num_res_blocks": 1, **kw}
    return UNet(kw.pop("in_channels", 1), **kw)


@pytest.mark.parametrize(
    ("net", "shape"),
    [
        (lambda: MLP(2, hidden=32, depth=2, emb_dim=16), (5, 2)),
        (lambda: MLP(7, hidden=32, depth=1, emb_dim=16, num_classes=3), (4, 7)),
        (lambda: _small_unet(), (3, 1, 8, 8)),
        (lambda: _small_unet(in_channels=3, image_size=(8, 16)), (2, 3, 8, 16)),
        (
            lambda: _small_unet(channel_mults=(1, 2, 2), image_size=16, attn_resolutions=(8,)),
            (2, 1, 16, 16),
        ),
        (lambda: _small_unet(channel_mults=(1,), attn_resolutions=()), (2, 1, 8, 8)),
    ],
)
def test_shapes_and_zero_initial_output(net, shape):
    torch.manual_seed(0)
    net = net()
    x, c = torch.randn(shape), torch.rand(shape[0])
    out = net(x, c)
    assert out.shape == x.shape and out.dtype == x.dtype
    # Zero-initialised output layer: the untrained network returns exactly 0.
    assert torch.equal(out, torch.zeros_like(x))
    out = _randomise_output(net)(x, c)
    assert out.shape == x.shape and out.abs().sum() > 0
    # A scalar c_noise is broadcast to the batch.
    assert torch.allclose(net(x, 0.3), net(x, torch.full((shape[0],), 0.3)))
    # Float64 end to end (likelihood code differentiates through the network in double precision).
    out64 = net.double()(x.double(), c.double())
    assert out64.dtype == torch.float64
    assert torch.allclose(out64, out.double(), atol=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_rows_are_independent(kind):
    # No batch statistics: row i of the output depends only on row i of the inputs.
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = MLP(3, hidden=32, depth=2, emb_dim=16, num_classes=4), torch.randn(6, 3)
    else:
        net, x = _small_unet(num_classes=4), torch.randn(6, 1, 8, 8)
    net = _randomise_output(net).eval()
    c, y = torch.rand(6), torch.tensor([0, 1, 2, 3, -1, 2])
    full = net(x, c, y)
    for i in range(6):
        assert torch.allclose(
            full[i : i + 1], net(x[i : i + 1], c[i : i + 1], y[i : i + 1]), atol=1e-5
        )


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_class_labels(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = MLP(2, hidden=32, depth=2, emb_dim=16, num_classes=3), torch.randn(4, 2)
    else:
        net, x = _small_unet(num_classes=3), torch.randn(4, 1, 8, 8)
    net = _randomise_output(net)
    c = torch.rand(4)
    # None means every row unconditional: the same as -1 everywhere (the null embedding).
    assert torch.equal(net(x, c, None), net(x, c, torch.full((4,), -1)))
    # Each label (and the null label) gives a different function.
    outs = [net(x, c, torch.full((4,), k)) for k in (-1, 0, 1, 2)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(outs[i], outs[j])
    # A mixed batch equals the rows taken from the single-label batches.
    y = torch.tensor([2, -1, 0, 1])
    mixed = net(x, c, y)
    for i, k in enumerate(y.tolist()):
        assert torch.allclose(mixed[i], outs[k + 1][i], atol=1e-6)


def test_bad_inputs():
    mlp = MLP(2, hidden=16, depth=1, emb_dim=8, num_classes=3)
    with pytest.raises(ValueError, match=r"\[B, 2\].*\(4, 3\)"):
        mlp(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        mlp(torch.randn(4, 2, 1), torch.rand(4))
    with pytest.raises(ValueError, match=r"c_noise.*\[4\].*\(3,\)"):
        mlp(torch.randn(4, 2), torch.rand(3))
    with pytest.raises(ValueError, match=r"0\.\.2 or -1.*\[0, 3\]"):
        mlp(torch.randn(2, 2), torch.rand(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"0\.\.2 or -1.*\[-2, 1\]"):
        mlp(torch.randn(2, 2), torch.rand(2), torch.tensor([-2, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        mlp(torch.randn(2, 2), torch.rand(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class_labels must have shape \[B\] = \[2\]"):
        mlp(torch.randn(2, 2), torch.rand(2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        MLP(2, hidden=16, depth=1, emb_dim=8)(
            torch.randn(2, 2), torch.rand(2), torch.tensor([0, 0])
        )

    unet = _small_unet(num_classes=2)
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\].*\(2, 3, 8, 8\)"):
        unet(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\].*\(2, 8, 8\)"):
        unet(torch.randn(2, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\].*\(2, 1, 16, 16\)"):
        unet(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match=r"0\.\.1 or -1"):
        unet(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"7x7 must be divisible by .* = 2"):
        UNet(1, image_size=7, channel_mults=(1, 2))
    with pytest.raises(ValueError, match=r"12x12 must be divisible by .* = 8"):
        UNet(1, image_size=12, channel_mults=(1, 2, 2, 2), attn_resolutions=())
    with pytest.raises(ValueError, match=r"attn_resolutions \[2\] match no level.*\[8, 4\]"):
        UNet(1, image_size=8, attn_resolutions=(2,))
    with pytest.raises(ValueError, match="dropout"):
        MLP(2, dropout=1.5)
    with pytest.raises(ValueError, match="hidden"):
        MLP(2, hidden=0)


def test_attention_placement():
    # Levels 8 and 4; one block per level down, two up, plus the middle attention.
    count = lambda net: sum(isinstance(m, _Attention) for m in net.modules())  # noqa: E731
    assert count(_small_unet(attn_resolutions=())) == 1
    assert count(_small_unet(attn_resolutions=(4,))) == 1 + 1 + 2
    assert count(_small_unet(attn_resolutions=(8, 4))) == 1 + 2 * (1 + 2)


def test_build_round_trip_through_json_and_determinism():
    from scorekit.data import load

    for ds in (load("moons"), load("digits")):
        cfg = default_config(ds.kind, ds.shape, ds.num_classes)
        assert cfg["type"] in NETS and cfg["num_classes"] == ds.num_classes
        cfg2 = json.loads(json.dumps(cfg))
        torch.manual_seed(7)
        a = build(cfg)
        torch.manual_seed(7)
        b = build(cfg2)
        torch.manual_seed(8)
        c = build(cfg2)
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)
        x = ds.x[:4]
        y = ds.labels[:4] if ds.labels is not None else None
        _randomise_output(a), _randomise_output(b)
        assert torch.equal(
            a(x, torch.rand(4, generator=torch.Generator().manual_seed(0)), y),
            b(x, torch.rand(4, generator=torch.Generator().manual_seed(0)), y),
        )
    digits = load("digits")
    digits_net = build(default_config(digits.kind, digits.shape, digits.num_classes))
    assert 0.5e6 <= num_parameters(digits_net) <= 1.5e6


def test_default_config_takes_plain_values():
    # The same config from the kind, shape and class count alone (nets knows nothing of data sets).
    mlp = default_config("vector", (5,), 3)
    assert (mlp["type"], mlp["dim"], mlp["num_classes"]) == ("mlp", 5, 3)
    unet = default_config("image", [3, 6, 6])
    assert unet["in_channels"] == 3 and unet["image_size"] == [6, 6] and unet["num_classes"] == 0
    assert unet["channel_mults"] == [1, 2] and unet["attn_resolutions"] == [3]
    odd = default_config("image", [1, 7, 7])
    assert odd["channel_mults"] == [1] and odd["attn_resolutions"] == [7]
    with pytest.raises(ValueError, match="kind must be 'vector' or 'image', got 'text'"):
        default_config("text", [4])


def test_build_errors():
    with pytest.raises(
        ValueError, match=r"config\['type'\].*\['diffusers-unet2d', 'mlp', 'unet'\].*'transformer'"
    ):
        build({"type": "transformer", "dim": 2})
    with pytest.raises(TypeError, match="hiden"):
        build({"type": "mlp", "dim": 2, "hiden": 64})
    with pytest.raises(ValueError, match="needs the key 'in_channels'"):
        build({"type": "unet"})
    with pytest.raises(TypeError, match="dict"):
        build("mlp")


def test_net_denoiser_at_init_is_c_skip_times_x():
    # With the zero output layer, D(x, sigma) = c_skip x = sd^2 / (sigma^2 + sd^2) x exactly.
    net = NetDenoiser(_small_unet(), EDMPrecond(0.5))
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    expected = x * (0.25 / (sigma**2 + 0.25)).reshape(3, 1, 1, 1)
    assert torch.allclose(net(x, sigma), expected)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_tiny_overfit(kind):
    # A few dozen Adam steps on one fixed noisy batch must cut the denoising loss well down.
    torch.manual_seed(0)
    if kind == "mlp":
        raw, x0 = MLP(2, hidden=64, depth=2, emb_dim=32, num_classes=2), torch.randn(64, 2)
        steps = 60
    else:
        raw, x0 = _small_unet(num_classes=2), torch.randn(16, 1, 8, 8).clamp(-1, 1)
        steps = 30
    labels = torch.arange(x0.shape[0]) % 2
    denoiser = NetDenoiser(raw, EDMPrecond(0.5))
    sigma = torch.exp(torch.linspace(-2, 1, x0.shape[0]))
    x = x0 + sigma.reshape(-1, *[1] * (x0.ndim - 1)) * torch.randn_like(x0)
    opt = torch.optim.Adam(raw.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = (denoiser(x, sigma, class_labels=labels) - x0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[:: max(1, steps // 6)]
