"""L(N, D) = E + A/N^alpha + B/D^beta: synthetic recovery, compute-optimal allocation, Epoch AI reproduction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from analysis.chinchilla import (
    DELTA,
    GRAD_RTOL,
    allocation_exponents,
    bootstrap_chinchilla,
    compute_optimal,
    fit_chinchilla,
    gradient_norm,
    hoffmann_grid,
    load_epoch_csv,
)

EPOCH_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "chinchilla_epoch"
TRUTH = {"E": 1.8, "A": 480.0, "B": 2100.0, "alpha": 0.35, "beta": 0.37}


def _law(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _synthetic():
    n, d = np.meshgrid(np.geomspace(7e7, 1.6e10, 8), np.geomspace(2e9, 5e11, 8))
    n, d = n.ravel(), d.ravel()
    return n, d, _law(TRUTH, n, d)


def test_hoffmann_grid_shape_and_values():
    grid = hoffmann_grid()
    assert grid.shape == (4500, 5)
    assert sorted(set(grid[:, 0])) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert sorted(set(grid[:, 1])) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    assert sorted(set(grid[:, 4])) == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_recovers_known_surface():
    n, d, loss = _synthetic()
    starts = hoffmann_grid()[::9]  # a 500-point subset keeps the test fast
    fit = fit_chinchilla(n, d, loss, starts=starts)
    assert fit.ok, fit.message
    for key, value in TRUTH.items():
        assert fit.params[key] == pytest.approx(value, rel=1e-4), key
    assert np.allclose(fit.predict(n, d), loss, rtol=1e-8)


def test_fit_stopped_by_iteration_limit_is_not_ok():
    n, d, loss = _synthetic()
    fit = fit_chinchilla(n, d, loss, starts=hoffmann_grid()[::90], maxiter=3)
    assert not fit.converged and not fit.ok


def test_compute_optimal_allocation():
    a, b = allocation_exponents(TRUTH["alpha"], TRUTH["beta"])
    assert a + b == pytest.approx(1.0) and a == pytest.approx(0.37 / 0.72)
    compute = np.array([1e21, 5.76e23])
    n_opt, d_opt = compute_optimal(TRUTH, compute)
    assert np.allclose(6 * n_opt * d_opt, compute)
    assert np.log(n_opt[1] / n_opt[0]) / np.log(compute[1] / compute[0]) == pytest.approx(a)
    # N_opt minimises the loss along the iso-FLOP line C = 6·N·D.
    n_scan = n_opt[1] * np.geomspace(0.5, 2.0, 2001)
    losses = _law(TRUTH, n_scan, compute[1] / (6 * n_scan))
    assert n_scan[np.argmin(losses)] == pytest.approx(n_opt[1], rel=1e-3)


@pytest.fixture(scope="module")
def epoch():
    if not EPOCH_DIR.is_dir():
        pytest.skip(f"Epoch data not present at {EPOCH_DIR}")
    n, d, loss = load_epoch_csv(EPOCH_DIR)
    return n, d, loss, fit_chinchilla(n, d, loss)


def test_epoch_reproduction(epoch):
    n, d, loss, fit = epoch
    assert loss.size == 240
    assert fit.ok, fit.message
    p = fit.params
    # Epoch AI (Besiroglu et al. 2024): 95 % CIs alpha (0.317, 0.373), beta (0.331, 0.415); E = 1.817 (SE 0.026);
    # a = 0.513 ± 0.020.
    assert 0.317 < p["alpha"] < 0.373
    assert 0.331 < p["beta"] < 0.415
    assert abs(p["E"] - 1.817) < 2 * 0.026
    assert abs(fit.a - 0.513) < 0.04
    boot = bootstrap_chinchilla(n, d, loss, fit, n_resamples=100, seed=0)
    assert boot.n_failed <= 5
    # Bootstrap SEs of the right size (Epoch, 4000 resamples: alpha 0.015, beta 0.021, E 0.026, a 0.020).
    assert 0.008 < boot.se["alpha"] < 0.03 and 0.01 < boot.se["beta"] < 0.04
    assert 0.013 < boot.se["E"] < 0.05 and 0.01 < boot.se["a"] < 0.04
    assert boot.ci95["alpha"][0] < p["alpha"] < boot.ci95["alpha"][1]


def test_mean_reduced_loose_objective_stops_early(epoch):
    """The pitfall behind Hoffmann's a ≈ 0.46: averaging the Huber loss makes it ~240x smaller, L-BFGS-B's
    default tolerance is met early and it reports success far from the optimum. The summed-loss gradient
    check used by `fit_chinchilla` exposes it."""
    n, d, loss, fit = epoch
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)

    def mean_huber(theta):
        e, a, b, al, be = theta
        r = np.logaddexp(np.logaddexp(a - al * log_n, b - be * log_d), e) - log_l
        return np.mean(np.where(np.abs(r) <= DELTA, 0.5 * r**2, DELTA * (np.abs(r) - 0.5 * DELTA)))

    res = minimize(mean_huber, np.array([0.5, 5.0, 5.0, 0.5, 0.5]), method="L-BFGS-B")
    early = {"E": np.exp(res.x[0]), "A": np.exp(res.x[1]), "B": np.exp(res.x[2]), "alpha": res.x[3], "beta": res.x[4]}
    assert res.success  # scipy is satisfied ...
    assert abs(early["alpha"] - fit.params["alpha"]) > 0.03  # ... far from the optimum ...
    assert gradient_norm(early, n, d, loss) > 10 * GRAD_RTOL * DELTA * loss.size  # ... and not stationary
    assert gradient_norm(fit.params, n, d, loss) <= GRAD_RTOL * DELTA * loss.size
