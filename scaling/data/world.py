"""The seeded synthetic world: users, items and contexts with latent factors, and their attributes.

This is the entity layer shared by every synthetic view (the CTR view in `synthetic_ctr.py`;
sequence and ranking views later). It knows nothing about labels.

    World(seed, cardinalities, num_dense, ...)
      three sides:  user, item, context. Each side has `num_segments` segments (latent clusters)
                    with centres z_s ~ N(0, I_r), and a finite pool of members (users, items,
                    context states). A member has a segment, a latent vector (its segment's
                    centre + individual N(0, 0.5^2 I_r) noise) and a Zipf popularity.
      fields:       categorical field f belongs to one side (round-robin: user, item, context)
                    and has `cardinalities[f]` values. Value j has a latent vector a_f[j] ~
                    N(0, I_r / r) and a prior weight (j + 1)^-zipf: id 0 is the most popular.
                    A member of segment s holds the value j with probability
                        p_f(j | s)  ∝  (j + 1)^-zipf * exp(affinity * <a_f[j], z_s>),
                    drawn once when the world is built: a member's attributes are fixed, and
                    fields of the same side co-vary through the shared segment.
      dense:        D features, each a fixed linear function of the example's three member
                    latents plus N(0, dense_noise^2) noise, shifted and scaled by the exact
                    popularity-weighted mean and variance so each is standardized (mean 0,
                    variance 1 in expectation; the marginal is a Gaussian mixture, not exactly
                    normal).

An example's entities are drawn by popularity from the three pools. Every per-example random
number comes from `CounterRNG`, a stateless hash of (seed, stream, example index, slot): example
i is a pure function of (seed, stream, i), so any batch can be generated on its own, in any order,
by any worker, with any batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

__all__ = [
    "CounterRNG",
    "World",
    "Side",
    "Entities",
    "PowerLawRanks",
    "log_spaced_cardinalities",
    "rowwise_matmul",
    "rowwise_dot",
    "SIDES",
]

SIDES = ("user", "item", "context")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SLOTS = 256  # random numbers available per example and stream


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (a bijection on uint64 with full avalanche), in place."""
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def _key(*words: int) -> np.uint64:
    """Hash a tuple of non-negative ints into one 64-bit key."""
    x = np.array([0x5EED], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for w in words:
            x = _mix64(x + np.uint64(w & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + _GOLDEN)
    return x[0]


class CounterRNG:
    """Counter-based random numbers: a pure function of (seed, stream, example index, slot).

    Slot s of example i is `mix64(key + (i * 256 + s + 1) * golden)`: SplitMix64 evaluated at a
    counter, so draws are independent across examples and slots and need no state. Each consumer
    owns a fixed range of slots, so adding draws elsewhere never changes existing ones.
    """

    def __init__(self, seed: int, stream: int):
        self.seed = int(seed)
        self.stream = int(stream)
        self.key = _key(self.seed, self.stream)

    def bits(self, index: np.ndarray, slot: int, n: int = 1) -> np.ndarray:
        """uint64 [len(index), n]: slots slot .. slot+n-1 of each example."""
        if not (0 <= slot and slot + n <= _SLOTS):
            raise ValueError(f"slots {slot}..{slot + n - 1} outside 0..{_SLOTS - 1}")
        idx = np.asarray(index, dtype=np.int64).astype(np.uint64)
        counter = idx[:, None] * np.uint64(_SLOTS) + np.arange(slot + 1, slot + n + 1, dtype=np.uint64)[None, :]
        with np.errstate(over="ignore"):
            x = counter * _GOLDEN + self.key
            return _mix64(x)

    def uniform(self, index: np.ndarray, slot: int, n: int = 1) -> np.ndarray:
        """float64 [len(index), n] uniform on [0, 1), 53 random bits each."""
        return (self.bits(index, slot, n) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)

    def normal(self, index: np.ndarray, slot: int, n: int = 1) -> np.ndarray:
        """float32 [len(index), n] standard normal (Box-Muller; uses ceil(n/2) slots)."""
        half = (n + 1) // 2
        b = self.bits(index, slot, half)
        # Two 32-bit uniforms per 64-bit word; u1 in (0, 1] so the log is finite.
        u1 = ((b >> np.uint64(32)).astype(np.float32) + np.float32(1.0)) * np.float32(2.0**-32)
        u2 = (b & np.uint64(0xFFFFFFFF)).astype(np.float32) * np.float32(2.0**-32)
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        theta = np.float32(2.0 * np.pi) * u2
        out = np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)
        return out[:, :n]


_ROW_BLOCK = 64


def rowwise_matmul(x: np.ndarray, w: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
    """x @ w for x [B, K], w [K, N], with each row's result independent of the batch it came in.

    BLAS picks kernels (and summation orders) by matrix shape and, on some CPUs, by a row's place in
    its register tile, so a row computed alone can differ in the last bit from the same row inside a
    big batch. Every product here is a stack of fixed [64, K] @ [K, N] blocks in which row b sits at
    slot `slots[b] % 64` (pass the example index: default, its row number), so example i lands in the
    same slot of the same kernel however it is requested. An aligned contiguous batch is laid out
    exactly as a plain blocked matmul.
    """
    n, k = x.shape
    if n == 0 or k == 0 or w.shape[1] == 0:
        return np.zeros((n, w.shape[1]), dtype=np.result_type(x, w))
    slot = (np.arange(n) if slots is None else np.asarray(slots, dtype=np.int64)) % _ROW_BLOCK
    # rank[b]: how many earlier rows share b's slot, i.e. which block row b goes to.
    order = np.argsort(slot, kind="stable")
    first = np.searchsorted(slot[order], slot[order], side="left")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first
    blocks = np.zeros((int(rank.max()) + 1, _ROW_BLOCK, k), dtype=x.dtype)
    blocks[rank, slot] = x
    return np.matmul(blocks, w)[rank, slot]


def rowwise_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w for x [B, K], w [K] as an elementwise product and a per-row sum (independent of B)."""
    return (x * w).sum(axis=-1)


def log_spaced_cardinalities(num_fields: int, lo: int, hi: int) -> tuple[int, ...]:
    """`num_fields` cardinalities from lo to hi, evenly spaced in log, in increasing order."""
    if num_fields == 1:
        return (int(hi),)
    return tuple(int(round(c)) for c in np.geomspace(lo, hi, num_fields))


def _zipf_probs(n: int, exponent: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


class PowerLawRanks:
    """Ranks 0..n-1 with P(rank k) = F(k + 2) - F(k + 1), F the CDF of density ∝ x^-a on [1, n + 1).

    The discretized continuous power law: Zipf-like (P(k) ≈ (k + 1)^-a / H), and drawn in O(1) by
    inverting F in closed form, which is much faster than a search over n cumulative weights.
    """

    def __init__(self, n: int, exponent: float):
        self.n = int(n)
        self.a = float(exponent)
        edges = np.arange(1, self.n + 2, dtype=np.float64)
        cdf = self._cdf(edges)
        self.probs = np.diff(cdf)

    def _cdf(self, x: np.ndarray) -> np.ndarray:
        if abs(self.a - 1.0) < 1e-9:
            return np.log(x) / np.log(self.n + 1.0)
        e = 1.0 - self.a
        return (x**e - 1.0) / ((self.n + 1.0) ** e - 1.0)

    def draw(self, u: np.ndarray) -> np.ndarray:
        """int64 ranks from uniforms u in [0, 1)."""
        if abs(self.a - 1.0) < 1e-9:
            x = np.exp(u * np.log(self.n + 1.0))
        else:
            e = 1.0 - self.a
            x = (1.0 + u * ((self.n + 1.0) ** e - 1.0)) ** (1.0 / e)
        return np.minimum(x.astype(np.int64) - 1, self.n - 1).clip(0)


def _sample_by_group(
    rng: np.random.Generator, log_prior: np.ndarray, tilt: np.ndarray, group: np.ndarray
) -> np.ndarray:
    """For each entry of `group`, a value j drawn with probability ∝ exp(log_prior[j] + tilt[group, j]).

    One group at a time (inverse CDF), so memory stays O(number of values).
    """
    out = np.empty(len(group), dtype=np.int64)
    for s in range(tilt.shape[0]):
        rows = np.flatnonzero(group == s)
        if not len(rows):
            continue
        logits = log_prior + tilt[s]
        cdf = np.cumsum(np.exp(logits - logits.max()))
        cdf /= cdf[-1]
        out[rows] = np.minimum(np.searchsorted(cdf, rng.random(len(rows)), side="right"), len(cdf) - 1)
    return out


@dataclasses.dataclass(frozen=True)
class Side:
    """One side of the world (users, items or contexts): a pool of members and their attributes."""

    name: str
    fields: tuple[int, ...]  # the categorical fields this side owns (global field numbers)
    centres: np.ndarray  # float32 [S, r] segment centres
    segment: np.ndarray  # int32 [P] each member's segment
    latent: np.ndarray  # float32 [P, r] each member's latent factors
    popularity: np.ndarray  # float64 [P] probability of drawing each member
    attributes: np.ndarray  # int32 [P, len(fields)] each member's value of each field
    ranks: PowerLawRanks  # popularity by rank
    by_rank: np.ndarray  # int64 [P] the member at each popularity rank

    @property
    def size(self) -> int:
        return len(self.segment)

    def draw(self, u: np.ndarray) -> np.ndarray:
        """Members by popularity from uniforms u in [0, 1)."""
        return self.by_rank[self.ranks.draw(u)]


@dataclasses.dataclass(frozen=True)
class Entities:
    """The entities of a block of examples and what the world shows of them."""

    members: dict[str, np.ndarray]  # side -> int64 [B] member index
    sparse: np.ndarray  # int32 [B, F]
    dense: np.ndarray  # float32 [B, D]


class World:
    """Users, items and contexts with latent factors; see the module docstring.

    Everything here is fixed by the arguments (no global state); building takes well under a
    second at the default sizes. `draw(rng, index)` gives the entities and features of examples.
    """

    # Slots 0..63 of each example belong to the world; views use 64 and up.
    SLOT_MEMBERS = 0  # 3 slots: which user, item, context
    SLOT_DENSE = 8  # up to 112 dense features (56 slots)
    FIRST_VIEW_SLOT = 64

    def __init__(
        self,
        *,
        seed: int,
        cardinalities: tuple[int, ...],
        num_dense: int,
        zipf_exponent: float = 1.1,
        latent_dim: int = 8,
        num_segments: int = 32,
        pool_sizes: tuple[int, int, int] = (100_000, 50_000, 10_000),
        pool_zipf_exponent: float = 0.8,
        affinity: float = 1.5,
        dense_noise: float = 0.5,
    ):
        if num_dense > 2 * (self.FIRST_VIEW_SLOT - self.SLOT_DENSE):
            raise ValueError(f"at most {2 * (self.FIRST_VIEW_SLOT - self.SLOT_DENSE)} dense features")
        self.seed = int(seed)
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.num_fields = len(self.cardinalities)
        self.num_dense = int(num_dense)
        self.zipf_exponent = float(zipf_exponent)
        self.latent_dim = int(latent_dim)
        r = self.latent_dim

        # Field values: a latent vector and a Zipf prior each.
        self.field_side = tuple(SIDES[f % len(SIDES)] for f in range(self.num_fields))
        self.value_latent: list[np.ndarray] = []
        for f, card in enumerate(self.cardinalities):
            g = self.generator("value_latent", f)
            self.value_latent.append((g.standard_normal((card, r)) / np.sqrt(r)).astype(np.float32))
        self.value_prior = [_zipf_probs(c, self.zipf_exponent) for c in self.cardinalities]

        self.sides: dict[str, Side] = {}
        for s, name in enumerate(SIDES):
            g = self.generator("side", s)
            centres = g.standard_normal((num_segments, r)).astype(np.float32)
            size = int(pool_sizes[s])
            seg_w = _zipf_probs(num_segments, 0.5)
            segment = g.choice(num_segments, size=size, p=seg_w).astype(np.int32)
            latent = (centres[segment] + 0.5 * g.standard_normal((size, r))).astype(np.float32)
            ranks = PowerLawRanks(size, pool_zipf_exponent)
            by_rank = g.permutation(size)
            popularity = np.empty(size)
            popularity[by_rank] = ranks.probs
            fields = tuple(f for f in range(self.num_fields) if self.field_side[f] == name)
            attrs = np.zeros((size, len(fields)), dtype=np.int32)
            for k, f in enumerate(fields):
                tilt = affinity * (centres @ self.value_latent[f].T)
                attrs[:, k] = _sample_by_group(g, np.log(self.value_prior[f]), tilt, segment)
            self.sides[name] = Side(name, fields, centres, segment, latent, popularity, attrs, ranks, by_rank)

        # Dense features: standardized linear views of the three member latents.
        g = self.generator("dense")
        mix = g.standard_normal((len(SIDES) * r, self.num_dense)) / np.sqrt(len(SIDES) * r)
        self.dense_mix = mix.astype(np.float32)
        self.dense_noise = float(dense_noise)
        mean = np.zeros(self.num_dense)
        var = np.full(self.num_dense, self.dense_noise**2)
        for s, name in enumerate(SIDES):
            side = self.sides[name]
            proj = side.latent.astype(np.float64) @ self.dense_mix[s * r : (s + 1) * r].astype(np.float64)
            m = side.popularity @ proj
            mean += m
            var += side.popularity @ (proj - m) ** 2
        self.dense_mean = mean.astype(np.float32)
        self.dense_scale = (1.0 / np.sqrt(var)).astype(np.float32)

    def generator(self, *tag: str | int) -> np.random.Generator:
        """A numpy Generator for one named build-time component (independent of the others)."""
        words = [self.seed]
        for w in tag:
            if isinstance(w, str):
                w = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            words.append(int(w))
        return np.random.default_rng(np.random.SeedSequence(words))

    @property
    def field_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.cardinalities)[:-1]]).astype(np.int64)

    def draw(self, rng: CounterRNG, index: np.ndarray) -> Entities:
        """Entities and features of examples `index` (int64 [B]) of the stream behind `rng`."""
        index = np.asarray(index, dtype=np.int64)
        u = rng.uniform(index, self.SLOT_MEMBERS, len(SIDES))
        members = {name: self.sides[name].draw(u[:, s]) for s, name in enumerate(SIDES)}
        return self.features(members, rng, index)

    def features(self, members: dict[str, np.ndarray], rng: CounterRNG, index: np.ndarray) -> Entities:
        """What the world shows of given members (side -> int64 [B] member index) in examples
        `index` of the stream behind `rng` (the dense features' noise is drawn per example)."""
        index = np.asarray(index, dtype=np.int64)
        sparse = np.empty((len(index), self.num_fields), dtype=np.int32)
        latents = []
        for name in SIDES:
            side = self.sides[name]
            m = members[name]
            if side.fields:
                sparse[:, list(side.fields)] = side.attributes[m]
            latents.append(side.latent[m])
        z = np.concatenate(latents, axis=1)
        dense = rowwise_matmul(z, self.dense_mix, slots=index)
        if self.num_dense:
            dense += np.float32(self.dense_noise) * rng.normal(index, self.SLOT_DENSE, self.num_dense)
        dense -= self.dense_mean
        dense *= self.dense_scale
        return Entities(members=members, sparse=sparse, dense=dense.astype(np.float32, copy=False))
