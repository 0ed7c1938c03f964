"""Calibration observers and estimators: min-max, percentile, MSE, Lp, LSQ init; reservoir sampling."""

import numpy as np
import pytest
import torch

from fxq.errors import InputError
from fxq.quant import FakeQuantizer, IntRange, Reservoir, make_observer, parse_method


def int_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def np_qdq(x, scale, zp, qmin, qmax):
    """Reference quantize-dequantize along rows of a (C, N) float32 matrix (float32 steps emulated)."""
    s = np.asarray(scale, np.float64).reshape(-1, 1)
    z = np.asarray(zp, np.float64).reshape(-1, 1)
    v = (x.astype(np.float64) / s).astype(np.float32).astype(np.float64)
    q = np.clip(np.round(v) + z, qmin, qmax)
    return ((q - z) * s).astype(np.float32)


def np_error(x, scale, zp, qmin, qmax, p=2.0):
    d = (x - np_qdq(x, scale, zp, qmin, qmax)).astype(np.float64)
    return (np.abs(d) ** p).sum(axis=1)


def observe(method, x, bits=8, symmetric=False, axis=None, **kwargs):
    obs = make_observer(method, IntRange.of(bits, symmetric), symmetric, axis, **kwargs)
    for chunk in x if isinstance(x, list) else [x]:
        obs.update(chunk)
    return obs


def rows(x, axis):
    """(C, N) float32 numpy view: per-tensor is one row."""
    x = x.numpy()
    return x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def heavy_tailed(shape, seed=0):
    """Laplace(0, 1) samples (heavier tails than a Gaussian, as activations have)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()


# ---------------------------------------------------------------------------------------------------------
# Min-max


@pytest.mark.parametrize("axis", [None, 0, 2])
def test_minmax_tracks_exact_min_and_max_over_a_stream(axis):
    chunks = [torch.randn(3, 4, 5) * (i + 1) + i for i in range(4)]
    obs = observe("minmax", chunks, axis=axis)
    allx = np.concatenate([rows(c, axis) for c in chunks], axis=1)
    np.testing.assert_array_equal(obs.minmax.min.numpy(), allx.min(axis=1))
    np.testing.assert_array_equal(obs.minmax.max.numpy(), allx.max(axis=1))


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_minmax_affine_qparams(bits):
    x = torch.tensor([[-0.7, 0.3, 2.9], [0.5, 1.25, 3.0], [-4.0, -2.0, -1.0]])
    scale, zp = observe("minmax", x, bits=bits, symmetric=False, axis=0).compute()
    qmin, qmax = int_range(bits, signed=False)
    lo = np.minimum(x.numpy().astype(np.float64).min(1), 0)  # the range always contains 0
    hi = np.maximum(x.numpy().astype(np.float64).max(1), 0)
    want_scale = ((hi - lo) / (qmax - qmin)).astype(np.float32)
    want_zp = np.clip(np.round(qmin - lo / want_scale.astype(np.float64)), qmin, qmax)
    np.testing.assert_array_equal(scale.numpy(), want_scale)
    np.testing.assert_array_equal(zp.numpy(), want_zp)


def test_minmax_symmetric_qparams_and_no_clipping():
    x = torch.randn(1000) * 3
    scale, zp = observe("minmax", x, bits=4, symmetric=True).compute()
    assert scale.shape == () and zp.item() == 0
    assert scale.item() == np.float32(np.abs(x.numpy()).max().astype(np.float64) / 7)
    y = np_qdq(x.numpy().reshape(1, -1), scale, zp, -8, 7)
    assert np.abs(y - x.numpy()).max() <= scale.item() / 2 * (1 + 1e-6)


def test_all_zero_input_gives_unit_scale():
    for symmetric in (True, False):
        scale, _ = observe("minmax", torch.zeros(10), symmetric=symmetric).compute()
        assert scale.item() == 1.0


# ---------------------------------------------------------------------------------------------------------
# Percentile


def test_percentile_affine_matches_numpy():
    x = heavy_tailed((20000,))
    scale, zp = observe("percentile:99.9", x, bits=8, symmetric=False).compute()
    lo, hi = np.percentile(x.numpy().astype(np.float64), [0.1, 99.9])
    want = np.float32((max(hi, 0) - min(lo, 0)) / 255)
    assert scale.item() == pytest.approx(want, rel=1e-6)
    assert zp.item() == np.clip(np.round(-min(lo, 0) / np.float64(scale.item())), 0, 255)


def test_percentile_symmetric_per_channel_matches_numpy():
    x = heavy_tailed((4, 3000), seed=1) * torch.tensor([[1.0], [2.0], [0.5], [10.0]])
    scale, zp = observe("percentile", x, bits=8, symmetric=True, axis=0).compute()  # default 99.99
    want = np.percentile(np.abs(x.numpy()).astype(np.float64), 99.99, axis=1) / 127
    np.testing.assert_allclose(scale.numpy(), want, rtol=1e-6)
    assert torch.equal(zp, torch.zeros(4))


def test_percentile_clips_outliers_minmax_does_not():
    x = torch.cat([torch.randn(10000), torch.tensor([1000.0])])
    p_scale, _ = observe("percentile:99.9", x, symmetric=True).compute()
    m_scale, _ = observe("minmax", x, symmetric=True).compute()
    assert p_scale < m_scale / 100


# ---------------------------------------------------------------------------------------------------------
# MSE / Lp search


@pytest.mark.parametrize("method,p", [("mse", 2.0), ("lp:2", 2.0), ("lp:1", 1.0), ("lp:3.5", 3.5), ("lp:0.5", 0.5)])
@pytest.mark.parametrize("bits,symmetric,axis", [(4, True, 0), (3, False, None), (8, False, 1), (2, True, None)])
def test_search_error_not_worse_than_minmax(method, p, bits, symmetric, axis):
    x = heavy_tailed((6, 400), seed=bits) + (0.0 if symmetric else 0.7)
    qmin, qmax = int_range(bits, signed=symmetric)
    searched = observe(method, x, bits=bits, symmetric=symmetric, axis=axis).compute()
    minmax = observe("minmax", x, bits=bits, symmetric=symmetric, axis=axis).compute()
    xs = rows(x, axis)
    err_search = np_error(xs, *searched, qmin, qmax, p)
    err_minmax = np_error(xs, *minmax, qmin, qmax, p)
    assert np.all(err_search <= err_minmax)
    if bits <= 4:  # at low bits clipping heavy tails pays: the search must find it
        assert np.all(err_search < err_minmax)
        assert np.all(searched[0].numpy() < minmax[0].numpy())


def test_lp_with_p2_chooses_what_mse_chooses():
    for seed in range(3):
        x = heavy_tailed((8, 500), seed=seed) * 3 + 1
        for bits, symmetric in [(4, True), (3, False), (6, False)]:
            mse = observe("mse", x, bits=bits, symmetric=symmetric, axis=0).compute()
            lp2 = observe("lp:2", x, bits=bits, symmetric=symmetric, axis=0).compute()
            assert torch.equal(mse[0], lp2[0]) and torch.equal(mse[1], lp2[1])


def test_larger_p_keeps_a_larger_range():
    x = heavy_tailed((50000,), seed=3)
    scales = [observe(f"lp:{p}", x, bits=4, symmetric=True).compute()[0].item() for p in (1, 2, 4)]
    assert scales[0] < scales[1] < scales[2]


def test_search_uses_exported_numerics():
    """The chosen scale's error, recomputed with the FakeQuantizer, is what the search minimised."""
    x = heavy_tailed((3, 300), seed=7)
    obs = observe("mse", x, bits=4, symmetric=False, axis=0)
    scale, zp = obs.compute()
    fq = FakeQuantizer(4, symmetric=False, axis=0)
    fq.set_qparams(scale, zp)
    with torch.no_grad():
        ours = ((x - fq(x)).double() ** 2).sum(1).numpy()
    np.testing.assert_allclose(ours, np_error(x.numpy(), scale, zp, 0, 15), rtol=1e-12)


@pytest.mark.parametrize("method", ["mse", "lp:2.4", "percentile:99.9", "minmax", "lsq"])
def test_deterministic(method):
    chunks = [heavy_tailed((2, 3000), seed=s) for s in range(3)]
    a = observe(method, chunks, bits=4, symmetric=True, axis=0, capacity=1000, seed=5).compute()
    b = observe(method, chunks, bits=4, symmetric=True, axis=0, capacity=1000, seed=5).compute()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------------------
# Reservoir


def test_reservoir_holds_everything_below_capacity():
    r = Reservoir(capacity=100, seed=0)
    chunks = [torch.randn(2, 30) for _ in range(3)]
    for c in chunks:
        r.update(c)
    assert torch.equal(r.samples, torch.cat(chunks, dim=1)) and r.seen == 90


def test_reservoir_bounded_subset_and_seeded():
    stream = torch.arange(10000, dtype=torch.float32).reshape(1, -1)
    samples = {}
    for seed in (0, 0, 1):
        r = Reservoir(capacity=500, seed=seed)
        for chunk in stream.split(700, dim=1):
            r.update(chunk)
        assert r.samples.shape == (1, 500) and r.seen == 10000
        assert len(set(r.samples[0].tolist())) == 500  # distinct positions of the stream
        samples.setdefault(seed, []).append(r.samples)
    assert torch.equal(samples[0][0], samples[0][1])
    assert not torch.equal(samples[0][0], samples[1][0])


def test_reservoir_is_uniform_over_the_stream():
    """Every position is kept with probability capacity/n, early or late, in one update or many."""
    n, cap, trials = 200, 50, 400
    kept = torch.zeros(n)
    for seed in range(trials):
        r = Reservoir(capacity=cap, seed=seed)
        stream = torch.arange(n, dtype=torch.float32).reshape(1, -1)
        for chunk in stream.split(60 if seed % 2 else n, dim=1):
            r.update(chunk)
        kept[r.samples[0].long()] += 1
    rate = kept / trials  # expected 0.25 everywhere; 4 groups of 50 positions -> sd ~ 0.003
    for group in rate.split(50):
        assert abs(group.mean().item() - cap / n) < 0.02


def test_reservoir_of_one_keeps_each_position_with_probability_one_over_n():
    n, trials = 4, 800
    kept = torch.zeros(n)
    for seed in range(trials):
        r = Reservoir(capacity=1, seed=seed)
        r.update(torch.arange(n, dtype=torch.float32).reshape(1, -1))
        kept[int(r.samples.item())] += 1
    assert torch.all((kept / trials - 1 / n).abs() < 0.06), kept  # sd ~ 0.015


def test_reservoir_keeps_channels_aligned():
    x = torch.arange(5000, dtype=torch.float32).reshape(1, -1).repeat(3, 1) * torch.tensor([[1.0], [2.0], [3.0]])
    obs = observe("mse", x, axis=0, capacity=100)
    s = obs.reservoir.samples
    assert torch.equal(s[1], 2 * s[0]) and torch.equal(s[2], 3 * s[0])


# ---------------------------------------------------------------------------------------------------------
# LSQ initialisation


def test_lsq_init_per_tensor_over_a_stream():
    chunks = [torch.randn(100) * (i + 1) for i in range(3)]
    scale, zp = observe("lsq", chunks, bits=3, symmetric=True).compute()
    mean_abs = np.abs(np.concatenate([c.numpy() for c in chunks]).astype(np.float64)).mean()
    assert scale.item() == pytest.approx(2 * mean_abs / np.sqrt(3), rel=1e-6) and zp.item() == 0


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("method", ["histogram", "lp", "lp:0", "lp:-2", "lp:inf", "lp:x", "percentile:101", "mse:2"])
def test_bad_method_names(method):
    with pytest.raises(InputError, match="method"):
        parse_method(method)


def test_lsq_refuses_affine():
    with pytest.raises(InputError, match="lsq.*symmetric"):
        make_observer("lsq", IntRange.of(8, False), symmetric=False)


def test_compute_before_observing_raises():
    with pytest.raises(InputError, match="nothing observed"):
        make_observer("mse", IntRange.of(8, False), False, name="fc1").compute()


def test_channel_count_change_raises():
    obs = observe("minmax", torch.randn(3, 4), axis=0)
    with pytest.raises(InputError, match="channels"):
        obs.update(torch.randn(5, 4))


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile", "lsq", "lp:1.5"])
def test_nan_refused_by_every_observer(method):
    obs = make_observer(method, IntRange.of(8, True), True, name="decoder_softmax_3")
    with pytest.raises(InputError, match="decoder_softmax_3"):
        obs.update(torch.tensor([1.0, float("nan")]))


def test_model_batch_follows_the_model_to_its_device():
    """Loader batches are moved to the device of the graph's parameters (here the meta device)."""
    from fxq.tracing import model_batch

    gm = torch.fx.symbolic_trace(torch.nn.Conv2d(3, 4, 3)).to("meta")
    images, mask = torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool)
    (moved,) = model_batch(gm, (images, mask, [{}, {}])).inputs
    assert moved.device.type == "meta" and images.device.type == "cpu"
    gm.takes_mask = True
    assert [t.device.type for t in model_batch(gm, (images, mask, [{}, {}])).inputs] == ["meta", "meta"]


class _MaskedNet(torch.nn.Module):
    """An eager detector-like module taking (images, mask): it returns both so the test sees what it got."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(images)
        return out if mask is None else out * (~mask)[:, None]


def _batch(sizes=((8, 8), (8, 8))):
    from fxq.data import collate

    g = torch.Generator().manual_seed(0)
    return collate([(torch.randn(3, *hw, generator=g), {"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)})
                    for hw in sizes])


def test_model_batch_gives_each_model_the_inputs_its_forward_takes():
    import fxq
    from fxq.tracing import model_batch, takes_mask

    eager = _MaskedNet()
    images_only = fxq.trace(eager, torch.zeros(1, 3, 8, 8))  # graphs share the eager module's weights
    with_mask = fxq.trace(eager, (torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool)))
    plain = torch.fx.symbolic_trace(_MaskedNet())  # a GraphModule that declares nothing: two placeholders
    assert [takes_mask(m) for m in (eager, images_only, with_mask, plain)] == [True, False, True, True]
    images, mask, targets = _batch()
    for batch in ((images, mask, targets), (images, mask), [images, mask, targets]):
        got = model_batch(eager, batch)
        assert len(got.inputs) == 2 and got.inputs[0] is images and got.inputs[1] is mask
        (only,) = model_batch(images_only, batch).inputs
        assert only is images
    for batch in (images, (images,), (images, targets), (images, None, targets)):
        assert model_batch(images_only, batch).inputs == (images,)
    got = model_batch(with_mask, (images, mask, targets), need_targets=True)
    assert all(torch.equal(g["boxes"], t["boxes"]) for g, t in zip(got.targets, targets, strict=True))
    assert torch.equal(with_mask(*got.inputs), eager(images, mask))
    assert model_batch(images_only, (images, targets)).targets == targets


def test_model_batch_refusals_name_the_cause():
    import fxq
    from fxq.tracing import model_batch

    images_only = fxq.trace(_MaskedNet(), torch.zeros(1, 3, 8, 8))
    images, mask, targets = _batch()
    with pytest.raises(InputError, match="batch 3: _MaskedNet takes a padding mask .* has none"):
        model_batch(_MaskedNet(), images, index=3)
    with pytest.raises(InputError, match="needs ground truth"):
        model_batch(images_only, (images, mask), need_targets=True)
    with pytest.raises(InputError, match="2 images but 1 target dicts"):
        model_batch(images_only, (images, mask, targets[:1]), need_targets=True)
    with pytest.raises(InputError, match="bool tensor of shape"):
        model_batch(_MaskedNet(), (images, mask.float(), targets))
    with pytest.raises(InputError, match="a batch must be"):
        model_batch(images_only, {"images": images})
    bad = images.clone()
    bad[1, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match=r"batch 0: images \[1\] hold NaN/inf"):
        model_batch(images_only, (bad, mask, targets), index=0)
    padded = _batch(((8, 8), (8, 6)))
    assert padded[1].any()
    with pytest.raises(InputError, match="padded .*takes no padding mask"):
        model_batch(images_only, padded, need_targets=True)
    assert model_batch(images_only, padded).inputs == (padded[0],)  # calibration sees padded images as they are
    assert len(model_batch(_MaskedNet(), padded, need_targets=True).inputs) == 2  # a model with a mask is fine
