"""The paper's recipe as the configs hold it (docs/recipe.md "Training schedule", "Evaluation"):
a change to any of these numbers changes what is reproduced, so it must be deliberate."""

import importlib

import pytest

from acet_tf.configs import common
from acet_tf.evaluation import settings as settings_lib
from acet_tf.ops import noise
from acet_tf.training import train_step

# dataset config -> (TFDS name, model, optimizer, learning rate, horizontal flip).
PAPER = {
  'mnist': ('mnist', 'lenet', 'adam', 1e-3, False),
  'svhn': ('svhn_cropped', 'preact_resnet', 'sgd', 0.1, False),
  'cifar10': ('cifar10', 'preact_resnet', 'sgd', 0.1, True),
  'cifar100': ('cifar100', 'preact_resnet', 'sgd', 0.1, True),
}


@pytest.mark.parametrize('name', sorted(PAPER))
@pytest.mark.parametrize('method', train_step.METHODS)
def test_paper_configs(name, method):
  dataset, model, optimizer, learning_rate, flip = PAPER[name]
  c = importlib.import_module(f'configs.{name}').get_config(method)
  assert (c.dataset, c.model, c.optimizer.name) == (dataset, model, optimizer)
  assert c.optimizer.learning_rate == learning_rate
  assert c.augment.flip is flip and c.augment.crop_padding == 4
  assert c.num_epochs == 100 and c.num_train_steps == -1 and c.batch_size == 128
  assert tuple(c.optimizer.decay_at) == (0.5, 0.75, 0.9) and c.optimizer.decay_factor == 0.1
  if optimizer == 'sgd':
    assert c.optimizer.momentum == 0.9
  assert c.weight_decay == 5e-4
  # Noise: lambda = 1 for CEDA and ACET, none for plain; the paper's p_out.
  assert c.noise.ratio == (0.0 if method == 'plain' else 1.0)
  for key, value in noise.paper_noise_config().items():
    assert c.noise[key] == value, key
  assert (c.noise.permuted_fraction, c.noise.sigma_min, c.noise.sigma_max, c.noise.kernel_size) == (
    0.5,
    1.0,
    2.5,
    15,
  )
  # ACET's inner PGD: 40 steps of 0.0075 in the eps = 0.3 ball, random start.
  assert c.pgd.steps == (40 if method == 'acet' else 0)
  assert (c.pgd.eps, c.pgd.step_size, c.pgd.random_start) == (0.3, 0.0075, True)
  # The evaluation attack on noise: 200 steps of 0.0075, eps 0.3.
  assert (c.eval.adv_noise_steps, c.eval.adv_noise_step_size, c.eval.adv_noise_eps) == (
    200,
    0.0075,
    0.3,
  )


def test_methods_have_one_home():
  assert common.METHODS is train_step.METHODS == ('plain', 'ceda', 'acet', 'oe', 'good', 'prood')


def test_runlocal_shrinks_every_paper_config_to_a_smoke_run():
  for name in PAPER:
    c = importlib.import_module(f'configs.{name}').get_config('acet,runlocal')
    assert 0 < c.num_train_steps <= 10 and c.batch_size <= 16 and c.pgd.steps <= 3
    assert c.eval.max_examples <= 64


def test_evaluation_defaults_are_the_papers_protocol():
  s = settings_lib.Settings()
  assert (s.adv_noise_steps, s.adv_noise_step_size, s.adv_noise_eps, s.adv_noise_restarts) == (
    200,
    0.0075,
    0.3,
    1,
  )
  assert s.adv_samples_steps == 80
  assert settings_lib.adv_samples_budget(s, (28, 28, 1)) == (0.3, 0.0075)
  assert settings_lib.adv_samples_budget(s, (32, 32, 3)) == (0.1, 0.0025)
  assert settings_lib.table2_examples(s) == 10_000
  assert (s.table2_threshold, s.table2_clipped_threshold) == (0.999, 0.95)
