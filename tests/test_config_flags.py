"""Flags derived from the config dataclass: every setting reachable, one source of defaults."""

import dataclasses

import pytest
from absl import flags

from gsae_jax.training import config_flags
from gsae_jax.training.config_flags import config_from_flags, define_flags
from gsae_jax.training.gsae import DEFAULT_LAMBDA, GSAEConfig
from gsae_jax.training.loop import ExperimentConfig


def _parse(argv, **kw):
  fv = flags.FlagValues()
  names = define_flags(ExperimentConfig, flag_values=fv, **kw)
  fv(["prog", *argv])
  return fv, names


def test_every_setting_is_a_flag_with_the_dataclass_default():
  fv, names = _parse([])
  assert names == [f.name for f in dataclasses.fields(ExperimentConfig)]
  assert config_from_flags(ExperimentConfig, names, fv) == ExperimentConfig()
  # Every step setting of GSAEConfig is reachable from the command line.
  assert {f.name for f in dataclasses.fields(GSAEConfig)} <= set(names)


def test_flags_parse_into_the_config_and_the_step_config():
  fv, names = _parse(
    [
      "--variant=full_global",
      "--lam=0.5",
      "--n_train=300",
      "--prior_self_term",
      "--learning_rate=0.01",
      "--b1=0.9",
      "--ot_backend=dense",
      "--ot_coarse=accurate",
    ]
  )
  cfg = config_from_flags(ExperimentConfig, names, fv)
  assert (cfg.variant, cfg.lam, cfg.n_train, cfg.prior_self_term) == ("full_global", 0.5, 300, True)
  step = cfg.gsae()
  assert (step.lam, step.learning_rate, step.b1, step.b2) == (0.5, 0.01, 0.9, 0.999)
  assert step.ot_backend == "dense" and step.ot_coarse == "accurate" and step.prior_self_term


def test_skipped_fields_and_other_defaults():
  fv, names = _parse(["--epochs=3"], skip=("variant", "seed"), defaults={"eval_every": 7})
  assert "variant" not in names and "seed" not in names
  cfg = config_from_flags(ExperimentConfig, names, fv, variant="local", seed=4)
  assert (cfg.epochs, cfg.eval_every, cfg.variant, cfg.seed) == (3, 7, "local", 4)
  with pytest.raises(ValueError, match="no fields"):
    define_flags(ExperimentConfig, flag_values=flags.FlagValues(), skip=("bogus",))


def test_a_new_setting_is_one_field():
  @dataclasses.dataclass(frozen=True)
  class Toy:
    rate: float = dataclasses.field(default=0.5, metadata={"help": "A rate."})
    name: str | None = dataclasses.field(default=None, metadata={"help": "A name."})

  fv = flags.FlagValues()
  names = define_flags(Toy, flag_values=fv)
  fv(["prog", "--rate=2", "--name=x"])
  assert config_from_flags(Toy, names, fv) == Toy(rate=2.0, name="x")


def test_lambda_is_resolved_per_variant_in_one_place():
  for variant, lam in DEFAULT_LAMBDA.items():
    assert GSAEConfig(variant=variant).lam == lam
    assert ExperimentConfig(variant=variant).gsae().lam == lam
  assert GSAEConfig(variant="local", lam=3.0).lam == 3.0


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"b1": 1.0}, "b1"),
    ({"prior": "bogus"}, "unknown prior"),
    ({"n_test": 0}, "n_test"),
  ],
)
def test_bad_new_settings_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ExperimentConfig(**kwargs)


def test_parse_seeds_counts_or_lists():
  assert config_flags.parse_seeds(["3"]) == [0, 1, 2]
  assert config_flags.parse_seeds(["0", "7"]) == [0, 7]
  with pytest.raises(ValueError, match="must be integers"):
    config_flags.parse_seeds(["x"])
  with pytest.raises(ValueError, match="count must be positive"):
    config_flags.parse_seeds(["0"])
