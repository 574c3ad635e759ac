"""One contract suite over every measurement operator: adjointness, SVD, shapes, errors."""

from __future__ import annotations

import pytest
import torch

from scorekit.inverse import (
    OPERATORS,
    Blur,
    Compose,
    Downsample,
    Identity,
    Mask,
    Matrix,
    Saturate,
    as_matrix,
)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _cases():
    g = _g(7)
    box = torch.ones(2, 6, 6)
    box[:, 1:4, 2:5] = 0
    return {
        "identity_vec": Identity([5]),
        "identity_img": Identity([2, 3, 4]),
        "mask_vec": Mask(torch.tensor([1, 0, 1, 1, 0])),
        "mask_box": Mask(box),
        "matrix_wide": Matrix(torch.randn(3, 7, generator=g, dtype=torch.float64)),
        "matrix_tall": Matrix(torch.randn(6, 4, generator=g, dtype=torch.float64)),
        "matrix_img": Matrix(torch.randn(5, 12, generator=g, dtype=torch.float64), shape=[3, 2, 2]),
        "matrix_zero": Matrix(torch.zeros(1, 2, dtype=torch.float64)),
        "downsample2": Downsample(2, [2, 4, 6]),
        "downsample3": Downsample(3, [1, 6, 6]),
        "blur_gauss": Blur([2, 8, 6], sigma=1.0),
        "blur_box": Blur([1, 7, 5], size=3),
        "blur_asym": Blur([1, 5, 5], kernel=torch.tensor([[0.5, 0.3], [0.2, 0.0]])),
        "blur_reflect": Blur([2, 6, 7], sigma=0.9, padding="reflect"),
        "blur_reflect_asym": Blur(
            [1, 5, 4], kernel=torch.tensor([[0.5, 0.3], [0.2, 0.1]]), padding="reflect"
        ),
        "compose": Compose(Downsample(2, [1, 4, 4]), Blur([1, 4, 4], size=3)),
    }


CASES = _cases()
LINEAR = {k: v for k, v in CASES.items()}
SVD = [k for k, v in CASES.items() if v.has_svd]


def test_cases_cover_every_operator():
    covered = {type(op) for op in CASES.values()} | {Saturate}
    assert covered == set(OPERATORS.values())
    assert {"blur_gauss", "blur_box", "mask_box", "downsample2", "matrix_zero"} <= set(SVD)
    assert "blur_asym" not in SVD and "compose" not in SVD and "blur_reflect" not in SVD


@pytest.mark.parametrize("name", list(LINEAR))
def test_shapes_and_adjointness(name):
    op = CASES[name]
    u = torch.randn(3, *op.in_shape, generator=_g(1), dtype=torch.float64)
    v = torch.randn(3, *op.out_shape, generator=_g(2), dtype=torch.float64)
    au, atv = op.forward(u), op.adjoint(v)
    assert au.shape == (3, *op.out_shape) and atv.shape == (3, *op.in_shape)
    lhs = (au * v).flatten(1).sum(1)
    rhs = (u * atv).flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(LINEAR))
def test_dense_matrix_matches_forward_and_adjoint(name):
    op = CASES[name]
    a = as_matrix(op)
    x = torch.randn(4, *op.in_shape, generator=_g(3), dtype=torch.float64)
    y = torch.randn(4, *op.out_shape, generator=_g(4), dtype=torch.float64)
    assert torch.allclose(op.forward(x).flatten(1), x.flatten(1) @ a.T, atol=1e-12)
    assert torch.allclose(op.adjoint(y).flatten(1), y.flatten(1) @ a, atol=1e-12)


def test_known_matrices():
    """The operators are the matrices they claim (built here independently)."""
    m = as_matrix(Mask(torch.tensor([0, 1, 1])))
    assert torch.equal(m, torch.tensor([[0.0, 1, 0], [0, 0, 1]], dtype=torch.float64))
    d = as_matrix(Downsample(2, [1, 2, 4]))
    assert torch.allclose(
        d,
        torch.tensor(
            [[0.25, 0.25, 0, 0, 0.25, 0.25, 0, 0], [0, 0, 0.25, 0.25, 0, 0, 0.25, 0.25]],
            dtype=torch.float64,
        ),
    )
    # circular box blur in 1 x 3 x 3: every output is the mean of its periodic 3 x 3 neighbourhood
    b = as_matrix(Blur([1, 3, 3], size=3))
    assert torch.allclose(b, torch.full((9, 9), 1 / 9, dtype=torch.float64))
    # a shifted kernel: y[i, j] = x[i - 1, j] (the kernel's centre is at index (1, 1))
    k = torch.zeros(3, 3, dtype=torch.float64)
    k[2, 1] = 1.0
    x = torch.randn(1, 1, 4, 5, generator=_g(5), dtype=torch.float64)
    y = Blur([1, 4, 5], kernel=k).forward(x)
    assert torch.allclose(y, torch.roll(x, 1, 2), atol=1e-12)


@pytest.mark.parametrize("name", SVD)
def test_svd_reconstructs_the_operator(name):
    op = CASES[name]
    a = as_matrix(op)
    d, s = op.in_dim, op.singular_values
    r = len(s)
    eye_d = torch.eye(d, dtype=torch.float64)
    vt = op.svd_vt(eye_d.reshape(d, *op.in_shape)).T  # columns: V^T e_j -> V^T [d, d]
    assert torch.allclose(vt @ vt.T, eye_d, atol=1e-12)  # V orthonormal
    u = op.svd_u(torch.eye(r, dtype=torch.float64)).reshape(r, -1).T  # U [m, r]
    assert torch.allclose(u.T @ u, torch.eye(r, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(u @ torch.diag(s.double()) @ vt[:r], a, atol=1e-12)
    assert (s >= 0).all()
    # the function pairs are inverse / transpose of each other
    x = torch.randn(3, *op.in_shape, generator=_g(6), dtype=torch.float64)
    assert torch.allclose(op.svd_v(op.svd_vt(x)), x, atol=1e-12)
    y = torch.randn(3, *op.out_shape, generator=_g(7), dtype=torch.float64)
    assert torch.allclose(op.svd_ut(y), y.flatten(1) @ u, atol=1e-12)


def test_saturate_is_a_differentiable_nonlinear_measurement():
    A = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    op = Saturate(Matrix(A), scale=0.5)
    x = torch.tensor([[0.3, -0.1], [2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = op.forward(x)
    assert torch.allclose(y, 0.5 * torch.tanh((x @ A.T) / 0.5))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, (1 - torch.tanh(x @ A.T / 0.5) ** 2) * A)
    assert not op.linear
    with pytest.raises(ValueError, match="not linear"):
        op.adjoint(y)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Mask(torch.tensor([1, 2, 0])), "mask must hold only 0"),
        (lambda: Mask(torch.zeros(3)), "observes nothing"),
        (
            lambda: Mask(torch.ones(3)).forward(torch.ones(2, 4)),
            r"x given to Mask.forward must have shape \[B, \*\[3\]\]; got \(2, 4\)",
        ),
        (lambda: Matrix(torch.ones(3)), "A must be a non-empty"),
        (lambda: Matrix(torch.ones(2, 3), shape=[2, 2]), "has 4 values"),
        (lambda: Matrix(torch.ones(2, 3)).adjoint(torch.ones(1, 3)), "y given to Matrix.adjoint"),
        (lambda: Downsample(2, [1, 5, 4]), "divisible by factor 2"),
        (lambda: Downsample(0, [1, 4, 4]), "factor must be a positive int"),
        (lambda: Blur([1, 4, 4], sigma=1.0, padding="zero"), "allowed: 'circular', 'reflect'"),
        (lambda: Blur([1, 4, 4]), "exactly one of"),
        (lambda: Blur([1, 4, 4], size=2), "odd positive"),
        (lambda: Compose(Downsample(2, [1, 4, 4]), Identity([3])), "cannot compose"),
        (
            lambda: Compose(Identity([3]), Matrix(torch.ones(3, 3))).svd_vt(torch.ones(1, 3)),
            "has no SVD",
        ),
        (lambda: Saturate(Identity([2]), scale=0.0), "scale must be"),
        (lambda: as_matrix(Saturate(Identity([2]))), "needs a linear Operator"),
    ],
)
def test_bad_input_is_one_clear_line(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_matrix_svd_is_float64_for_a_float32_matrix():
    a = torch.randn(4, 6, generator=_g(9))  # float32
    op = Matrix(a)
    assert op.singular_values.dtype == torch.float64
    vt = op.svd_vt(torch.eye(6, dtype=torch.float64)).T
    u = op.svd_u(torch.eye(4, dtype=torch.float64)).T
    assert torch.allclose(u @ torch.diag(op.singular_values) @ vt[:4], a.double(), atol=1e-12)


def test_reflect_blur_is_the_convolution_of_the_mirrored_image():
    """Against ``numpy.pad(mode="reflect")`` and a direct sum ``sum_ab k[a, b] x[i - a + 1, j - b + 1]``
    (3x3 kernel centred at (1, 1)); the interior equals the circular blur; DDRM refuses it by name."""
    import numpy as np

    from scorekit.inverse import ddrm

    k = torch.rand(3, 3, generator=_g(3), dtype=torch.float64)
    x = torch.randn(2, 1, 5, 6, generator=_g(4), dtype=torch.float64)
    op = Blur([1, 5, 6], kernel=k, padding="reflect")
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    want = np.zeros(x.shape)
    for i in range(5):
        for j in range(6):
            for a in range(3):
                for b in range(3):
                    want[..., i, j] += float(k[a, b]) * xp[..., i - a + 2, j - b + 2]
    assert np.abs(op.forward(x).numpy() - want).max() < 1e-13
    circ = Blur([1, 5, 6], kernel=k).forward(x)
    assert torch.allclose(op.forward(x)[..., 1:4, 1:5], circ[..., 1:4, 1:5], atol=1e-13)
    with pytest.raises(ValueError, match="ddrm needs an operator with an SVD; got Blur") as err:
        ddrm(lambda v, s: v, torch.zeros(1, 1, 5, 6), op, torch.zeros(1, 1, 5, 6),
             torch.tensor([1.0, 0.0]), sigma_y=0.1)  # fmt: skip
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="reflect padding needs kernel half-widths below"):
        Blur([1, 3, 3], size=7, padding="reflect")
