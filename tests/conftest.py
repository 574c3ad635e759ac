"""Shared pytest setup: few threads (the suite shares two cores) and a float64 fixture."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one thread, and a test whose code changes the count (the CLI's ``--threads``,
    ``scorekit demo``) cannot leak it into the next: on a busy 2-core machine two threads per process
    were measured many-fold slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype, restoring the previous default after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def mixture_ode():
    """The PF-ODE of an exact 3-component 2-D mixture from sigma 10 to 0.05, solved by scipy's DOP853
    at 1e-13 (the reference of the sampler order tests): ``(mixture, start [16, 2], solution)``."""
    import math

    from scipy.integrate import solve_ivp

    from scorekit.analytic import GaussianMixture

    gm = GaussianMixture(
        torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], dtype=torch.float64),
        torch.tensor([[0.3, 0.2], [0.2, 0.4], [0.25, 0.25]], dtype=torch.float64),
    )
    hi, lo, batch = 10.0, 0.05, 16
    x0 = hi * torch.randn(batch, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def rhs(u, y):
        x = torch.from_numpy(y).reshape(batch, 2)
        return (x - gm.denoise(x, math.exp(u))).reshape(-1).numpy()

    sol = solve_ivp(rhs, (math.log(hi), math.log(lo)), x0.reshape(-1).numpy(), method="DOP853",
                    rtol=1e-13, atol=1e-13)  # fmt: skip
    assert sol.success
    return gm, x0, torch.from_numpy(sol.y[:, -1].copy()).reshape(batch, 2)


def _fine_start(n: int) -> torch.Tensor:
    """Log-linear sigmas from 10 to 0.05 with step ``h`` whose first two steps are ``h^2/4``: the
    lower-order warm-up of a multistep method then costs O(h^4) locally, so the global error shows
    the order of its multistep steps. ``n`` steps, then 0."""
    import math

    hi, lo = math.log(10.0), math.log(0.05)
    h = (hi - lo) / (n - 1)
    d = h * h / 4
    body = torch.linspace(hi - 2 * d, lo, n - 2, dtype=torch.float64)[1:]
    logs = torch.cat([torch.tensor([hi, hi - d, hi - 2 * d], dtype=torch.float64), body])
    return torch.cat([logs.exp(), torch.zeros(1, dtype=torch.float64)])


@pytest.fixture(scope="session")
def fine_start_grid():
    """``n -> sigmas``: the fine-start grid of the multistep order tests, on ``mixture_ode``'s range."""
    return _fine_start
