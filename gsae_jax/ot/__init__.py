"""The OT engine: chunked log-domain softmin, Sinkhorn solvers and divergences.

Cost ``C(x, y) = ½‖x − y‖²`` and ``ε = blur²`` throughout (GeomLoss convention). One module per
job: ``validation`` (input checks), ``schedule`` (ε-annealing), ``problem`` (the problem,
settings and result types), ``divergence`` (the debiased divergence and its backends),
``fixed_epsilon`` (the fixed-ε solver), ``softmin`` (the kernel), ``dense`` (the other papers'
dense unrolled losses).
"""

from gsae_jax.ot.dense import genevay_loss, round_plan, sharp_sinkhorn_loss, sinkhorn_plan
from gsae_jax.ot.divergence import (
  make_problem_and_settings,
  resolve_backend,
  sinkhorn_divergence,
  solve_divergence,
)
from gsae_jax.ot.fixed_epsilon import sinkhorn
from gsae_jax.ot.problem import (
  BACKENDS,
  COARSE_GRIDS,
  DivergenceOutput,
  DivergenceSettings,
  OTProblem,
  SinkhornOutput,
)
from gsae_jax.ot.schedule import bounding_box_diameter, epsilon_schedule
from gsae_jax.ot.softmin import default_chunk_size, softmin, softmin_with_mean
from gsae_jax.ot.validation import validate_inputs

__all__ = [
  "BACKENDS",
  "COARSE_GRIDS",
  "DivergenceOutput",
  "DivergenceSettings",
  "OTProblem",
  "SinkhornOutput",
  "bounding_box_diameter",
  "default_chunk_size",
  "epsilon_schedule",
  "genevay_loss",
  "make_problem_and_settings",
  "resolve_backend",
  "round_plan",
  "sharp_sinkhorn_loss",
  "sinkhorn",
  "sinkhorn_divergence",
  "sinkhorn_plan",
  "softmin",
  "softmin_with_mean",
  "solve_divergence",
  "validate_inputs",
]
