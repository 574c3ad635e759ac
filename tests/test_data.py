"""Data sets: built-ins, normalisation round trips, split, user files and their error messages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from scorekit.data import BUILTIN, Dataset, Normalization, load, split

TOY = ["moons", "swiss_roll", "ring", "checkerboard", "pinwheel"]
TOY_CLASSES = {"moons": 2, "swiss_roll": 0, "ring": 8, "checkerboard": 8, "pinwheel": 5}


# --------------------------------------------------------------------------------------------------
# Built-ins.


def test_builtin_table():
    assert sorted(BUILTIN) == sorted([*TOY, "digits"])


@pytest.mark.parametrize("name", TOY)
def test_toy_sets(name):
    ds = load(name)
    assert isinstance(ds, Dataset) and ds.kind == "vector" and ds.name == name
    assert ds.x.shape == (20_000, 2) and ds.shape == (2,) and ds.x.dtype == torch.float32
    assert ds.num_classes == TOY_CLASSES[name]
    if ds.num_classes:
        assert ds.labels.dtype == torch.long and ds.labels.shape == (20_000,)
        assert set(ds.labels.unique().tolist()) == set(range(ds.num_classes))
    else:
        assert ds.labels is None
    # Standardised per feature.
    assert torch.allclose(ds.x.double().mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        ds.x.double().std(0, correction=0), torch.ones(2, dtype=torch.float64), atol=1e-4
    )
    # Deterministic in the seed.
    assert torch.equal(ds.x, load(name, seed=0).x)
    assert not torch.allclose(ds.x, load(name, seed=1).x)
    # decode(x) is the raw data; encoding it again gives x back.
    raw = ds.normalization.decode(ds.x)
    assert torch.allclose(ds.normalization.encode(raw), ds.x, atol=1e-5)


def test_toy_geometry_in_raw_units():
    # ring: 8 Gaussians of std 0.1 at radius sqrt(1.98), so each coordinate has variance exactly 1.
    ring = load("ring")
    raw = ring.normalization.decode(ring.x).double()
    assert torch.allclose(raw.var(0), torch.ones(2, dtype=torch.float64), atol=0.03)
    ang = ring.labels.double() * (2 * math.pi / 8)
    centres = math.sqrt(1.98) * torch.stack([ang.cos(), ang.sin()], 1)
    assert (raw - centres).std() == pytest.approx(0.1, rel=0.03)
    # checkerboard: every point on a dark square of the 4x4 board on [-2, 2]^2, marginals uniform.
    cb = load("checkerboard")
    raw = cb.normalization.decode(cb.x).double()
    assert raw.min() >= -2 and raw.max() <= 2
    cells = torch.floor(raw + 2).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert torch.allclose(raw.var(0), torch.full((2,), 4 / 3, dtype=torch.float64), atol=0.04)
    # moons: the upper moon lies near the unit circle.
    moons = load("moons")
    raw = moons.normalization.decode(moons.x).double()
    r = raw[moons.labels == 0].norm(dim=1)
    assert (r - 1).abs().mean() < 0.06


def test_digits():
    from sklearn.datasets import load_digits

    ds = load("digits")
    assert ds.kind == "image" and ds.x.shape == (1797, 1, 8, 8) and ds.shape == (1, 8, 8)
    assert ds.num_classes == 10 and ds.labels.dtype == torch.long
    assert (
        repr(ds) == "Dataset(name='digits', kind='image', n=1797, shape=(1, 8, 8), num_classes=10)"
    )
    assert ds.x.min() == -1 and ds.x.max() == 1
    ref = load_digits()
    # Pixels 0..16 map affinely onto [-1, 1]: x = (p - 8) / 8.
    assert torch.equal(ds.x[:, 0], torch.tensor((ref.images - 8) / 8, dtype=torch.float32))
    assert torch.equal(ds.labels, torch.tensor(ref.target))
    assert np.array_equal(ds.normalization.decode(ds.x).numpy(), ref.images.astype(np.float32))


def test_unknown_name_lists_builtins():
    with pytest.raises(
        ValueError, match=r"'nope'.*\['checkerboard', 'digits', 'moons'.*\.npy.*\.csv"
    ):
        load("nope")


# --------------------------------------------------------------------------------------------------
# Normalisation and split.


@pytest.mark.parametrize(
    ("norm", "raw"),
    [
        (
            Normalization((1.0, -2.0, 3.0), (2.0, 0.5, 4.0), "vector"),
            np.random.default_rng(0).normal(size=(5, 3)),
        ),
        (
            Normalization((127.5,), (127.5,), "NHWC"),
            np.random.default_rng(1).integers(0, 256, (2, 4, 6, 3)),
        ),
        (Normalization((8.0,), (8.0,), "NHW"), np.random.default_rng(2).integers(0, 17, (3, 8, 8))),
        (Normalization((0.5,), (0.5,), "NCHW"), np.random.default_rng(3).random((2, 3, 4, 4))),
    ],
)
def test_normalization_round_trip(norm, raw):
    x = norm.encode(raw)
    assert x.dtype == torch.float32
    assert x.ndim == (2 if norm.layout == "vector" else 4)
    if norm.layout == "NHWC":
        assert x.shape == (2, 3, 4, 6)
        assert torch.allclose(
            x[:, 1], torch.tensor((raw[..., 1] - 127.5) / 127.5, dtype=torch.float32)
        )
    if norm.layout == "vector":
        ref = (raw - np.array(norm.shift)) / np.array(norm.scale)
        assert np.allclose(x.numpy(), ref, atol=1e-6)
    back = norm.decode(x)
    assert back.shape == raw.shape
    assert np.allclose(back.numpy(), raw, rtol=1e-6, atol=1e-5)
    again = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm


def test_normalization_errors():
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        Normalization((0.0,), (0.0,), "vector")
    with pytest.raises(ValueError, match="layout"):
        Normalization((0.0,), (1.0,), "HWC")
    with pytest.raises(ValueError, match="keys"):
        Normalization.from_dict({"shift": [0.0]})
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        Normalization((0.0, 0.0), (1.0, 1.0), "vector").encode(np.zeros((3, 3)))


def test_split():
    ds = load("digits")
    train, test = split(ds, holdout=0.2, seed=0)
    assert len(train) + len(test) == len(ds)
    # Stratified: each class loses round(0.2 n_k) examples to the test part.
    counts = ds.labels.bincount()
    assert torch.equal(
        test.labels.bincount(minlength=10), torch.round(0.2 * counts.double()).long()
    )
    # Disjoint and covering: match rows back to the original through their pixels.
    key = lambda d: {tuple(r) for r in d.x.reshape(len(d), -1).tolist()}  # noqa: E731
    assert key(train) | key(test) == key(ds)
    assert train.normalization == ds.normalization and test.shape == ds.shape
    again, _ = split(ds, holdout=0.2, seed=0)
    assert torch.equal(again.x, train.x)
    other, _ = split(ds, holdout=0.2, seed=1)
    assert not torch.equal(other.x, train.x)
    # Unlabelled data: a plain random split.
    tr, te = split(load("swiss_roll"), holdout=0.25)
    assert (len(tr), len(te)) == (15_000, 5_000)
    with pytest.raises(ValueError, match="holdout"):
        split(ds, holdout=1.0)


# --------------------------------------------------------------------------------------------------
# .npy files.


def test_npy_vectors_and_images(tmp_path):
    rng = np.random.default_rng(0)
    vec = rng.normal(3.0, 2.0, size=(50, 4))
    vec[:, 2] = 7.0  # a constant feature keeps scale 1 instead of dividing by 0
    np.save(tmp_path / "v.npy", vec)
    ds = load(tmp_path / "v.npy")
    assert ds.kind == "vector" and ds.x.shape == (50, 4) and ds.labels is None
    assert ds.name == str(tmp_path / "v.npy")
    assert torch.allclose(ds.x[:, 2], torch.zeros(50))
    assert np.allclose(ds.normalization.decode(ds.x).numpy(), vec, atol=1e-5)

    gray = rng.integers(0, 256, (6, 4, 8), dtype=np.uint8)
    np.save(tmp_path / "g.npy", gray)
    ds = load(tmp_path / "g.npy")
    assert ds.kind == "image" and ds.x.shape == (6, 1, 4, 8)
    assert torch.allclose(ds.x[:, 0], torch.tensor(gray / 127.5 - 1, dtype=torch.float32))
    # float32 storage: decode(encode(p)) == p up to rounding (p / 127.5 is not exact in binary).
    assert np.allclose(ds.normalization.decode(ds.x).numpy(), gray, rtol=0, atol=1e-4)

    hwc = rng.random((5, 6, 6, 3)).astype(np.float32)  # floats in [0, 1]
    np.save(tmp_path / "hwc.npy", hwc)
    ds = load(tmp_path / "hwc.npy")
    assert ds.x.shape == (5, 3, 6, 6)
    assert torch.allclose(ds.x, torch.tensor(hwc * 2 - 1).permute(0, 3, 1, 2), atol=1e-6)
    assert ds.normalization.decode(ds.x).shape == (5, 6, 6, 3)

    # Floats outside [-1, 1] and [0, 1] use their own range: digits' 0..16 map onto [-1, 1].
    wide = rng.uniform(0, 16, (5, 4, 4))
    wide[0, 0, 0], wide[1, 1, 1] = 0.0, 16.0
    np.save(tmp_path / "wide.npy", wide)
    ds = load(tmp_path / "wide.npy")
    assert torch.allclose(ds.x[:, 0], torch.tensor((wide - 8) / 8, dtype=torch.float32), atol=1e-6)

    chw = rng.uniform(-1, 1, (5, 3, 4, 4))
    np.save(tmp_path / "chw.npy", chw)
    ds = load(tmp_path / "chw.npy")
    assert ds.x.shape == (5, 3, 4, 4)
    assert torch.allclose(ds.x, torch.tensor(chw, dtype=torch.float32))


def test_npy_errors(tmp_path):
    bad = np.ones((10, 3))
    bad[4, 1] = np.nan
    bad[7, 0] = np.inf
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match=r"nan\.npy.*NaN or inf.*rows \[4, 7\]"):
        load(tmp_path / "nan.npy")
    np.save(tmp_path / "flat.npy", np.ones(5))
    with pytest.raises(ValueError, match=r"flat\.npy.*\[N, d\].*\(5,\).*\[N, 1\]"):
        load(tmp_path / "flat.npy")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npy: the file is empty"):
        load(tmp_path / "empty.npy")
    np.save(tmp_path / "zero.npy", np.ones((0, 3)))
    with pytest.raises(ValueError, match=r"zero\.npy: the array is empty"):
        load(tmp_path / "zero.npy")
    np.save(tmp_path / "str.npy", np.array([["a", "b"]]))
    with pytest.raises(ValueError, match=r"str\.npy: expected a numeric array"):
        load(tmp_path / "str.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"junk\.npy: cannot read"):
        load(tmp_path / "junk.npy")
    (tmp_path / "data.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"data\.txt: unknown extension '\.txt'.*\.npy.*\.csv"):
        load(tmp_path / "data.txt")


# --------------------------------------------------------------------------------------------------
# .csv files.


def test_csv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,label,b\n1.5,cat,2\n-1,dog,0\n3,cat,1e1\n\n")
    ds = load(p)
    assert ds.kind == "vector" and ds.x.shape == (3, 2)
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 1, 0]
    raw = np.array([[1.5, 2], [-1, 0], [3, 10]])
    assert np.allclose(ds.normalization.decode(ds.x).numpy(), raw, atol=1e-5)
    assert np.allclose(ds.x.numpy(), (raw - raw.mean(0)) / raw.std(0), atol=1e-5)

    p = tmp_path / "n.csv"
    p.write_text("label,x\n2,0.5\n0,1.5\n2,2.0\n")
    ds = load(p)
    assert ds.labels.tolist() == [2, 0, 2] and ds.num_classes == 3

    p = tmp_path / "noheader.csv"
    p.write_text("1,2,3\n4,5,6\n")
    ds = load(p)
    assert ds.x.shape == (2, 3) and ds.labels is None


def test_csv_errors(tmp_path):
    p = tmp_path / "ragged.csv"
    p.write_text("a,b,c\n1,2,3\n4,5\n")
    with pytest.raises(ValueError, match=r"ragged\.csv: row 3 has 2 columns, expected 3"):
        load(p)
    p = tmp_path / "text.csv"
    p.write_text("a,b\n1,2\n3,oops\n")
    with pytest.raises(
        ValueError, match=r"text\.csv: row 3, column 2 \('b'\): non-numeric value 'oops'"
    ):
        load(p)
    p = tmp_path / "blank.csv"
    p.write_text("1,2\n3,\n")
    with pytest.raises(ValueError, match=r"blank\.csv: row 2, column 2: non-numeric value ''"):
        load(p)
    p = tmp_path / "nan.csv"
    p.write_text("a,b\n1,2\n3,nan\n5,6\n7,inf\n")
    with pytest.raises(ValueError, match=r"nan\.csv: NaN or inf values in rows \[3, 5\]"):
        load(p)
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv: the file is empty"):
        load(p)
    p = tmp_path / "binary.csv"
    p.write_bytes(b"1,2\n\xff\xfe,3\n")
    with pytest.raises(ValueError, match=r"binary\.csv: cannot read as UTF-8 CSV"):
        load(p)
    p = tmp_path / "header.csv"
    p.write_text("a,b\n")
    with pytest.raises(
        ValueError, match=r"header\.csv: the file has a header row but no data rows"
    ):
        load(p)


# --------------------------------------------------------------------------------------------------
# Image folders.


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {
        f"{c}/{i}.png": rng.integers(0, 256, (4, 6), dtype=np.uint8)
        for c in ("b", "a")
        for i in range(2)
    }
    for name, arr in imgs.items():
        _png(tmp_path / name, arr)
    (tmp_path / ".DS_Store").write_bytes(b"x")  # hidden files are ignored
    ds = load(tmp_path)
    assert ds.kind == "image" and ds.x.shape == (4, 1, 4, 6)
    assert ds.class_names == ("a", "b") and ds.labels.tolist() == [0, 0, 1, 1]
    order = ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
    raw = np.stack([imgs[k] for k in order])
    assert np.allclose(ds.normalization.decode(ds.x).numpy(), raw, rtol=0, atol=1e-4)
    assert torch.allclose(ds.x[:, 0], torch.tensor(raw / 127.5 - 1, dtype=torch.float32))


def test_image_folder_rgb_jpeg_and_mixed_modes(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (5, 5), dtype=np.uint8)
    _png(tmp_path / "a.png", rgb)
    _png(tmp_path / "b.png", gray)
    yy, xx = np.mgrid[0:5, 0:5]
    smooth = np.stack([20 * xx + 60, 20 * yy + 80, np.full((5, 5), 120)], axis=2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "c.JPG", quality=95)
    opaque = np.concatenate([rgb, np.full((5, 5, 1), 255, np.uint8)], axis=2)
    _png(tmp_path / "d.png", opaque)
    ds = load(tmp_path)
    assert ds.x.shape == (4, 3, 5, 5) and ds.labels is None
    raw = ds.normalization.decode(ds.x).numpy()
    assert raw.shape == (4, 5, 5, 3)
    same = lambda a, b: np.allclose(a, b, rtol=0, atol=1e-4)  # noqa: E731
    assert same(raw[0], rgb) and same(raw[3], rgb)
    assert all(same(raw[1, ..., c], gray) for c in range(3))  # grayscale repeated to RGB
    assert np.abs(raw[2] - smooth).max() < 12  # JPEG is lossy, but it is the same picture


def test_image_folder_errors(tmp_path):
    a = tmp_path / "sizes"
    _png(a / "0.png", np.zeros((4, 4), np.uint8))
    _png(a / "1.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(
        ValueError,
        match=r"1\.png: image size 4x5 \(WxH\) differs from the first image .*0\.png \(4x4\)",
    ):
        load(a)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: the folder is empty"):
        load(tmp_path / "empty")
    b = tmp_path / "ext"
    _png(b / "0.png", np.zeros((4, 4), np.uint8))
    (b / "notes.txt").write_text("hi")
    with pytest.raises(
        ValueError,
        match=r"notes\.txt: unknown image extension '\.txt'; allowed: \['\.png', '\.jpg', '\.jpeg'\]",
    ):
        load(b)
    c = tmp_path / "mixed"
    _png(c / "cls" / "0.png", np.zeros((4, 4), np.uint8))
    _png(c / "loose.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"mixed: mixes class subfolders \(cls.*loose\.png"):
        load(c)
    d = tmp_path / "emptyclass"
    _png(d / "x" / "0.png", np.zeros((4, 4), np.uint8))
    (d / "y").mkdir()
    with pytest.raises(ValueError, match=r"y: the class folder is empty"):
        load(d)
    e = tmp_path / "alpha"
    _png(e / "0.png", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"0\.png: the image has a transparent alpha channel"):
        load(e)
    f = tmp_path / "broken"
    f.mkdir()
    (f / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"0\.png: cannot read as an image"):
        load(f)
