"""Batched confidence predictions, PGD over batches and the generated out-sets (noise and
adversarial noise: generated_sets, the one builder of both).

Used by the evaluator units (acet_tf/evaluation/units.py) and tools/figures.py. Everything runs
batch by batch in compiled functions; nothing loops over single images.
"""

from collections.abc import Callable
import dataclasses
import time

from absl import logging
import numpy as np
import tensorflow as tf

from acet_tf.ops import noise as noise_lib
from acet_tf.ops import pgd
from acet_tf.ops import seed_streams

# Streams of the evaluation seed, so each generated set is reproducible on its own. Evaluation
# seeds use step -1, which no training step has.
NOISE_STREAM = seed_streams.EVAL_NOISE_STREAM
ADV_NOISE_STREAM = seed_streams.EVAL_ADV_NOISE_STREAM
ADV_SAMPLES_STREAM = seed_streams.EVAL_ADV_SAMPLES_STREAM
EVAL_STEP = -1


def eval_seed(base_seed, stream):
  """The stateless seed of an evaluation set."""
  return seed_streams.step_seed(base_seed, EVAL_STEP, stream)


@dataclasses.dataclass
class Predictions:
  """Per-example results, numpy arrays of length N."""

  confidence: np.ndarray  # float32, max softmax.
  predicted: np.ndarray  # int32, argmax class.
  labels: np.ndarray  # int32 (meaningless for generated noise).


def make_predict_fn(model):
  """images float32 [B, H, W, C] in [0, 1] -> softmax probabilities float32 [B, K]."""

  @tf.function(reduce_retracing=True)
  def predict(images):
    return tf.nn.softmax(tf.cast(model(images, training=False), tf.float32))

  return predict


def predict_batches(predict_fn, batches):
  """Runs `predict_fn` over an iterable of (images, labels) batches. Returns Predictions."""
  conf, pred, labels = [], [], []
  for images, y in batches:
    probs = predict_fn(images).numpy()
    conf.append(probs.max(axis=1))
    pred.append(probs.argmax(axis=1).astype(np.int32))
    labels.append(np.asarray(y, np.int32))
  if not conf:
    raise ValueError('predict_batches got no batches: the dataset is empty.')
  return Predictions(np.concatenate(conf), np.concatenate(pred), np.concatenate(labels))


def noise_batches(source_batches, seed, noise_config):
  """Noise images made from a dataset of (images, labels) batches, one per source image.

  The permuted half permutes the pixels of the source images (evaluation uses the test set).
  Yields (noise float32 [b, H, W, C] in [0, 1], labels) with the source labels (unused).
  """
  make = tf.function(lambda x, s: noise_lib.make_noise(x, s, noise_config), reduce_retracing=True)
  for i, (images, labels) in enumerate(source_batches):
    yield make(images, tf.random.experimental.stateless_fold_in(seed, i)), labels


def attack_batches(
  model, batches, objective, *, eps, step_size, steps, seed, restarts=1, name='attack'
):
  """PGD on every batch of (images, labels); yields (adversarial images, labels).

  With restarts > 1, each restart starts from a new random point and the per-example best
  objective over restarts is kept. Logs progress with timing per batch.
  """

  @tf.function(reduce_retracing=True)
  def attack(images, labels, seed):
    best_u, best_obj = pgd.pgd(
      lambda u: model(u, training=False),
      images,
      objective,
      eps=eps,
      step_size=step_size,
      steps=steps,
      seed=seed,
      labels=labels,
    )
    for r in range(1, restarts):
      u, obj = pgd.pgd(
        lambda u: model(u, training=False),
        images,
        objective,
        eps=eps,
        step_size=step_size,
        steps=steps,
        seed=tf.random.experimental.stateless_fold_in(seed, 1000 + r),
        labels=labels,
      )
      better = obj > best_obj
      best_u = tf.where(tf.reshape(better, [-1, 1, 1, 1]), u, best_u)
      best_obj = tf.maximum(obj, best_obj)
    return best_u

  start, done = time.time(), 0
  for i, (images, labels) in enumerate(batches):
    adv = attack(images, labels, tf.random.experimental.stateless_fold_in(seed, i))
    done += int(adv.shape[0])
    seconds = time.time() - start
    logging.info(
      '%s: %d images, %d PGD steps x %d restarts, %.1f s (%.1f images/s)',
      name,
      done,
      steps,
      restarts,
      seconds,
      done / max(seconds, 1e-9),
    )
    yield adv, labels


def take_examples(batches, max_examples):
  """Yields batches until `max_examples` examples are out, cutting the last one."""
  left = max_examples
  for images, labels in batches:
    if left <= 0:
      return
    yield images[:left], labels[:left]
    left -= int(images.shape[0])


@dataclasses.dataclass(frozen=True)
class NoiseAttack:
  """The adversarial-noise attack: PGD maximising the max log-confidence (eq. 3) from noise."""

  model: Callable  # model(images, training=False) -> logits float32 [B, K].
  eps: float
  step_size: float
  steps: int
  restarts: int = 1
  num_images: int | None = None  # Attacks the first num_images noise images; None: all of them.


@dataclasses.dataclass
class GeneratedSets:
  """Noise and adversarial noise as lists of (images float32 [b, H, W, C] in [0, 1], labels)."""

  noise: list  # One per source image, with the source labels (unused).
  adv_noise: list | None  # PGD's best point per attacked noise image; None without an attack.
  seconds: dict  # {'noise', 'adv_noise' (with an attack)}: time spent making each.


def generated_sets(source_batches, seed, noise_config, attack=None, *, noise=None):
  """The evaluation's noise and adversarial noise: the one place of their seeds.

  Args:
    source_batches: (images, labels) batches that the permuted share of the noise permutes (the
      in-distribution test set; zero images when only uniform noise is made).
    seed: the base seed (int, config.seed); the noise is made with eval_seed(seed, NOISE_STREAM),
      the attack with eval_seed(seed, ADV_NOISE_STREAM), both folded in per batch.
    noise_config: the p_out settings (config.noise).
    attack: a NoiseAttack, or None for the noise alone.
    noise: noise batches made already (tools/figures attacks one noise set with several models);
      source_batches and noise_config are then not read.

  Returns:
    GeneratedSets.
  """
  start = time.time()
  if noise is None:
    noise = list(noise_batches(source_batches, eval_seed(seed, NOISE_STREAM), noise_config))
  seconds = {'noise': time.time() - start}
  adv = None
  if attack is not None:
    start = time.time()
    targets = noise if attack.num_images is None else take_examples(noise, attack.num_images)
    adv = list(
      attack_batches(
        attack.model,
        targets,
        pgd.max_log_confidence_objective,
        eps=attack.eps,
        step_size=attack.step_size,
        steps=attack.steps,
        seed=eval_seed(seed, ADV_NOISE_STREAM),
        restarts=attack.restarts,
        name='adv_noise',
      )
    )
    seconds['adv_noise'] = time.time() - start
  return GeneratedSets(noise, adv, seconds)
