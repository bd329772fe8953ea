"""Shared CTR interaction blocks: the first-order (logistic-regression) term, the factorization
machine's pairwise term, dense features as fields, and DCNv2's cross network.

With field embeddings E [B, F, d] (one row per field) and dense features x [B, D]:

  first order   w0 + sum_f w[id_f] + <v, x>                     (one scalar per id, one per dense feature)
  FM pairwise   sum_{i<j} <e_i, e_j> = 1/2 sum_k [(sum_i e_ik)^2 - sum_i e_ik^2]      (Rendle 2010)
  dense fields  e_{F+j} = x_j u_j                                (a real-valued feature scales its vector;
                                                                 `FieldVectors` stacks them after the F embeddings)
  cross layer   x_{l+1} = x_0 * (W_l x_l + b_l) + x_l            (DCNv2, Wang et al. 2021; W_l [D', D'])
  low rank      W_l = U_l V_l^T, U_l, V_l [D', r]                 (the paper's cost-saving variant)

`FMTerms` pairs the field vectors with the first-order term: what FM and DeepFM both read.

FLOPs (forward, per example; the project's convention, scaling/models/mlp.py) are given beside
each block; embedding gathers are excluded.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.data.spec import CTRFeatureSpec
from scaling.models.embedding import EmbeddingTable, FieldEmbedding
from scaling.sharding.annotate import logical_param

__all__ = ["CrossNetwork", "DenseFields", "FieldVectors", "FirstOrder", "FMTerms", "cross_network_flops", "fm_flops",
           "fm_pairwise", "fm_pairwise_flops", "first_order_flops"]


class FirstOrder(nnx.Module):
    """w0 + sum_f w[id_f] + <v, dense>: sparse int32 [B, F], dense [B, D] (history [B, S, L]:
    multi-hot fields, each weighing the mean of its ids' weights) -> [B]."""

    def __init__(self, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.weights = FieldEmbedding(spec.cardinalities, 1, rngs=rngs, init_scale=0.0, bags=spec.bag_cardinalities)
        self.dense = (logical_param(jnp.zeros((spec.num_dense,), jnp.float32), ("embed",))
                      if spec.num_dense > 0 else None)
        self.bias = logical_param(jnp.zeros((), jnp.float32), ())

    def __call__(self, sparse: jax.Array, dense: jax.Array, history: jax.Array | None = None) -> jax.Array:
        out = self.weights(sparse, history)[..., 0].sum(axis=1) + self.bias[...]
        if self.dense is not None:
            out = out + dense @ self.dense[...]
        return out


def first_order_flops(spec: CTRFeatureSpec) -> float:
    """The field sum (F), the bias add, and the dense dot product with its add (2D)."""
    return float(spec.num_fields + 1 + (2 * spec.num_dense if spec.num_dense else 0))


class DenseFields(nnx.Module):
    """Real-valued features as FM fields: dense [B, D] -> [B, D, d], row j = x_j u_j (u_j drawn
    N(0, init_scale^2), 1/sqrt(d) by default, as the embeddings)."""

    def __init__(self, num_dense: int, dim: int, *, rngs: nnx.Rngs, init_scale: float | None = None):
        scale = init_scale if init_scale is not None else 1.0 / np.sqrt(dim)
        self.vectors = logical_param(scale * jax.random.normal(rngs.params(), (num_dense, dim)),
                                     ("fields", "embed"), EmbeddingTable)

    def __call__(self, dense: jax.Array) -> jax.Array:
        return dense[..., None] * self.vectors[...]


class FieldVectors(nnx.Module):
    """Every field as a d-vector: the F categorical embeddings, then the D dense features as
    fields: sparse int32 [B, F], dense [B, D] (history [B, S, L]: S pooled multi-hot fields after
    the F) -> [B, F + S + D, d] (what FM, DeepFM, AutoInt+ and xDeepFM interact). Every vector is
    drawn N(0, init_scale^2), 1/sqrt(d) by default."""

    def __init__(self, spec: CTRFeatureSpec, dim: int, *, rngs: nnx.Rngs, init_scale: float | None = None):
        self.embedding = FieldEmbedding(spec.cardinalities, dim, rngs=rngs, bags=spec.bag_cardinalities,
                                        init_scale=init_scale)
        self.dense_fields = (DenseFields(spec.num_dense, dim, rngs=rngs, init_scale=init_scale)
                             if spec.num_dense > 0 else None)

    def __call__(self, sparse: jax.Array, dense: jax.Array, history: jax.Array | None = None) -> jax.Array:
        e = self.embedding(sparse, history)
        if self.dense_fields is None:
            return e
        return jnp.concatenate([e, self.dense_fields(dense.astype(e.dtype))], axis=1)


def fm_pairwise(e: jax.Array) -> jax.Array:
    """sum_{i<j} <e_i, e_j> for e [B, N, d] -> [B], in O(N d) (Rendle's identity)."""
    s = e.sum(axis=1)
    return 0.5 * (s * s - (e * e).sum(axis=1)).sum(axis=-1)


def fm_pairwise_flops(num_vectors: int, dim: int) -> float:
    """Sum over vectors (N d), its square (d), the squares and their sum (2 N d), the difference
    and its sum (2 d), the halving (1)."""
    return float(3 * num_vectors * dim + 3 * dim + 1)


class FMTerms(nnx.Module):
    """A factorization machine's inputs: every field as a vector (FieldVectors) and the first-order
    term. The FM logit is `first + fm_pairwise(e)`; DeepFM adds a DNN over the same e."""

    def __init__(self, spec: CTRFeatureSpec, dim: int, *, rngs: nnx.Rngs, init_scale: float | None = None):
        self.fields = FieldVectors(spec, dim, rngs=rngs, init_scale=init_scale)
        self.linear = FirstOrder(spec, rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """-> (all field vectors [B, F + S + D, d], first-order logit [B])."""
        e = self.fields(batch["sparse"], batch["dense"], batch.get("history"))
        dense = batch["dense"].astype(e.dtype)
        return e, self.linear(batch["sparse"], dense, batch.get("history"))


def fm_flops(spec: CTRFeatureSpec, dim: int) -> float:
    """The FM logit: LR + the dense fields (D d) + the pairwise term over F + S + D vectors + the
    final add."""
    return first_order_flops(spec) + spec.num_dense * dim + fm_pairwise_flops(spec.num_fields + spec.num_dense, dim) + 1


class CrossNetwork(nnx.Module):
    """DCNv2's cross network x0 [B, D'] -> x_L [B, D']: `num_layers` layers, full-rank W_l (rank
    0) or low-rank U_l V_l^T."""

    def __init__(self, width: int, num_layers: int, rank: int = 0, *, rngs: nnx.Rngs):
        self.rank = rank
        std = 1.0 / np.sqrt(width)
        if rank:
            self.u = logical_param(std * jax.random.normal(rngs.params(), (num_layers, width, rank)),
                                   ("layers", "mlp", "rank"))
            self.v = logical_param(std * jax.random.normal(rngs.params(), (num_layers, width, rank)),
                                   ("layers", "mlp", "rank"))
        else:
            self.w = logical_param(std * jax.random.normal(rngs.params(), (num_layers, width, width)),
                                   ("layers", "mlp", None))
        self.b = logical_param(jnp.zeros((num_layers, width), jnp.float32), ("layers", "mlp"))
        self.num_layers = num_layers

    def __call__(self, x0: jax.Array) -> jax.Array:
        x = x0
        for layer in range(self.num_layers):
            if self.rank:
                h = (x @ self.v[layer].astype(x.dtype)) @ self.u[layer].T.astype(x.dtype)
            else:
                h = x @ self.w[layer].astype(x.dtype)
            x = x0 * (h + self.b[layer]) + x
        return x


def cross_network_flops(width: int, num_layers: int, rank: int = 0) -> float:
    """Per layer: the matmul(s) (2 D'^2, or 4 D' r low-rank), the bias add, the product with x0
    and the residual add (3 D')."""
    matmul = 4.0 * width * rank if rank else 2.0 * width * width
    return float(num_layers * (matmul + 3 * width))
