"""The synthetic CTR view of the world: a known teacher labels (user, item, context) examples.

Draft: teacher only (config and dataset follow).
"""

from __future__ import annotations

import numpy as np

from scaling.data.world import CounterRNG, World

# Gauss-Hermite nodes for E_eps[sigmoid(x + s * eps)], eps ~ N(0, 1).
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(16)
_GH_W = _GH_W / _GH_W.sum()


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class Teacher:
    def __init__(
        self,
        world: World,
        *,
        base_rate: float = 0.15,
        first_order: float = 0.5,
        pairwise: float = 0.5,
        deep: float = 2.0,
        label_noise: float = 0.25,
        num_ridges: int = 128,
        spectrum_exponent: float = 0.75,
        code_dim: int = 128,
        pair_rank: int = 4,
        head: float = 64.0,
        sharpness: float = 1.5,
        sharpness_growth: float = 0.0,
        ridge_bias: float = 0.75,
        calibration_examples: int = 32768,
        dense_share: float = 0.3,
        remove_linear: bool = True,
    ):
        self.world = world
        F, D, r = world.num_fields, world.num_dense, world.latent_dim
        g = world.generator("teacher")
        self.scores = []
        self.pcodes = []
        for f, card in enumerate(world.cardinalities):
            shrink = (1.0 + np.arange(card) / head) ** -0.5
            u = g.standard_normal(r)
            sc = world.value_latent[f] @ u
            sc = (sc - sc.mean()) / sc.std()
            self.scores.append((shrink * sc).astype(np.float32))
            P = g.standard_normal((r, pair_rank)) * np.sqrt(r / pair_rank)
            self.pcodes.append((shrink[:, None] * (world.value_latent[f] @ P)).astype(np.float32))
        self.dense_first = (g.standard_normal(D) / np.sqrt(max(D, 1))).astype(np.float32)
        m = F + D
        K = num_ridges
        blocks = []
        for b in range(-(-K // m)):
            q, _ = np.linalg.qr(g.standard_normal((m, m)))
            blocks.append(q)
        omega = np.concatenate(blocks, 1)[:, :K]
        k = np.arange(1, K + 1, dtype=np.float64)
        self.ridge_weight = (k**-spectrum_exponent * g.choice([-1.0, 1.0], K))
        kappa = sharpness * (1.0 + sharpness_growth * np.log(k))
        bias = ridge_bias * g.standard_normal(K)
        # Hermite projections of tanh(kappa t + b), t ~ N(0, 1), by quadrature.
        x, wq = np.polynomial.hermite_e.hermegauss(64)
        wq = wq / wq.sum()
        y = np.tanh(kappa[:, None] * x[None, :] + bias[:, None])
        c0 = y @ wq
        c1 = (y * x[None, :]) @ wq if remove_linear else np.zeros(K)
        resid = y - c0[:, None] - c1[:, None] * x[None, :]
        norm = np.sqrt((resid**2) @ wq)
        self.kappa, self.rbias, self.c0, self.c1, self.rnorm = [a.astype(np.float32) for a in (kappa, bias, c0, c1, norm)]
        self.scales = np.array([first_order, pairwise, deep], np.float32)
        self.label_noise = float(label_noise)
        # Calibration: whiten h, normalize each term, then solve the bias for base_rate.
        cal = world.draw(CounterRNG(world.seed, 2), np.arange(calibration_examples))
        h = self._h_raw(cal.sparse, cal.dense).astype(np.float64)
        mu = h.mean(0)
        cov = np.cov(h, rowvar=False) + 1e-6 * np.eye(m)
        evals, evecs = np.linalg.eigh(cov)
        W = evecs / np.sqrt(np.maximum(evals, 1e-6 * evals.max()))[None, :] @ evecs.T
        self.rank = int((evals > 1e-4 * evals.max()).sum())
        self.proj = (W @ omega).astype(np.float32)  # whitened ridge directions on raw h
        self.proj_shift = (mu @ W @ omega).astype(np.float32)
        self.term_mean = np.zeros(3, np.float32)
        self.term_std = np.ones(3, np.float32)
        terms = self.terms(cal.sparse, cal.dense)
        self.term_mean = terms.mean(0)
        self.term_std = terms.std(0)
        self.bias = 0.0
        logit = self.logit(cal.sparse, cal.dense)
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if self.prob(logit + mid).mean() > base_rate:
                hi = mid
            else:
                lo = mid
        self.bias = 0.5 * (lo + hi)

    def _h_raw(self, sparse, dense):
        h = np.empty((len(sparse), len(self.scores) + dense.shape[1]), np.float32)
        for f, sc in enumerate(self.scores):
            h[:, f] = sc[sparse[:, f]]
        h[:, len(self.scores):] = dense
        return h

    def ridge_inputs(self, sparse, dense):
        return self._h_raw(sparse, dense) @ self.proj - self.proj_shift

    def ridges(self, t):
        y = np.tanh(t * self.kappa + self.rbias)
        y -= self.c0 + self.c1 * t
        y /= self.rnorm
        return y

    def terms(self, sparse, dense):
        B = len(sparse)
        first = dense @ self.dense_first
        for f, sc in enumerate(self.scores):
            first += sc[sparse[:, f]]
        s = np.zeros((B, self.pcodes[0].shape[1]), np.float32)
        sq = np.zeros(B, np.float32)
        for f, code in enumerate(self.pcodes):
            e = code[sparse[:, f]]
            s += e
            sq += (e * e).sum(1)
        pair = 0.5 * ((s * s).sum(1) - sq)
        deep = self.ridges(self.ridge_inputs(sparse, dense)) @ self.ridge_weight.astype(np.float32)
        out = np.stack([first, pair, deep], 1)
        return (out - self.term_mean) / self.term_std

    def logit(self, sparse, dense):
        return self.bias + self.terms(sparse, dense) @ self.scales

    def prob(self, logit):
        logit = np.asarray(logit, np.float64)
        if self.label_noise == 0:
            return _sigmoid(logit)
        return _sigmoid(logit[:, None] + self.label_noise * _GH_X[None, :]) @ _GH_W
