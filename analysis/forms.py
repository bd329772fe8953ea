"""Functional forms of quality y vs compute x (x > 0, e.g. GFLOP/example) and their fits.

Forms (parameter names in brackets):
- `saturating` [E, A, alpha]:  y = E + A·x^−alpha   (power law with a floor E; needs y > 0)
- `power`      [A, alpha]:     y = A·x^−alpha       (no floor; needs y > 0)
- `loglinear`  [a, b]:         y = a + b·ln x       (HSTU's form; any sign of y)

The power-law forms describe a positive quantity that falls with compute (logloss, NE, 1 − AUC, 1 − HR) and are
fitted in log space, so they require y > 0 and raise ValueError otherwise. A signed quantity such as Wukong's
"relative logloss %" must be converted by the caller to the positive quantity it was derived from (e.g. logloss =
L_ref·(1 + rel/100)) before fitting a power law; the log-linear form takes it as it is.

Power-law fitting recipe (Hoffmann et al. 2022; Besiroglu et al. 2024, Epoch AI; Porian et al. 2024):
- log space with the LSE parameterisation: log ŷ = logsumexp(e, a − alpha·log x), E = e^e, A = e^a;
- SUMMED Huber loss, delta = 1e-3, on log ŷ − log y (a mean-reduced loss lets L-BFGS stop early);
- optional per-point weights w (e.g. 1/sigma²) multiply the Huber terms; they are rescaled to mean 1 so the loss
  keeps its unweighted size and the tolerances mean the same thing;
- log x is centred on its mean inside the optimiser (better conditioning whatever the unit of x);
- a grid of starts: alpha in {0.05, 0.1, 0.2, 0.4, 0.8, 1.6} x E in {0.001, 0.5, 0.9, 0.99, 0.999}·min(y)
  x log A in a0 + {−1, 0, 1}, a0 = median of log(y − E) + alpha·log x (the curve through the data, whatever
  the units); all run at once (`multistart`, at most 300 screening iterations each), the best then polished by
  scipy L-BFGS-B (ftol 1e-12, gtol 1e-10, maxiter 15000); bounds alpha in [1e-6, 5], E <= min(y);
- converged: the polish did not stop on its iteration limit (scipy success, or a line search stalled at float
  precision, usual at the optimum of this almost-L1 loss) AND the gradient inf-norm <= GRAD_RTOL·delta·n;
- the result must have converged AND moved off its start (`FitResult.ok`); callers check `.ok`.

The log-linear form is linear in its parameters, so it is fitted in closed form by (weighted) least squares on
y: no start, no tolerance; `converged` is False only when the design is rank-deficient (< 2 distinct x).

AIC for every form (Gaussian likelihood on the residuals of y, not log y, so forms are comparable):
AIC = n·log(RSS/n) + 2k with RSS = Σ w·(ŷ − y)² (w rescaled to mean 1) and k the number of form parameters
(the noise variance is common to all forms and omitted). RSS is floored at the smallest positive float.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import special

from analysis.multistart import minimize_batched, solve_multistart

DELTA = 1e-3
# Converged needs the gradient inf-norm below GRAD_RTOL·delta·n (each point adds at most delta·|d log ŷ/d theta|).
GRAD_RTOL = 1e-4
ALPHA_BOUNDS = (1e-6, 5.0)
ALPHA_STARTS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
FLOOR_FRACTIONS = (1e-3, 0.5, 0.9, 0.99, 0.999)  # E starts as fractions of min(y)
A_OFFSETS = (-1.0, 0.0, 1.0)  # log A starts around the value that puts the curve through the data
# Screening iterations per grid start before the best is polished to full tolerance by scipy; starts that are
# still crawling after this are degenerate (e.g. E -> 0 at 19× the best loss on typical data).
SCREEN_MAXITER = 300


@dataclass(frozen=True)
class FitResult:
    """One fitted form. params: name -> value in the form's own units; loss: the minimised objective (summed
    Huber in log space for power laws, weighted RSS for loglinear); converged / moved_from_start: see module
    doc; n_iter: optimiser iterations; aic: module doc; grad_norm: final projected-gradient inf-norm;
    start: the initial parameters the returned solution came from."""

    form: str
    params: dict[str, float]
    loss: float
    n_points: int
    converged: bool
    moved_from_start: bool
    n_iter: int
    message: str
    aic: float
    grad_norm: float = 0.0
    start: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Converged and moved off its start: only then may the fit be used."""
        return self.converged and self.moved_from_start

    def predict(self, x: np.ndarray) -> np.ndarray:
        """ŷ at x [...]."""
        return get_form(self.form).predict(self.params, x)


@dataclass(frozen=True)
class BatchFit:
    """Fits of one form to R data sets at once (bootstrap). params [R, k] in `Form.param_names` order;
    converged [R] bool."""

    params: np.ndarray
    converged: np.ndarray


@dataclass(frozen=True)
class Form:
    """A functional form: name, parameter names, equation text, whether y must be > 0, and its routines."""

    name: str
    param_names: tuple[str, ...]
    equation: str
    positive_y: bool
    _predict: Callable[[Mapping[str, np.ndarray], np.ndarray], np.ndarray] = field(repr=False)
    _fit: Callable[..., FitResult] = field(repr=False)
    _fit_batch: Callable[..., BatchFit] = field(repr=False)
    slope_param: str = "alpha"  # the parameter that says how fast quality improves with x

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def predict(self, params: Mapping[str, float], x: np.ndarray) -> np.ndarray:
        """ŷ at x [...] for one parameter set."""
        return self._predict(params, np.asarray(x, dtype=float))

    def predict_samples(self, samples: np.ndarray, x: np.ndarray) -> np.ndarray:
        """ŷ [R, G] for parameter sets samples [R, k] (param_names order) at x [G]."""
        cols = {n: samples[:, i : i + 1] for i, n in enumerate(self.param_names)}
        return self._predict(cols, np.asarray(x, dtype=float)[None, :])

    def fit(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, *,
            start: Mapping[str, float] | None = None, maxiter: int = 15000, delta: float = DELTA) -> FitResult:
        """Fit to points x [n], y [n] (weights [n] optional). `start` replaces the grid with one initial point."""
        x, y, w = _check(self, x, y, weights)
        return self._fit(x, y, w, start=start, maxiter=maxiter, delta=delta)

    def fit_batch(self, x: np.ndarray, ys: np.ndarray, start: Mapping[str, float], weights: np.ndarray | None = None,
                  *, maxiter: int = 15000, delta: float = DELTA) -> BatchFit:
        """Fit R data sets ys [R, n] sharing x [n], all warm-started from `start` (bootstrap resamples)."""
        ys = np.atleast_2d(np.asarray(ys, dtype=float))
        x, _, w = _check(self, x, np.ones(ys.shape[1]), weights)  # y is screened per row below
        if self.positive_y and not (ys > 0).all():
            bad = ~(ys > 0).all(axis=1)
            out = np.full((ys.shape[0], self.n_params), np.nan)
            good = self._fit_batch(x, ys[~bad], w, start=start, maxiter=maxiter, delta=delta) if (~bad).any() else None
            conv = np.zeros(ys.shape[0], dtype=bool)
            if good is not None:
                out[~bad], conv[~bad] = good.params, good.converged
            return BatchFit(params=out, converged=conv)
        return self._fit_batch(x, ys, w, start=start, maxiter=maxiter, delta=delta)


def _check(form: Form, x, y, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate inputs; return x, y as float arrays and weights rescaled to mean 1."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and (x > 0).all() and np.isfinite(y).all()):
        raise ValueError("x must be finite and > 0, y finite")
    if form.positive_y and not (y > 0).all():
        raise ValueError(f"form {form.name!r} is fitted in log space and needs y > 0; convert the metric "
                         "(e.g. relative logloss % -> logloss, AUC -> 1 - AUC) or use 'loglinear'")
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != x.shape or not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError("weights must be finite, > 0 and one per point")
    return x, y, w / w.mean()


def _aic(y: np.ndarray, pred: np.ndarray, w: np.ndarray, k: int) -> float:
    rss = max(float(np.sum(w * (pred - y) ** 2)), np.finfo(float).tiny)
    return float(y.size * np.log(rss / y.size) + 2 * k)


# ---------------------------------------------------------------- power laws in log space (saturating, power)

def _log_objective(lxc: np.ndarray, ly: np.ndarray, w: np.ndarray, delta: float, floor: bool):
    """fun_grad for theta [m, 3] = (e, a, alpha) (floor) or [m, 2] = (a, alpha); ly, w [n] or [R, n] per row."""
    batched = ly.ndim == 2

    def fun_grad(theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lyr, wr = (ly[rows], w[rows] if w.ndim == 2 else w) if batched else (ly, w)
        a, al = theta[:, -2:-1], theta[:, -1:]
        u = a - al * lxc
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if floor:
                e = theta[:, :1]
                log_pred = np.logaddexp(e, u)
                p_power = np.exp(u - log_pred)  # share of the power term in ŷ = d log ŷ / d a
            else:
                log_pred, p_power = u, np.ones_like(u)
            r = log_pred - lyr
            f = np.sum(wr * special.huber(delta, r), axis=1)
            dr = wr * np.clip(r, -delta, delta)
            g_a = np.sum(dr * p_power, axis=1)
            g_al = -np.sum(dr * p_power * lxc, axis=1)
            cols = [np.sum(dr * (1.0 - p_power), axis=1)] if floor else []
        return np.where(np.isfinite(f), f, np.inf), np.stack([*cols, g_a, g_al], axis=1)

    return fun_grad


def _to_internal(params: Mapping[str, float], ref: float, floor: bool) -> np.ndarray:
    """Form parameters -> optimiser vector with log x centred at ref: a_c = log A − alpha·ref."""
    a_c = np.log(params["A"]) - params["alpha"] * ref
    head = [np.log(params["E"])] if floor else []
    return np.array([*head, a_c, params["alpha"]], dtype=float)


def _to_params(theta: np.ndarray, ref: float, floor: bool) -> dict[str, float]:
    out = {"E": float(np.exp(theta[0]))} if floor else {}
    out["A"] = float(np.exp(theta[-2] + theta[-1] * ref))
    out["alpha"] = float(theta[-1])
    return out


def _grid(lxc: np.ndarray, y: np.ndarray, floor: bool) -> np.ndarray:
    """Initial points: alpha x E (fractions of min y) x log A, the latter centred on the value through the data."""
    starts = []
    for al in ALPHA_STARTS:
        for frac in FLOOR_FRACTIONS if floor else (0.0,):
            floor_value = frac * y.min()
            a0 = np.median(np.log(y - floor_value) + al * lxc)
            for da in A_OFFSETS:
                head = [np.log(floor_value)] if floor else []
                starts.append([*head, a0 + da, al])
    return np.array(starts)


def _bounds(y_min: np.ndarray, floor: bool) -> tuple[np.ndarray, np.ndarray]:
    """Lower/upper bounds [R, k] for rows with minimum y_min [R]: alpha in ALPHA_BOUNDS, log E <= log min y."""
    r = y_min.size
    lo = np.tile([-np.inf, ALPHA_BOUNDS[0]], (r, 1))
    hi = np.tile([np.inf, ALPHA_BOUNDS[1]], (r, 1))
    if floor:
        lo = np.column_stack([np.full(r, -np.inf), lo])
        hi = np.column_stack([np.log(y_min), hi])
    return lo, hi


def _make_log_fit(name: str, floor: bool):
    k = 3 if floor else 2

    def fit(x, y, w, *, start, maxiter, delta) -> FitResult:
        lx = np.log(x)
        ref = float(lx.mean())
        lxc = lx - ref
        fun_grad = _log_objective(lxc, np.log(y), w, delta, floor)
        starts = _grid(lxc, y, floor) if start is None else _to_internal(start, ref, floor)[None, :]
        lo, hi = _bounds(np.array([y.min()]), floor)
        sol = solve_multistart(fun_grad, starts, lo[0], hi[0], grad_tol=GRAD_RTOL * delta * y.size, maxiter=maxiter,
                               screen_maxiter=SCREEN_MAXITER)
        params = _to_params(sol.x, ref, floor)
        pred = FORMS[name].predict(params, x)
        return FitResult(form=name, params=params, loss=sol.fun, n_points=int(y.size), converged=sol.converged,
                         moved_from_start=sol.moved_from_start, n_iter=sol.n_iter, message=sol.message,
                         aic=_aic(y, pred, w, k), grad_norm=sol.grad_norm, start=_to_params(sol.start, ref, floor))

    def fit_batch(x, ys, w, *, start, maxiter, delta) -> BatchFit:
        lx = np.log(x)
        ref = float(lx.mean())
        lxc = lx - ref
        fun_grad = _log_objective(lxc, np.log(ys), w, delta, floor)
        lo, hi = _bounds(ys.min(axis=1), floor)
        theta0 = np.tile(_to_internal(start, ref, floor), (ys.shape[0], 1))
        res = minimize_batched(fun_grad, np.clip(theta0, lo, hi), lo, hi, maxiter=maxiter)
        ok = res.within_limit & (res.grad_norm <= GRAD_RTOL * delta * ys.shape[1])
        out = np.array([list(_to_params(t, ref, floor).values()) for t in res.x]).reshape(-1, k)
        return BatchFit(params=out, converged=ok)

    return fit, fit_batch


def _predict_saturating(p: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return p["E"] + p["A"] * np.power(x, -p["alpha"])


def _predict_power(p: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return p["A"] * np.power(x, -p["alpha"])


# ---------------------------------------------------------------- log-linear, closed-form weighted least squares

def _loglinear_solver(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, int]:
    """Matrix M [2, n] with (a, b) = M @ y for weighted least squares on [1, ln x]; and the design rank."""
    design = np.column_stack([np.ones_like(x), np.log(x)])
    sw = np.sqrt(w)
    rank = int(np.linalg.matrix_rank(design * sw[:, None]))
    return np.linalg.pinv(design * sw[:, None]) * sw[None, :], rank


def _fit_loglinear(x, y, w, *, start, maxiter, delta) -> FitResult:
    del start, maxiter, delta  # closed form: no start, no iterations, no Huber
    solver, rank = _loglinear_solver(x, w)
    a, b = solver @ y
    params = {"a": float(a), "b": float(b)}
    pred = a + b * np.log(x)
    full = rank == 2
    return FitResult(form="loglinear", params=params, loss=float(np.sum(w * (pred - y) ** 2)), n_points=int(y.size),
                     converged=full, moved_from_start=True, n_iter=0,
                     message="closed-form weighted least squares" if full else "rank-deficient design (< 2 distinct x)",
                     aic=_aic(y, pred, w, 2))


def _fit_batch_loglinear(x, ys, w, *, start, maxiter, delta) -> BatchFit:
    del start, maxiter, delta
    solver, rank = _loglinear_solver(x, w)
    return BatchFit(params=ys @ solver.T, converged=np.full(ys.shape[0], rank == 2))


def _predict_loglinear(p: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return p["a"] + p["b"] * np.log(x)


SATURATING = Form("saturating", ("E", "A", "alpha"), "y = E + A·x^−alpha", True, _predict_saturating,
                  *_make_log_fit("saturating", floor=True))
POWER = Form("power", ("A", "alpha"), "y = A·x^−alpha", True, _predict_power, *_make_log_fit("power", floor=False))
LOGLINEAR = Form("loglinear", ("a", "b"), "y = a + b·ln x", False, _predict_loglinear, _fit_loglinear,
                 _fit_batch_loglinear, slope_param="b")
FORMS: dict[str, Form] = {f.name: f for f in (SATURATING, POWER, LOGLINEAR)}


def get_form(name: str) -> Form:
    """The form called `name` (one of FORMS)."""
    try:
        return FORMS[name]
    except KeyError:
        raise ValueError(f"unknown form {name!r}; choose from {sorted(FORMS)}") from None
