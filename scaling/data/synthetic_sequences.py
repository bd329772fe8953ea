"""The sequence view of the synthetic world: per-user timelines from a known process, with an oracle.

Same world as the CTR view (`world.py`; `SyntheticSequencesConfig.world()` uses the CTR view's
defaults). The catalogue is the `num_items` most popular items of the world's item pool (item id
j = 1..I in popularity order); the users are `num_users` distinct members of the user pool drawn
by the world's user popularity. User u writes events (item j_t, action a_t in {0 view, 1 click,
2 purchase}, timestamp tau_t), t = 0 .. L_u - 1, L_u lognormal around mean_length, clipped.

Codes. Item j has a unit code g_j in R^K (K = code_dim): coordinates 0..r-1 are its world latent
/ sqrt(1.25), the rest N(0, 1). Its "leads to" code is n_j = Q g_j, Q orthogonal (the polar factor
of cos(th) I + sin(th) M / sqrt(K), M Gaussian, th = transition_angle): what follows j is not
what resembles j, so a transition has a direction. User u has a long-term anchor a_u built the
same way from its world latent. Weights lambda_k = (1 + k / SPECTRUM_HEAD)^-beta (beta =
spectrum_exponent), normalized to sum_k lambda_k^2 = 1, scale coordinate k of every dot product.

Event t (Delta = tau_t - tau_{t-1}; knobs are config fields or module constants):

    time      tau_0 = EPOCH + U(0, START_SPREAD). A new session starts with probability
              session_end * SESSION_END_FACTOR[a_{t-1}] (purchases often end sessions); then
              Delta ~ Lomax(shape=inter_gap_shape, median=inter_gap_median) (<= MAX_GAP), else
              Delta ~ LogNormal(log intra_gap_median, intra_gap_sigma); whole seconds, >= 1.
    drift     d_t = rho d_{t-1} + sqrt(1 - rho^2) drift_scale xi_t, rho = exp(-Delta / drift_time),
              xi_t ~ N(0, I_K), d_0 = 0; long-term interest u_t = a_u + d_t.
    session   S_t = delta S_{t-1}, M_t = delta M_{t-1}, delta = exp(-Delta / short_time); after the
              event S_t += w[a_t] n_{j_t}, M_t += w[a_t] (w = ACTION_STATE_WEIGHT). Session
              interest s_t = S_t / (SESSION_PRIOR + M_t): bounded, ~0 after a long gap.
    logit     q_t = lambda * (long_term_scale u_t + short_term_scale s_t),  c_t(j) = <q_t, g_j>,
              P_soft(j) ∝ exp((c_t(j) + popularity_weight log pi_j) / temperature),
              pi_j the world popularity of item j renormalized over the catalogue.
    repeat    the last W = repeat_window events (j_w, tau_w, a_w) get weights omega_w ∝
              exp(-(tau_t - tau_w) / repeat_time + REPEAT_ACTION_BONUS[a_w]),
              P_rep(j) = sum_w omega_w [j_w = j].
    next item P_t(j) = r_t P_rep(j) + (1 - r_t) P_soft(j), r_t = repeat_prob (0 before any event).
    action    z = (c_t(j_t) - mean_i c_t(i)) / std_i c_t(i) (the item's fit);
              P(a_t >= click) = sigmoid(click_bias + action_slope z),
              P(a_t = purchase | a_t >= click) = sigmoid(purchase_bias + action_slope z).

Order and time carry signal: the session term decays with elapsed time (the target's timestamp
says whether it still applies), points along n_j rather than g_j ("a then b" differs from "b then
a"), repeat weights fall with time since consumption, and drift makes recent events better
evidence of u_t. Capacity helps: c_t is a bilinear form with coordinate weights lambda_k, so a
rank-d model misses the share sum_{k >= d} lambda_k^2 of its variance (`SequenceTeacher.
spectrum_tail`; 0.36 / 0.16 / 0.06 at d = 8 / 16 / 24 by default), and the long-term, session,
repeat and popularity terms must be mixed per user as functions of the gaps.

The oracle (`SequenceOracle`) keeps each user's hidden state (q_t and the repeat window) at the
last two events, the leave-one-out validation and test events, so it returns P_t exactly. It
knows a_u, d_t and s_t, which the history only partly reveals, and conditions on the target's
timestamp (as HSTU-style models do): a ceiling for the process, not a Bayes predictor from the
history alone. Which ceiling for which protocol (`oracle_metrics`):

  * seen items kept (exclude_seen=False): ranking by P_t maximizes expected HR@K and NDCG@K,
    so "oracle_*" is that protocol's ceiling (in expectation; a finite eval set adds noise).
  * seen items excluded (the default): `retrieval_metrics` keeps the target ranked even when it
    was seen, so a seen target competes only with unseen items. Ranking by P_t ("oracle_excl_*")
    is NOT that protocol's ceiling: the optimum ranks every seen item above every unseen one (a
    repeat target is then rank 1), unseen ones by P_t ("ceiling_excl_*", the ceiling).

Randomness: each purpose (users, lengths, codes, gaps, drift, branch, choice, action) has its own
stream `World.generator("sequences", name)`, so the log is a pure function of the config. Users
are processed longest first, so the users active at step t are a prefix and each step is one
vectorized numpy update of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import numpy as np

from scaling.config_schema import ConfigError, check_constraints, knob
from scaling.data.interactions import Interactions
from scaling.data.leave_one_out import LeaveOneOut, Stage
from scaling.data.registry import register_data
from scaling.data.sequence_batches import SequenceBatches
from scaling.data.sequence_dataset import SequenceDataConfig
from scaling.data.synthetic_ctr import SyntheticCTRConfig
from scaling.data.world import World
from scaling.train.retrieval_eval import evaluate_retrieval

__all__ = [
    "SyntheticSequencesConfig", "SequenceTeacher", "HiddenState", "SequenceOracle", "generate_sequences",
    "oracle_metrics", "ACTIONS", "EPOCH",
]

ACTIONS = ("view", "click", "purchase")
EPOCH = 1_600_000_000  # timestamps start here (2020-09-13), in seconds
START_SPREAD = 30 * 86400  # users start uniformly within 30 days of EPOCH
MAX_GAP = 365 * 86400  # cap on one gap, so the Lomax tail cannot push timelines past a year per gap
WORLD_LATENT_VAR = 1.25  # world latents: centre N(0, I) + N(0, 0.5^2 I) noise -> variance 1.25
# Effects of an event's action on what follows (view, click, purchase):
ACTION_STATE_WEIGHT = np.array([0.5, 1.0, 2.0], np.float32)  # weight of n_j in the session state
REPEAT_ACTION_BONUS = np.array([0.0, 0.5, 1.0], np.float32)  # log-weight bonus in the repeat window
SESSION_PRIOR = 1.0  # pseudo-mass of "no session interest" in s_t = S_t / (SESSION_PRIOR + M_t)
SESSION_END_FACTOR = np.array([1.0, 1.0, 3.0], np.float64)  # multiplies session_end after the action
SPECTRUM_HEAD = 8.0  # lambda_k = (1 + k / 8)^-beta: the 8 world-latent coordinates share the head
BLOCK = 64  # items per block of the two-level inverse-CDF sampler
_STAGE_INDEX = {"valid": 0, "test": 1}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _unit_codes(latent: np.ndarray, K: int, g: np.random.Generator) -> np.ndarray:
    """float32 [P, K]: world latents [P, r] scaled to unit variance, then K - r fresh N(0, 1) coordinates."""
    return np.concatenate([latent / np.sqrt(WORLD_LATENT_VAR), g.standard_normal((len(latent), K - latent.shape[1]))],
                          axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class HiddenState:
    """What the teacher needs for one next-item distribution (leading dims [...] = users, stages).

    query float32 [..., K] (q_t), window_items int32 [..., W] (0 = empty slot), window_logits
    float32 [..., W] (unnormalized log omega_w, -inf for empty slots), repeat_prob float32 [...] (r_t).
    """

    query: np.ndarray
    window_items: np.ndarray
    window_logits: np.ndarray
    repeat_prob: np.ndarray

    def __getitem__(self, index) -> HiddenState:
        return HiddenState(self.query[index], self.window_items[index], self.window_logits[index],
                           self.repeat_prob[index])


class SequenceTeacher:
    """The known next-item model over the catalogue (see the module docstring for the formulas).

    For speed the logit of the softmax is one matmul, [q / T, 1] @ [g_1..g_I; gamma log pi / T],
    over a catalogue padded to whole blocks of BLOCK items (padding logit -1e4, so weight 0);
    sampling picks a block from the block sums, then an item inside the block.
    """

    def __init__(self, world: World, config: SyntheticSequencesConfig):
        self.config = c = config
        side = world.sides["item"]
        self.world_items = side.by_rank[: c.num_items]  # int64 [I]: world index of item id j + 1
        K, I = c.code_dim, c.num_items
        g = world.generator("sequences", "codes")
        self.codes = codes = _unit_codes(side.latent[self.world_items], K, g)  # g_j, float32 [I, K]
        th = c.transition_angle
        u, _, vt = np.linalg.svd(np.cos(th) * np.eye(K) + np.sin(th) * g.standard_normal((K, K)) / np.sqrt(K))
        self.transition = (u @ vt).astype(np.float32)  # Q, orthogonal [K, K]
        self.next_codes = codes @ self.transition.T  # n_j = Q g_j, float32 [I, K]
        lam = (1.0 + np.arange(K) / SPECTRUM_HEAD) ** -c.spectrum_exponent
        self.spectrum = (lam / np.sqrt((lam**2).sum())).astype(np.float32)  # lambda_k, float32 [K]
        pop = side.popularity[self.world_items]
        self.log_pop = np.log(pop / pop.sum()).astype(np.float32)  # log pi_j, float32 [I]
        # Moments of c(i) = <q, g_i> over the catalogue, for the action rule's standardization.
        self._code_mean = codes.mean(0, dtype=np.float64).astype(np.float32)
        self._code_cov = np.cov(codes.astype(np.float64), rowvar=False).astype(np.float32)
        # The augmented, padded logit matrix [K + 1, I_pad].
        self.num_blocks = -(-I // BLOCK)
        aug = np.zeros((K + 1, self.num_blocks * BLOCK), np.float32)
        aug[:K, :I] = codes.T
        aug[K, :I] = c.popularity_weight * self.log_pop / c.temperature
        aug[K, I:] = -1e4
        self._aug = aug

    @property
    def num_items(self) -> int:
        return len(self.codes)

    def hidden_state(self, long_term: np.ndarray, session: np.ndarray, window_items: np.ndarray,
                     window_times: np.ndarray, window_actions: np.ndarray, now: np.ndarray) -> HiddenState:
        """The state behind P_t from the hidden interests u_t, s_t (float32 [B, K]) and the history's
        last W events: window_items int [B, W] (0 = empty), window_times int64 [B, W] (-1 = empty),
        window_actions int [B, W], and the event's time now int64 [B]."""
        c = self.config
        query = self.spectrum * (np.float32(c.long_term_scale) * long_term + np.float32(c.short_term_scale) * session)
        valid = window_times >= 0
        recency = -(now[:, None] - window_times) / c.repeat_time + REPEAT_ACTION_BONUS[window_actions]
        logits = np.where(valid, recency, -np.inf).astype(np.float32)
        repeat = np.where(valid.any(axis=1), c.repeat_prob, 0.0).astype(np.float32)
        return HiddenState(query.astype(np.float32), np.asarray(window_items, np.int32), logits, repeat)

    def spectrum_tail(self, d: int) -> float:
        """Share of a content logit's variance in code coordinates d..K-1 (what rank d misses)."""
        lam2 = self.spectrum.astype(np.float64) ** 2
        return float(lam2[int(d):].sum() / lam2.sum())

    def softmax_weights(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(e float32 [B, I_pad], block sums float64 [B, I_pad / BLOCK]): P_soft(j) = e[:, j - 1] / Z
        with Z = block sums summed over blocks (padding columns have e = 0)."""
        x = np.empty((len(query), query.shape[1] + 1), np.float32)
        x[:, :-1] = query / np.float32(self.config.temperature)
        x[:, -1] = 1.0
        e = x @ self._aug
        # Logits are moderate in practice, so exp without the max shift (a pass less over [B, I]);
        # rows that overflow or underflow float32 (extreme states or temperatures) are redone with it.
        with np.errstate(over="ignore"):
            np.exp(e, out=e)
            bsum = e.reshape(len(e), self.num_blocks, BLOCK).sum(axis=2).astype(np.float64)
        total = bsum.sum(axis=1)
        bad = np.flatnonzero(~np.isfinite(total) | (total < 1e-30))
        if len(bad):
            lg = x[bad] @ self._aug
            e[bad] = np.exp(lg - lg.max(axis=1, keepdims=True))
            bsum[bad] = e[bad].reshape(len(bad), self.num_blocks, BLOCK).sum(axis=2)
        return e, bsum

    def sample_softmax(self, e: np.ndarray, bsum: np.ndarray, u: np.ndarray) -> np.ndarray:
        """int64 [B]: items 1..I drawn from P_soft by inverse CDF (block, then item in the block)
        with uniforms u [B]; e, bsum from `softmax_weights`."""
        B = len(e)
        cum = np.cumsum(bsum, axis=1)
        target = u * cum[:, -1]
        b = np.minimum((cum < target[:, None]).sum(axis=1), self.num_blocks - 1)
        rest = target - np.where(b > 0, cum[np.arange(B), b - 1], 0.0)
        inner = np.cumsum(e.reshape(B, self.num_blocks, BLOCK)[np.arange(B), b].astype(np.float64), axis=1)
        # The position inside the block as a fraction of its total (< 1), so rounding between the
        # float32 block sums and this float64 cumsum can never land on a zero-weight column.
        frac = np.clip(rest / bsum[np.arange(B), b], 0.0, 1.0 - 1e-12)
        k = np.minimum((inner < (frac * inner[:, -1])[:, None]).sum(axis=1), BLOCK - 1)
        return np.minimum(b * BLOCK + k, self.num_items - 1) + 1

    @staticmethod
    def window_weights(window_logits: np.ndarray) -> np.ndarray:
        """float32 [B, W]: omega (rows with no valid slot are all zero)."""
        m = window_logits.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        w = np.exp(window_logits - m)
        s = w.sum(axis=1, keepdims=True)
        return w / np.where(s > 0, s, 1.0)

    def fit_score(self, query: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float32 [B]: z = (c(j) - mean_i c(i)) / std_i c(i) of items j (int [B], 1..I) for
        queries [B, K]: how well each item fits, the action rule's input."""
        content = (query * self.codes[items - 1]).sum(axis=1)
        std = np.sqrt(((query @ self._code_cov) * query).sum(axis=1)).clip(1e-6)
        return (content - query @ self._code_mean) / std

    def next_item_probs(self, state: HiddenState) -> np.ndarray:
        """float64 [B, I + 1]: the true P_t(j) for each row's hidden state (column 0, padding, is 0)."""
        e, bsum = self.softmax_weights(state.query)
        z = bsum.sum(axis=1)
        rep = state.repeat_prob.astype(np.float64)
        out = np.zeros((len(e), self.num_items + 1))
        out[:, 1:] = (1.0 - rep)[:, None] * e[:, : self.num_items] / z[:, None]
        omega = self.window_weights(state.window_logits).astype(np.float64)
        rows = np.broadcast_to(np.arange(len(e))[:, None], omega.shape)
        np.add.at(out, (rows, state.window_items), rep[:, None] * omega)
        out[:, 0] = 0.0  # empty slots (item 0) carry zero weight; keep padding exactly 0
        return out


@dataclasses.dataclass(frozen=True)
class SequenceOracle:
    """The generating process's answers about one log (users in the log's order).

    teacher: the SequenceTeacher; states: HiddenState with leading dims [U, 2] (stage 0 = each
    user's second-to-last event, the leave-one-out validation target; 1 = the last, the test
    target); world_users int64 [U]. Per event, aligned with the log's rows [N]: event_logprob
    float32 (log P_t of the item that occurred), new_session bool (the gap before it was a
    between-session gap), repeat bool (it came from the repeat branch).
    """

    teacher: SequenceTeacher
    states: HiddenState
    world_users: np.ndarray
    event_logprob: np.ndarray
    new_session: np.ndarray
    repeat: np.ndarray

    def probs(self, users: np.ndarray, stage: Stage) -> np.ndarray:
        """float64 [B, I + 1]: the true next-item distribution at users' `stage` events (users int [B])."""
        return self.teacher.next_item_probs(self.states[np.asarray(users, np.int64), _STAGE_INDEX[stage]])

    def scorer(self, stage: Stage) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """A scorer for `evaluate_retrieval` (reads batch['users']): the true probabilities."""
        return lambda batch: self.probs(batch["users"], stage)

    def seen_first_scorer(self, split: LeaveOneOut, stage: Stage) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """The ceiling of the seen-excluded protocol: seen items above all others, then by P_t."""
        def score(batch: dict[str, np.ndarray]) -> np.ndarray:
            p = self.probs(batch["users"], stage)
            for row, u in enumerate(batch["users"]):
                p[row, split.case(int(u), stage)[0]] += 2.0  # probabilities are <= 1
            return p
        return score


def _lengths(g: np.random.Generator, c: SyntheticSequencesConfig) -> np.ndarray:
    """int64 [U]: lognormal lengths with mean ~mean_length, clipped to [min_length, max_length]."""
    s = c.length_sigma
    raw = np.exp(np.log(c.mean_length) - 0.5 * s * s + s * g.standard_normal(c.num_users))
    return np.clip(np.round(raw), c.min_length, c.max_length).astype(np.int64)


def _draw_users(world: World, g: np.random.Generator, n: int) -> np.ndarray:
    """int64 [n]: distinct world users, drawn by popularity without replacement (exponential keys)."""
    side = world.sides["user"]
    keys = g.exponential(size=side.size) / side.popularity
    chosen = np.argpartition(keys, n - 1)[:n]
    return chosen[np.argsort(keys[chosen], kind="stable")]


def generate_sequences(config: SyntheticSequencesConfig, world: World | None = None) -> tuple[Interactions, SequenceOracle]:
    """The log and its oracle; see the module docstring. Deterministic given the config."""
    c = config
    check_constraints(c, "data")  # ranges and cross-field checks (the config may be built directly)
    world = c.world() if world is None else world
    teacher = SequenceTeacher(world, c)
    gen = {name: world.generator("sequences", name)
           for name in ("users", "lengths", "gaps", "drift", "branch", "choice", "action")}
    users = _draw_users(world, gen["users"], c.num_users)
    lengths = _lengths(gen["lengths"], c)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    U, K, W = c.num_users, c.code_dim, c.repeat_window

    # Work in order of decreasing length: the users active at step t are the prefix [:n_t].
    order = np.argsort(-lengths, kind="stable")
    L = lengths[order]
    pos = offsets[:-1][order]  # where each (sorted) user's events go in the output
    anchor = _unit_codes(world.sides["user"].latent[users], K, gen["users"])[order]  # a_u
    drift = np.zeros((U, K), np.float32)
    session = np.zeros((U, K), np.float32)  # S_t
    mass = np.zeros(U, np.float32)  # M_t
    now = EPOCH + np.floor(gen["gaps"].uniform(0, START_SPREAD, U)).astype(np.int64)
    prev_action = np.zeros(U, np.int64)
    win_items = np.zeros((U, W), np.int32)
    win_time = np.full((U, W), -1, np.int64)  # -1: empty slot
    win_action = np.zeros((U, W), np.int64)

    N = int(offsets[-1])
    out_items, out_time, out_action = np.zeros(N, np.int32), np.zeros(N, np.int64), np.zeros(N, np.int8)
    out_logp, out_new, out_rep = np.zeros(N, np.float32), np.zeros(N, bool), np.zeros(N, bool)
    # The oracle's states: [user, stage] with stage 0 = validation event, 1 = test event.
    states = HiddenState(np.zeros((U, 2, K), np.float32), np.zeros((U, 2, W), np.int32),
                         np.full((U, 2, W), -np.inf, np.float32), np.zeros((U, 2), np.float32))

    inter_scale = c.inter_gap_median / (2.0 ** (1.0 / c.inter_gap_shape) - 1.0)  # Lomax median -> scale
    for t in range(int(L[0])):
        n = int(np.searchsorted(-L, -t, side="left"))  # users with L > t
        rows = np.arange(n)
        if t > 0:
            gg = gen["gaps"]
            new = gg.random(n) < c.session_end * SESSION_END_FACTOR[prev_action[:n]]
            intra = np.exp(np.log(c.intra_gap_median) + c.intra_gap_sigma * gg.standard_normal(n))
            inter = inter_scale * ((1.0 - gg.random(n)) ** (-1.0 / c.inter_gap_shape) - 1.0)
            gap = np.maximum(1, np.round(np.minimum(np.where(new, inter, intra), MAX_GAP))).astype(np.int64)
            now[:n] += gap
            delta = np.exp(-gap / c.short_time).astype(np.float32)
            session[:n] *= delta[:, None]
            mass[:n] *= delta
            rho = np.exp(-gap / c.drift_time)[:, None]
            xi = gen["drift"].standard_normal((n, K))
            drift[:n] = (rho * drift[:n] + np.sqrt(1.0 - rho * rho) * c.drift_scale * xi).astype(np.float32)
            out_new[pos[:n] + t] = new
        hs = teacher.hidden_state(anchor[:n] + drift[:n], session[:n] / (SESSION_PRIOR + mass[:n])[:, None],
                                  win_items[:n], win_time[:n], win_action[:n], now[:n])
        q, wlog, rep_p = hs.query, hs.window_logits, hs.repeat_prob
        e, bsum = teacher.softmax_weights(q)
        z = bsum.sum(axis=1)

        # Draw the branch, then the item by inverse CDF (softmax) or from the window.
        branch = gen["branch"].random(n) < rep_p
        u_soft, u_win = gen["choice"].random(n), gen["choice"].random(n)
        soft_item = teacher.sample_softmax(e, bsum, u_soft)
        omega = teacher.window_weights(wlog)
        cum = np.cumsum(omega, axis=1, dtype=np.float64)  # scaled by its total: never an empty slot
        slot = np.minimum((cum < (u_win * cum[:, -1])[:, None]).sum(axis=1), W - 1)
        item = np.where(branch, win_items[rows, slot], soft_item).astype(np.int32)
        p_rep = (omega * (win_items[:n] == item[:, None])).sum(axis=1, dtype=np.float64)
        prob = rep_p * p_rep + (1.0 - rep_p) * e[rows, item - 1] / z

        fit = teacher.fit_score(q, item)
        ga = gen["action"]
        engage = ga.random(n) < _sigmoid(c.click_bias + c.action_slope * fit)
        buy = ga.random(n) < _sigmoid(c.purchase_bias + c.action_slope * fit)
        action = np.where(engage, np.where(buy, 2, 1), 0)

        # The oracle's states at each user's last two events (the leave-one-out targets).
        for stage in (0, 1):
            hit = np.flatnonzero(L[:n] - 2 + stage == t)
            for f in dataclasses.fields(HiddenState):
                getattr(states, f.name)[order[hit], stage] = getattr(hs, f.name)[hit]

        at = pos[:n] + t
        out_items[at], out_time[at], out_action[at] = item, now[:n], action
        out_logp[at], out_rep[at] = np.log(prob), branch
        # Update the session state and the repeat window with this event.
        session[:n] += ACTION_STATE_WEIGHT[action][:, None] * teacher.next_codes[item - 1]
        mass[:n] += ACTION_STATE_WEIGHT[action]
        w = t % W
        win_items[:n, w], win_time[:n, w], win_action[:n, w] = item, now[:n], action
        prev_action[:n] = action

    log = Interactions(
        offsets=offsets, items=out_items, timestamps=out_time, ratings=np.full(N, np.nan, np.float32),
        user_ids=tuple(str(u) for u in users), item_ids=("",) + tuple(str(i) for i in teacher.world_items),
        source="synthetic", actions=out_action,
    )
    oracle = SequenceOracle(teacher=teacher, states=states,
                            world_users=users, event_logprob=out_logp, new_session=out_new, repeat=out_rep)
    return log, oracle


def oracle_metrics(split: LeaveOneOut, oracle: SequenceOracle, stage: Stage = "test", *, max_len: int = 50,
                   ks: tuple[int, ...] = (1, 5, 10, 50, 200), batch_size: int = 512) -> dict[str, float]:
    """The oracle's retrieval metrics on `split` (= leave_one_out(log) of the oracle's log).

    Keys (m = hr@k, ndcg@k, mrr, ...): `oracle_m` ranks by P_t with seen items kept (the ceiling
    of that protocol); `oracle_excl_m` ranks by P_t with seen items excluded (the default
    protocol; not its ceiling); `ceiling_excl_m` is the seen-excluded protocol's ceiling (seen
    items first, then P_t); `oracle_nll` is the mean -log P_t(target) (the next-item
    cross-entropy floor of the hidden-state process).
    """
    data = SequenceBatches(split, max_len=max_len)
    runs = {
        "oracle": (oracle.scorer(stage), False),
        "oracle_excl": (oracle.scorer(stage), True),
        "ceiling_excl": (oracle.seen_first_scorer(split, stage), True),
    }
    out: dict[str, float] = {}
    for name, (scorer, exclude) in runs.items():
        res = evaluate_retrieval(data, scorer, stage, batch_size=batch_size, ks=ks, exclude_seen=exclude)
        out.update({f"{name}_{k}": v for k, v in res.items() if k != "users"})
    rows = split.log.offsets[split.eval_users + 1] - (2 if stage == "valid" else 1)
    out["oracle_nll"] = float(-oracle.event_logprob[rows].astype(np.float64).mean())
    out["users"] = float(len(split.eval_users))
    return out


@register_data("synthetic_sequences")
@dataclasses.dataclass(frozen=True)
class SyntheticSequencesConfig(SequenceDataConfig):
    """The synthetic sequence view: seeded timelines of (item, action, timestamp) with an oracle."""

    name: Literal["synthetic_sequences"] = knob("synthetic_sequences", help="data set")
    seed: int = knob(0, ge=0, help="world seed: fixes the world, the users, the items and every event")
    num_users: int = knob(5000, ge=1, le=100_000, help="users (drawn by world popularity, distinct)")
    num_items: int = knob(2000, ge=2, le=50_000, help="catalogue: the world's most popular items")
    mean_length: float = knob(50.0, gt=0.0, help="mean events per user (lognormal, then clipped)")
    length_sigma: float = knob(0.8, ge=0.0, le=3.0, help="log-std of the lengths")
    min_length: int = knob(5, ge=3, help="fewest events per user (>= 3: every user has valid and test)")
    max_length: int = knob(200, ge=3, help="most events per user")
    code_dim: int = knob(32, ge=8, le=512, help="K: item/user code dimensions (the first 8 are world latents)")
    spectrum_exponent: float = knob(1.0, ge=0.0, le=4.0, help="beta: code coordinate k has weight (1 + k / 8)^-beta")
    temperature: float = knob(1.0, gt=0.0, help="softmax temperature of the next-item choice")
    popularity_weight: float = knob(0.5, ge=0.0, help="weight of log popularity in the logit")
    long_term_scale: float = knob(1.0, ge=0.0, help="logit std of the long-term term (per unit code)")
    short_term_scale: float = knob(3.0, ge=0.0, help="logit std of the session term per unit of state")
    transition_angle: float = knob(1.57, ge=0.0, le=3.2, help="how far 'leads to' codes turn from 'is' codes (rad)")
    short_time: float = knob(3600.0, gt=0.0, help="session state decay time (s)")
    drift_time: float = knob(14 * 86400.0, gt=0.0, help="long-term drift correlation time (s)")
    drift_scale: float = knob(0.7, ge=0.0, help="stationary std of the drift per code coordinate")
    repeat_prob: float = knob(0.15, ge=0.0, le=1.0, help="probability an event re-consumes a window item")
    repeat_window: int = knob(20, ge=1, le=1000, help="recent events eligible for repeat consumption")
    repeat_time: float = knob(86400.0, gt=0.0, help="recency scale of the repeat weights (s)")
    session_end: float = knob(0.12, ge=0.0, le=0.33, help="P(new session) after a view or click (x3 after a purchase)")
    intra_gap_median: float = knob(90.0, gt=0.0, help="median gap inside a session (s; lognormal)")
    intra_gap_sigma: float = knob(1.0, ge=0.0, help="log-std of gaps inside a session")
    inter_gap_median: float = knob(86400.0, gt=0.0, help="median gap between sessions (s; Lomax)")
    inter_gap_shape: float = knob(1.5, gt=0.0, help="Pareto tail index of gaps between sessions")
    click_bias: float = knob(-2.0, help="logit of P(click or purchase) at an average fit")
    purchase_bias: float = knob(-2.5, help="logit of P(purchase | click or purchase) at an average fit")
    action_slope: float = knob(1.0, help="how much the user-item fit raises click and purchase odds")

    def check(self) -> None:
        if self.min_length > self.max_length:
            raise ConfigError("min_length", f"expected <= max_length ({self.max_length}), got {self.min_length}")
        if not self.min_length <= self.mean_length <= self.max_length:
            raise ConfigError("mean_length", f"expected in [{self.min_length}, {self.max_length}], got {self.mean_length}")

    def world(self) -> World:
        """The world the CTR view builds for this seed (its default fields): same users and items."""
        ctr = SyntheticCTRConfig(seed=self.seed)
        return World(seed=self.seed, cardinalities=ctr.cardinalities, num_dense=ctr.num_dense,
                     zipf_exponent=ctr.zipf_exponent)

    def generate(self) -> tuple[Interactions, SequenceOracle]:
        """(log, oracle): `generate_sequences(self)`."""
        return generate_sequences(self)

    def catalogue_size(self) -> int:
        return self.num_items

    def load(self):
        """For `SequenceDataset`: the log, the oracle's mean NLL of the test targets, its scorers."""
        log, oracle = self.generate()
        return log, {"spectrum_exponent": self.spectrum_exponent}, oracle.scorer
