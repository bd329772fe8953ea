"""What a CTR batch holds: the contract between data pipelines and models."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CTRFeatureSpec:
    """Shapes of a CTR batch.

    A batch is a dict of arrays with static shapes:
      sparse: int32 [B, F], the id of each categorical field, in [0, cardinalities[f])
      dense:  float32 [B, D]
      label:  float32 [B], 0 or 1
    """

    cardinalities: tuple[int, ...]
    num_dense: int

    @property
    def num_fields(self) -> int:
        return len(self.cardinalities)

    @property
    def total_vocab(self) -> int:
        return int(sum(self.cardinalities))
