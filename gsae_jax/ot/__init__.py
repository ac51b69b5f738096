"""The OT engine: chunked log-domain softmin, Sinkhorn solvers and divergences.

Cost ``C(x, y) = ½‖x − y‖²`` and ``ε = blur²`` throughout (GeomLoss convention).
"""

from gsae_jax.ot.dense import genevay_loss, round_plan, sharp_sinkhorn_loss, sinkhorn_plan
from gsae_jax.ot.sinkhorn import (
  SinkhornOutput,
  bounding_box_diameter,
  epsilon_schedule,
  sinkhorn,
  sinkhorn_divergence,
  validate_inputs,
)
from gsae_jax.ot.softmin import default_chunk_size, softmin, softmin_with_mean

__all__ = [
  "SinkhornOutput",
  "bounding_box_diameter",
  "default_chunk_size",
  "epsilon_schedule",
  "genevay_loss",
  "round_plan",
  "sharp_sinkhorn_loss",
  "sinkhorn",
  "sinkhorn_divergence",
  "sinkhorn_plan",
  "softmin",
  "softmin_with_mean",
  "validate_inputs",
]
