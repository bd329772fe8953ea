"""Two-variable Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, approach 3).

Recipe, as in Hoffmann et al. and Epoch AI's replication (Besiroglu et al. 2024):
- parameterise E = e^e, A = e^a, B = e^b and predict in log space:
  log L̂ = logsumexp(a − alpha·log N, b − beta·log D, e);
- minimise the SUMMED Huber loss (delta = 1e-3) of log L̂ − log L. A mean-reduced objective is ~240× smaller and
  L-BFGS stops on its tolerance long before the optimum (this is what produced Hoffmann's a ≈ 0.46);
- start from Hoffmann's grid: alpha, beta in {0, 0.5, ..., 2}, e in {−1, −0.5, ..., 1}, a, b in {0, 5, ..., 25}
  (4500 starts), all run at once by `multistart.minimize_batched`, then the best polished by scipy L-BFGS-B;
- unbounded, as in the original recipe;
- uncertainty: bootstrap over points (rows resampled with replacement), each resample warm-started from the point
  estimate (Epoch: 4000 resamples).

Compute-optimal allocation under C = 6·N·D: N_opt(C) = G·(C/6)^a, D_opt(C) = G^−1·(C/6)^b with
a = beta/(alpha+beta), b = alpha/(alpha+beta), G = (alpha·A/(beta·B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import csv
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import special

from analysis.multistart import minimize_batched, solve_multistart

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
DELTA = 1e-3
# Accept a fit as converged when the gradient inf-norm is below GRAD_RTOL·delta·n: every point contributes at most
# delta·|d log L̂/d theta| (|log N| ~ 20) to the gradient. Optima of this almost-L1 loss reach ~1e-7..1e-5 on the
# Epoch data (float precision at the Huber kinks); a premature stop leaves ~1e-3 or more.
GRAD_RTOL = 1e-4


@dataclass(frozen=True)
class ChinchillaFit:
    """Point estimate of L(N, D). params: E, A, B, alpha, beta; loss: summed Huber at the optimum.

    converged: the scipy polish stopped on a tolerance or a stalled line search, not on its iteration limit,
    AND the gradient inf-norm <= GRAD_RTOL·delta·n (the stationarity check that catches premature stops);
    moved_from_start: the optimum differs from the grid start it came from; n_iter: screening + polish
    iterations of that start; grad_norm: final gradient inf-norm; n_starts: grid size; seconds: wall time.
    """

    params: dict[str, float]
    loss: float
    n_points: int
    converged: bool
    moved_from_start: bool
    n_iter: int
    grad_norm: float
    message: str
    n_starts: int
    seconds: float

    @property
    def ok(self) -> bool:
        """Converged and moved off its initial point; a fit that is not ok must not be used silently."""
        return self.converged and self.moved_from_start

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a."""
        return allocation_exponents(self.params["alpha"], self.params["beta"])[0]

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b."""
        return allocation_exponents(self.params["alpha"], self.params["beta"])[1]

    def predict(self, n_params: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
        """L̂(N, D), broadcasting N and D."""
        p = self.params
        return p["E"] + p["A"] / np.power(n_params, p["alpha"]) + p["B"] / np.power(n_tokens, p["beta"])


@dataclass(frozen=True)
class ChinchillaBootstrap:
    """Bootstrap over points. samples [R_ok, 5] in PARAM_NAMES order (failed resamples dropped);
    se: standard deviation of each parameter and of the allocation exponent "a"; ci80/ci95: (low, high)
    percentile intervals (10/90 and 2.5/97.5) for the same keys; n_failed: resamples that did not converge."""

    samples: np.ndarray
    se: dict[str, float]
    ci80: dict[str, tuple[float, float]]
    ci95: dict[str, tuple[float, float]]
    n_resamples: int
    n_failed: int
    seconds: float


def load_epoch_csv(path: str | Path, drop_highest: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L) from Epoch AI's svg_extracted_data.csv (a file or the directory holding it).

    Columns used: `Model Size` (N), `Training FLOP` (C), `loss`; D = C/(6N). The `drop_highest` highest-loss
    points are dropped as in Epoch's analysis (245 -> 240 rows).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "svg_extracted_data.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    n = np.array([float(r["Model Size"]) for r in rows])
    c = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.sort(np.argsort(loss, kind="stable")[: len(loss) - drop_highest])
    return n[keep], c[keep] / (6.0 * n[keep]), loss[keep]


def hoffmann_grid() -> np.ndarray:
    """[4500, 5] initial points (e, a, b, alpha, beta) of Hoffmann et al.'s grid."""
    ab = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    scales = np.arange(0.0, 25.01, 5.0)
    return np.array([(e, a, b, al, be) for al, be, e, a, b in itertools.product(ab, ab, es, scales, scales)])


def _objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """fun_grad over theta [m, 5] = (e, a, b, alpha, beta); data rows [n] shared or [R, n] per start."""
    batched = log_l.ndim == 2

    def fun_grad(theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ln, ld, ll = (log_n[rows], log_d[rows], log_l[rows]) if batched else (log_n, log_d, log_l)
        e, a, b, al, be = (theta[:, i : i + 1] for i in range(5))
        w_n = a - al * ln
        w_d = b - be * ld
        # One shift per start (not per point) keeps it to two large exp() calls; a start whose terms under- or
        # overflow gets f = inf and is rejected by the line search.
        shift = np.maximum(np.maximum(w_n.max(axis=1, keepdims=True), w_d.max(axis=1, keepdims=True)), e)
        np.exp(w_n - shift, out=w_n)
        np.exp(w_d - shift, out=w_d)
        w_e = np.exp(e - shift)
        total = w_n + w_d + w_e
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            r = np.log(total) + shift - ll
            f = special.huber(delta, r).sum(axis=1)
            dr = np.clip(r, -delta, delta) / total  # d huber / d log L̂, times the softmax normaliser 1/total
            g_n, g_d = dr * w_n, dr * w_d
            grad = np.stack([dr.sum(1) * w_e[:, 0], g_n.sum(1), g_d.sum(1),
                             -(g_n * ln).sum(1), -(g_d * ld).sum(1)], axis=1)
        return np.where(np.isfinite(f), f, np.inf), grad

    return fun_grad


def _to_params(theta: np.ndarray) -> dict[str, float]:
    e, a, b, al, be = (float(v) for v in theta)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": al, "beta": be}


def fit_chinchilla(
    n_params: np.ndarray,
    n_tokens: np.ndarray,
    loss: np.ndarray,
    *,
    delta: float = DELTA,
    starts: np.ndarray | None = None,
    maxiter: int = 15000,
    ftol: float = 1e-12,
    gtol: float = 1e-10,
    screen_maxiter: int = 500,
    screen_ftol: float = 1e-10,
) -> ChinchillaFit:
    """Fit L(N, D) by the Hoffmann/Epoch recipe from `starts` [S, 5] (default: the 4500-point Hoffmann grid).

    N, D, L: [n] positive. All starts are screened together (at most `screen_maxiter` iterations, relative
    `screen_ftol`; on the Epoch data a few degenerate starts, e.g. alpha = 0, would otherwise crawl for
    thousands of iterations at 20× the best loss), then the best is polished by scipy L-BFGS-B with `maxiter`,
    `ftol`, `gtol`. Takes ~10 s for 4500 starts on 240 points. Check `.ok` before use.
    """
    t0 = time.perf_counter()
    log_n, log_d, log_l = (np.log(np.asarray(v, dtype=float)) for v in (n_params, n_tokens, loss))
    if not (np.isfinite(log_n).all() and np.isfinite(log_d).all() and np.isfinite(log_l).all()):
        raise ValueError("N, D and L must be finite and > 0")
    starts = hoffmann_grid() if starts is None else np.atleast_2d(np.asarray(starts, dtype=float))
    fun_grad = _objective(log_n, log_d, log_l, delta)
    sol = solve_multistart(fun_grad, starts, grad_tol=GRAD_RTOL * delta * log_l.size, maxiter=maxiter, ftol=ftol,
                           gtol=gtol, screen_maxiter=screen_maxiter, screen_ftol=screen_ftol)
    return ChinchillaFit(
        params=_to_params(sol.x), loss=sol.fun, n_points=int(log_l.size), converged=sol.converged,
        moved_from_start=sol.moved_from_start, n_iter=sol.n_iter, grad_norm=sol.grad_norm, message=sol.message,
        n_starts=int(starts.shape[0]), seconds=time.perf_counter() - t0,
    )


def gradient_norm(params: dict[str, float], n_params: np.ndarray, n_tokens: np.ndarray, loss: np.ndarray,
                  delta: float = DELTA) -> float:
    """Inf-norm of the summed-Huber gradient (w.r.t. e, a, b, alpha, beta) at `params`: audits any fit, e.g. one
    made elsewhere or with a mean-reduced objective. A fit is stationary when this is <= GRAD_RTOL·delta·n."""
    log_n, log_d, log_l = (np.log(np.asarray(v, dtype=float)) for v in (n_params, n_tokens, loss))
    theta = np.array([[np.log(params["E"]), np.log(params["A"]), np.log(params["B"]), params["alpha"],
                       params["beta"]]])
    _, g = _objective(log_n, log_d, log_l, delta)(theta, np.array([0]))
    return float(np.abs(g).max())


def allocation_exponents(alpha: float | np.ndarray, beta: float | np.ndarray):
    """(a, b) = (beta/(alpha+beta), alpha/(alpha+beta)): N_opt ∝ C^a, D_opt ∝ C^b."""
    return beta / (alpha + beta), alpha / (alpha + beta)


def compute_optimal(params: dict[str, float], compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) at compute C [FLOPs] minimising L(N, D) subject to C = 6·N·D."""
    al, be = params["alpha"], params["beta"]
    a, b = allocation_exponents(al, be)
    g = (al * params["A"] / (be * params["B"])) ** (1.0 / (al + be))
    c6 = np.asarray(compute, dtype=float) / 6.0
    return g * c6**a, c6**b / g


def bootstrap_chinchilla(
    n_params: np.ndarray,
    n_tokens: np.ndarray,
    loss: np.ndarray,
    point: ChinchillaFit,
    *,
    n_resamples: int = 4000,
    seed: int = 0,
    delta: float = DELTA,
    maxiter: int = 15000,
) -> ChinchillaBootstrap:
    """Bootstrap over points: resample rows with replacement, refit warm-started from `point`.

    All resamples are solved together by `minimize_batched`; a resample that hits the iteration limit or ends
    with a gradient above GRAD_RTOL·delta·n counts as failed and is left out of the statistics.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    log_n, log_d, log_l = (np.log(np.asarray(v, dtype=float)) for v in (n_params, n_tokens, loss))
    idx = rng.integers(0, log_l.size, size=(n_resamples, log_l.size))
    fun_grad = _objective(log_n[idx], log_d[idx], log_l[idx], delta)
    p = point.params
    theta0 = np.array([np.log(p["E"]), np.log(p["A"]), np.log(p["B"]), p["alpha"], p["beta"]])
    res = minimize_batched(fun_grad, np.tile(theta0, (n_resamples, 1)), maxiter=maxiter)
    ok = res.within_limit & (res.grad_norm <= GRAD_RTOL * delta * log_l.size)
    theta = res.x[ok]
    samples = np.column_stack([np.exp(theta[:, 0]), np.exp(theta[:, 1]), np.exp(theta[:, 2]), theta[:, 3], theta[:, 4]])
    columns = {name: samples[:, i] for i, name in enumerate(PARAM_NAMES)}
    columns["a"] = allocation_exponents(samples[:, 3], samples[:, 4])[0]
    se = {k: float(np.std(v, ddof=1)) for k, v in columns.items()}
    ci80 = {k: (float(np.percentile(v, 10)), float(np.percentile(v, 90))) for k, v in columns.items()}
    ci95 = {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in columns.items()}
    return ChinchillaBootstrap(samples=samples, se=se, ci80=ci80, ci95=ci95, n_resamples=n_resamples,
                               n_failed=int((~ok).sum()), seconds=time.perf_counter() - t0)
