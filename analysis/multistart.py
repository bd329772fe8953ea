"""Vectorised multi-start minimisation: many small smooth problems solved at once, then one polished by scipy.

Scaling-law fits are tiny problems (3-5 parameters, tens to hundreds of points) that must be started from a grid of
initial points (Hoffmann et al.'s 4500-point grid for L(N, D)) or refitted for thousands of bootstrap resamples.
One scipy L-BFGS-B run per start took ~0.5 s on average on the Epoch data (~35 min for the 4500-point grid),
so instead every start runs in lock-step here: one
numpy evaluation of the objective and its analytic gradient for all active starts per iteration, an L-BFGS
direction per start (two-loop recursion, vectorised over starts), box bounds by projection and an Armijo
backtracking line search per start. Starts drop out of the active set as they converge.

The best start is then re-solved with scipy's L-BFGS-B at tight tolerances (`polish`) so the reported optimum
and its stopping message come from a reference optimiser (`solve_multistart` does both and judges convergence).

Objective convention: `fun_grad(theta, rows) -> (f, g)` with theta [m, p] the parameters of the active starts,
rows [m] their indices into the full batch (for per-start data such as bootstrap resamples), f [m], g [m, p].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

FunGrad = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

# Status codes of `BatchedMinimum.status`.
GTOL, FTOL, MAXITER, LINE_SEARCH_FAILED = 0, 1, 2, 3
STATUS_TEXT = {
    GTOL: "projected gradient below gtol",
    FTOL: "relative reduction of f below ftol",
    MAXITER: "iteration limit reached",
    LINE_SEARCH_FAILED: "line search failed",
}


@dataclass(frozen=True)
class BatchedMinimum:
    """Result of `minimize_batched` for S starts with p parameters.

    x [S, p] final points; fun [S]; grad_norm [S] inf-norm of the projected gradient at x; n_iter [S];
    status [S] one of GTOL, FTOL, MAXITER, LINE_SEARCH_FAILED.
    """

    x: np.ndarray
    fun: np.ndarray
    grad_norm: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray

    @property
    def within_limit(self) -> np.ndarray:
        """[S] bool: stopped before the iteration limit (on a tolerance, or on a line search that can make no
        more progress, which at the optimum of an almost-L1 Huber loss is the precision limit). Judge such
        starts by grad_norm, as `solve_multistart` does."""
        return self.status != MAXITER


def _bounds(bound: np.ndarray | float | None, shape: tuple[int, int], fill: float) -> np.ndarray:
    """Broadcast a bound given per parameter [p], per start [S, p] or None (unbounded) to [S, p]."""
    if bound is None:
        return np.full(shape, fill)
    out = np.broadcast_to(np.asarray(bound, dtype=float), shape).copy()
    return np.where(np.isnan(out), fill, out)


def projected_gradient(x: np.ndarray, g: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Gradient with the components that push a variable out through an active bound set to zero."""
    blocked = ((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0))
    return np.where(blocked, 0.0, g)


def _two_loop(g: np.ndarray, s_mem: np.ndarray, y_mem: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """L-BFGS product H·g for every start. g [m, p]; s_mem, y_mem [m, M, p] (newest last); rho [m, M] (0 = empty)."""
    q = g.copy()
    n_mem = s_mem.shape[1]
    alphas = np.zeros(rho.shape)
    for j in range(n_mem - 1, -1, -1):
        alphas[:, j] = rho[:, j] * np.einsum("ij,ij->i", s_mem[:, j], q)
        q -= alphas[:, j, None] * y_mem[:, j]
    # Initial Hessian scale from the newest pair (standard choice); unit max-step when there is no pair yet.
    sy = np.einsum("ij,ij->i", s_mem[:, -1], y_mem[:, -1])
    yy = np.einsum("ij,ij->i", y_mem[:, -1], y_mem[:, -1])
    g_inf = np.maximum(np.abs(g).max(axis=1), 1e-300)
    gamma = np.where(rho[:, -1] > 0, sy / np.maximum(yy, 1e-300), 1.0 / g_inf)
    r = gamma[:, None] * q
    for j in range(n_mem):
        beta = rho[:, j] * np.einsum("ij,ij->i", y_mem[:, j], r)
        r += s_mem[:, j] * (alphas[:, j] - beta)[:, None]
    return r


def minimize_batched(
    fun_grad: FunGrad,
    x0: np.ndarray,
    lower: np.ndarray | float | None = None,
    upper: np.ndarray | float | None = None,
    *,
    maxiter: int = 5000,
    gtol: float = 1e-10,
    ftol: float = 1e-12,
    memory: int = 10,
    max_line_search: int = 40,
) -> BatchedMinimum:
    """Minimise S independent problems from x0 [S, p] with projected L-BFGS, all starts in lock-step.

    Bounds lower/upper: None, [p] or [S, p] (NaN = unbounded). A start stops when its projected-gradient
    inf-norm <= gtol, when one step lowers f by <= ftol·|f| (relative, with no floor of 1, unlike scipy,
    so a small-valued objective is not stopped early), after maxiter iterations, or when the line search
    fails twice in a row (once with memory, once along the steepest-descent direction).
    """
    x = np.array(x0, dtype=float, copy=True)
    n_starts, n_par = x.shape
    lo = _bounds(lower, x.shape, -np.inf)
    hi = _bounds(upper, x.shape, np.inf)
    x = np.clip(x, lo, hi)
    f, g = fun_grad(x, np.arange(n_starts))
    s_mem = np.zeros((n_starts, memory, n_par))
    y_mem = np.zeros((n_starts, memory, n_par))
    rho = np.zeros((n_starts, memory))
    n_iter = np.zeros(n_starts, dtype=int)
    status = np.full(n_starts, MAXITER)
    active = np.ones(n_starts, dtype=bool)

    pg = projected_gradient(x, g, lo, hi)
    done = np.abs(pg).max(axis=1) <= gtol
    status[done] = GTOL
    active &= ~done
    for _ in range(maxiter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xa, fa, ga, la, ha = x[idx], f[idx], g[idx], lo[idx], hi[idx]
        free = projected_gradient(xa, ga, la, ha) != 0
        d = -_two_loop(np.where(free, ga, 0.0), s_mem[idx], y_mem[idx], rho[idx])
        d = np.where(free, d, 0.0)
        # Not a descent direction (stale curvature pairs): fall back to steepest descent and forget the memory.
        bad = np.einsum("ij,ij->i", d, ga) >= 0
        if bad.any():
            g_inf = np.maximum(np.abs(ga[bad]).max(axis=1), 1e-300)
            d[bad] = -np.where(free[bad], ga[bad], 0.0) / g_inf[:, None]
            rho[idx[bad]] = 0.0
        # Armijo backtracking on the projected path, each start with its own step.
        step = np.ones(idx.size)
        x_new, f_new, g_new = xa.copy(), fa.copy(), ga.copy()
        pending = np.ones(idx.size, dtype=bool)
        for _ls in range(max_line_search):
            p = np.flatnonzero(pending)
            if p.size == 0:
                break
            trial = np.clip(xa[p] + step[p, None] * d[p], la[p], ha[p])
            ft, gt = fun_grad(trial, idx[p])
            decrease = np.einsum("ij,ij->i", ga[p], trial - xa[p])
            ok = np.isfinite(ft) & (ft <= fa[p] + 1e-4 * decrease) & np.isfinite(gt).all(axis=1)
            acc = p[ok]
            x_new[acc], f_new[acc], g_new[acc] = trial[ok], ft[ok], gt[ok]
            pending[acc] = False
            step[pending] *= 0.5
        failed = pending
        had_memory = rho[idx].any(axis=1)
        # A failed search with memory gets one retry along -g (memory cleared); without memory the start stops.
        retry = failed & had_memory
        rho[idx[retry]] = 0.0
        s_mem[idx[retry]] = 0.0
        y_mem[idx[retry]] = 0.0
        stop_ls = failed & ~had_memory
        status[idx[stop_ls]] = LINE_SEARCH_FAILED
        active[idx[stop_ls]] = False

        moved = ~failed
        mi = idx[moved]
        s = x_new[moved] - xa[moved]
        yv = g_new[moved] - ga[moved]
        sy = np.einsum("ij,ij->i", s, yv)
        keep = sy > 1e-12 * np.einsum("ij,ij->i", yv, yv)
        upd = mi[keep]
        s_mem[upd] = np.roll(s_mem[upd], -1, axis=1)
        y_mem[upd] = np.roll(y_mem[upd], -1, axis=1)
        rho[upd] = np.roll(rho[upd], -1, axis=1)
        s_mem[upd, -1], y_mem[upd, -1], rho[upd, -1] = s[keep], yv[keep], 1.0 / sy[keep]

        f_old = f[mi]
        x[mi], f[mi], g[mi] = x_new[moved], f_new[moved], g_new[moved]
        n_iter[idx] += 1
        gnorm = np.abs(projected_gradient(x[mi], g[mi], lo[mi], hi[mi])).max(axis=1)
        small_f = (f_old - f[mi]) <= ftol * np.maximum(np.maximum(np.abs(f_old), np.abs(f[mi])), 1e-300)
        small_g = gnorm <= gtol
        status[mi[small_f]] = FTOL
        status[mi[small_g]] = GTOL
        active[mi[small_f | small_g]] = False

    grad_norm = np.abs(projected_gradient(x, g, lo, hi)).max(axis=1)
    return BatchedMinimum(x=x, fun=f, grad_norm=grad_norm, n_iter=n_iter, status=status)


@dataclass(frozen=True)
class Polished:
    """scipy L-BFGS-B result from one start: x [p], fun, grad_norm (projected, inf-norm), n_iter, message.

    success: scipy's flag (a tolerance was met). hit_limit: stopped on maxiter/maxfun. A third outcome, scipy's
    ABNORMAL line-search stop, is neither: near an optimum of a Huber loss with delta = 1e-3 (almost L1) it is
    the usual way to stop at the limit of float precision, so callers judge it by grad_norm.
    """

    x: np.ndarray
    fun: float
    grad_norm: float
    n_iter: int
    success: bool
    hit_limit: bool
    message: str


def polish(
    fun_grad: FunGrad,
    x0: np.ndarray,
    row: int,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    *,
    maxiter: int = 15000,
    ftol: float = 1e-12,
    gtol: float = 1e-10,
) -> Polished:
    """Re-solve one start (batch row `row`) with scipy L-BFGS-B at tight tolerances.

    scipy's ftol test is relative to max(|f|, 1), so for objectives far below 1 it is effectively absolute:
    callers keep the objective summed (not averaged) so that this is tight enough, and check grad_norm.
    """
    x0 = np.asarray(x0, dtype=float)
    n_par = x0.size
    lo = _bounds(lower, (1, n_par), -np.inf)[0]
    hi = _bounds(upper, (1, n_par), np.inf)[0]
    rows = np.array([row])

    def single(theta: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = fun_grad(theta[None, :], rows)
        return float(f[0]), g[0]

    bounds = [(None if np.isinf(a) else a, None if np.isinf(b) else b) for a, b in zip(lo, hi)]
    res = minimize(single, np.clip(x0, lo, hi), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": maxiter, "ftol": ftol, "gtol": gtol, "maxfun": 4 * maxiter + 20})
    _, g = single(res.x)
    gnorm = float(np.abs(projected_gradient(res.x[None], g[None], lo[None], hi[None])).max())
    return Polished(x=res.x, fun=float(res.fun), grad_norm=gnorm, n_iter=int(res.nit), success=bool(res.success),
                    hit_limit=int(res.status) == 1, message=str(res.message))


@dataclass(frozen=True)
class Solution:
    """Best of a multi-start solve. x [p]; fun; grad_norm (projected, inf-norm); n_iter (screening + polish of the
    winning start); converged; moved_from_start; start [p] the initial point the winner came from; message."""

    x: np.ndarray
    fun: float
    grad_norm: float
    n_iter: int
    converged: bool
    moved_from_start: bool
    start: np.ndarray
    message: str


def moved(x: np.ndarray, start: np.ndarray, rtol: float = 1e-6) -> bool:
    """True when x differs from start by more than rtol·(1 + |start|) in some coordinate.

    A fit that returns its own initial point (e.g. a grid point) has not been fitted at all: Porian et al.'s
    released weighted L*(C) fit returns exactly A = e^5, E = 1, alpha = 0.1 from its grid.
    """
    return bool(np.max(np.abs(np.asarray(x) - start) / (1.0 + np.abs(start))) > rtol)


def solve_multistart(
    fun_grad: FunGrad,
    starts: np.ndarray,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    *,
    grad_tol: float,
    maxiter: int = 15000,
    ftol: float = 1e-12,
    gtol: float = 1e-10,
    screen_maxiter: int | None = None,
    screen_ftol: float | None = None,
) -> Solution:
    """Run every start [S, p] with `minimize_batched`, keep the lowest, polish it with scipy L-BFGS-B.

    Shared data only (row 0 is passed to fun_grad when polishing). converged: the polish did not stop on its
    iteration limit (scipy success, or its line search stalled at the precision limit) AND the final projected
    gradient inf-norm <= grad_tol, the stationarity check that catches premature stops.
    """
    starts = np.atleast_2d(np.asarray(starts, dtype=float))
    shape = starts.shape
    lo = _bounds(lower, shape, -np.inf)
    hi = _bounds(upper, shape, np.inf)
    batch = minimize_batched(fun_grad, starts, lo, hi, maxiter=min(screen_maxiter or maxiter, maxiter), gtol=gtol,
                             ftol=screen_ftol or ftol)
    best = int(np.argmin(np.where(np.isfinite(batch.fun), batch.fun, np.inf)))
    pol = polish(fun_grad, batch.x[best], 0, lo[best], hi[best], maxiter=maxiter, ftol=ftol, gtol=gtol)
    # Keep the polished point unless scipy ended above the screened one (it can stop early along flat directions).
    use_polish = pol.fun <= batch.fun[best]
    x = pol.x if use_polish else batch.x[best]
    grad_norm = pol.grad_norm if use_polish else float(batch.grad_norm[best])
    converged = (not pol.hit_limit) and grad_norm <= grad_tol
    message = f"screen: {STATUS_TEXT[int(batch.status[best])]}; polish: {pol.message}; |grad| = {grad_norm:.2e}"
    return Solution(x=x, fun=min(pol.fun, float(batch.fun[best])), grad_norm=grad_norm,
                    n_iter=int(batch.n_iter[best]) + pol.n_iter, converged=bool(converged),
                    moved_from_start=moved(x, starts[best]), start=starts[best], message=message)
