"""The two fixed reference points of the CTR zoo: logistic regression and a factorization machine.

    LR:  logit = w0 + sum_f w[id_f] + <v, dense>                        (`FirstOrder`: one weight
                                                                         per id, one per dense feature;
                                                                         a multi-hot field weighs the
                                                                         mean of its ids' weights)
    FM:  logit = LR + sum_{i<j} <e_i, e_j>    (Rendle, ICDM'10)          e: the F field embeddings
                                                                         (S pooled bags after them)
                                                                         and the D dense features as
                                                                         fields (x_j u_j), d wide

FM draws its field vectors N(0, 0.01^2) (`init_scale`; libFM's init_stdev), not the deep models'
N(0, 1/d): the pairwise term sums N(N-1)/2 products, so at 1/sqrt(d) it starts as a logit of std
~ N / sqrt(2d) (~4 for 24 vectors at d = 16) that a short run does not unlearn (NE > 1 after 60
steps of the quickstart world at d = 4 and 8; 0.79..0.82 at 0.01).

Neither has a depth to scale: LR has one size; FM's ladder is its embedding width d (the rank of
its pairwise interactions). Their dense FLOPs are a few hundred per example, below the index
arithmetic XLA counts for the embedding gathers (tests/test_flops.py measures the gathers apart
for them), so on a FLOP axis they sit at the far left as references, not as scaling curves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config_schema import knob
from scaling.data.spec import CTRFeatureSpec
from scaling.models.base import CTRModel, CTRModelConfig
from scaling.models.feature_interactions import FirstOrder, FMTerms, first_order_flops, fm_flops, fm_pairwise
from scaling.models.registry import register_model

__all__ = ["LRConfig", "LogisticRegression", "FMConfig", "FactorizationMachine"]


@dataclasses.dataclass(frozen=True)
class LRConfig(CTRModelConfig):
    """Logistic regression over the ids and the dense features: nothing to choose."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = {"base": {}}
    embed_dim: ClassVar[int] = 1  # one weight per id: what `embedding_bytes_per_example` reads

    name: Literal["lr"] = knob("lr")
    size: str = knob("custom", help="'base' (the only preset) or 'custom'; LR has no knobs")

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        return first_order_flops(spec)


@register_model("lr", LRConfig)
class LogisticRegression(CTRModel):
    """batch {'sparse' [B, F], 'dense' [B, D]} -> logits [B]."""

    def __init__(self, config: LRConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        self.linear = FirstOrder(spec, rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        return self.linear(batch["sparse"], batch["dense"], batch.get("history")).astype(jnp.float32)


_FM_SIZES: dict[str, dict[str, Any]] = {f"d{d}": dict(embed_dim=d) for d in (4, 8, 16)}


@dataclasses.dataclass(frozen=True)
class FMConfig(CTRModelConfig):
    """Factorization machine; `size` names its embedding width."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _FM_SIZES

    name: Literal["fm"] = knob("fm")
    size: str = knob("custom", help=f"preset name ({', '.join(_FM_SIZES)}) or 'custom'")
    embed_dim: int = knob(8, ge=1, help="d: embedding width (the rank of the pairwise interactions)")
    init_scale: float = knob(0.01, gt=0.0, help="std of the field vectors' init (the deep models use 1/sqrt(d))")

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        return fm_flops(spec, self.embed_dim)


@register_model("fm", FMConfig)
class FactorizationMachine(CTRModel):
    """batch {'sparse' [B, F], 'dense' [B, D]} -> logits [B]."""

    def __init__(self, config: FMConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        self.terms = FMTerms(spec, config.embed_dim, rngs=rngs, init_scale=config.init_scale)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        e, first = self.terms(batch)
        return (first + fm_pairwise(e)).astype(jnp.float32)
