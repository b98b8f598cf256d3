"""The train binary end to end: mnist5k and mock TFDS data, resume, config errors."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from acet_tf.configs import mnist
from acet_tf.configs import mnist5k
from acet_tf.training import trainer
from tests import support

ROOT = support.ROOT


def small(config):
  config.strategy = 'one_device'
  return config


@pytest.mark.slow
@pytest.mark.parametrize('method', ['plain', 'ceda', 'acet'])
def test_mnist5k_runlocal_end_to_end(tmp_path, method):
  config = small(mnist5k.get_config(f'{method},runlocal'))
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == config.num_train_steps
  for key in ('test/error', 'test/mmc', 'noise/mmc', 'adv_noise/mmc'):
    assert 0 <= final[key] <= 1, key
  assert 0.1 <= final['test/mmc'] <= 1  # Max softmax over 10 classes is at least 1/10.
  on_disk = json.loads((tmp_path / 'final_metrics.json').read_text())
  assert on_disk['step'] == final['step']
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['method'] == method and saved['pgd']['steps'] == config.pgd.steps
  assert tf.train.latest_checkpoint(str(tmp_path / 'checkpoints')).endswith(
    f'-{config.num_train_steps}'
  )
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]
  assert events, 'no TensorBoard summaries written'
  tags = {
    v.tag
    for f in events
    for e in tf.compat.v1.train.summary_iterator(str(tmp_path / f))
    for v in e.summary.value
  }
  # Summaries are named like the keys of final_metrics.json.
  for tag in (
    'train/loss',
    'train/error',
    'train/learning_rate',
    'test/error',
    'test/mmc',
    'noise/mmc',
    'adv_noise/mmc',
    'noise/images',
    'adv_noise/images',
  ):
    assert tag in tags, tag
  if method != 'plain':
    assert 'train/loss_out' in final and 'train/mmc_out' in final


@pytest.mark.slow
def test_tfds_mock_data_end_to_end(tmp_path):
  config = small(mnist.get_config('acet,runlocal'))
  with tfds.testing.mock_data(num_examples=64):
    final = trainer.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == config.num_train_steps
  assert 0 <= final['adv_noise/mmc'] <= 1


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(tmp_path):
  config = small(mnist5k.get_config('plain,runlocal'))
  config.checkpoint_every_steps = 3

  def crash_after_step_4(step, context):
    del context
    if step == 4:
      raise KeyboardInterrupt('simulated crash between the checkpoints of steps 3 and 6')

  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(config, str(tmp_path), hooks=[crash_after_step_4])
  assert tf.train.latest_checkpoint(str(tmp_path / 'checkpoints')).endswith('-3')
  resumed_steps = []
  final = trainer.train_and_evaluate(
    config, str(tmp_path), hooks=[lambda step, _: resumed_steps.append(step)]
  )
  # Only the missing steps ran: from the step-3 checkpoint to the end, one step per call.
  assert resumed_steps == list(range(4, config.num_train_steps + 1))
  assert final['step'] == config.num_train_steps


@pytest.mark.slow
def test_hooks_see_every_call_with_the_live_model(tmp_path):
  config = small(mnist5k.get_config('plain,runlocal'))
  config.steps_per_call = 2
  seen = []
  trainer.train_and_evaluate(
    config,
    str(tmp_path),
    hooks=[
      lambda step, ctx: seen.append(
        (step, ctx.total_steps, int(ctx.optimizer.iterations.numpy()), ctx.model.name)
      )
    ],
  )
  # The optimizer has taken exactly `step` steps when the hook runs; calls stop at log/eval
  # boundaries (every 2 and 3 steps here) as well as every steps_per_call.
  assert [s for s, *_ in seen] == [2, 3, 4, 6]
  assert all(iters == step and total == 6 for step, total, iters, _ in seen)
  assert {name for *_, name in seen} == {config.model}


@pytest.mark.slow
def test_refuses_to_resume_a_run_with_other_hyperparameters(tmp_path):
  trainer.train_and_evaluate(small(mnist5k.get_config('plain,runlocal')), str(tmp_path))
  config = small(mnist5k.get_config('plain,runlocal'))
  config.weight_decay = 1e-3
  with pytest.raises(ValueError, match=r"different config \(keys \['weight_decay'\]\)"):
    trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
  'arg, message',
  [
    ('acet,runloca', 'Unknown config argument'),
    ('runlocal', 'must name a method'),
    ('acet,runlocal=maybe', 'true/false'),
  ],
)
def test_bad_config_argument_fails_clearly(arg, message):
  with pytest.raises(ValueError, match=message):
    mnist5k.get_config(arg)


def test_inconsistent_config_is_rejected():
  config = mnist5k.get_config('plain')
  config.pgd.steps = 10
  with pytest.raises(ValueError, match='plain uses no noise and no PGD'):
    trainer.validate_config(config)
  config = mnist5k.get_config('acet')
  config.pgd.steps = 0
  with pytest.raises(ValueError, match='acet needs pgd.steps'):
    trainer.validate_config(config)


@pytest.mark.slow
def test_binary_rejects_unknown_config_argument_with_a_message():
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'acet_tf.train',
      '--config=configs/mnist5k.py:acte',
      '--workdir=/tmp/never_written',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert 'Unknown config argument' in result.stderr
  assert not os.path.exists('/tmp/never_written')
