"""OutlierAwareModel: fit runs the trainer's step (same losses and weights), refuses bad input,
saves, loads, resumes and distributes like a Keras model."""

import os
import signal
import subprocess
import sys

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import keras as acet_keras
from acet_tf import models
from acet_tf.configs import mnist5k
from acet_tf.data import input_pipeline
from acet_tf.models import prood
from acet_tf.training import train_step
from tests import support

STEPS = 3


class BatchLogs(keras.callbacks.Callback):
  """The logs after every train batch (Keras' running means over the epoch)."""

  def __init__(self):
    super().__init__()
    self.logs = []

  def on_train_batch_end(self, batch, logs=None):
    self.logs.append({k: float(v) for k, v in (logs or {}).items()})


def mnist5k_config(method):
  c = mnist5k.get_config(method)
  c.batch_size = 16
  if method == 'acet':
    c.pgd.steps = 4  # The mnist5k eps 0.3 with fewer, larger steps: a few seconds per test.
    c.pgd.step_size = 0.1
  if method == 'prood':
    # Not step_config's discriminator: the wrapper must build config.prood's, as the trainer.
    c.prood.update(disc_filters=(8, 16), disc_dense=32)
  # The Keras path draws the paper's noise only (the trainer's outlier banks are not in a model).
  c.out_data.sources, c.out_data.shares = ('noise',), (1.0,)
  return c


def mnist5k_batches(config, steps):
  info = input_pipeline.get_info('mnist5k')
  batches = list(input_pipeline.train_dataset(config, info).take(steps).as_numpy_iterator())
  return batches


def trainer_steps(config, init, batches, total_steps):
  """The trainer's compiled step, one call per batch; (per-step sums, weights after)."""
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  with strategy.scope():
    model = models.model_for_config(config, (28, 28, 1), 10)  # For prood a ProodModel.
    model.set_weights(init)
    optimizer = train_step.create_optimizer(config, total_steps=100)
    optimizer.build(model.trainable_variables)
  train = train_step.make_train_function(
    model, optimizer, config, strategy, total_steps=total_steps
  )
  dataset = tf.data.Dataset.from_generator(
    lambda: iter(batches),
    output_signature=(
      tf.TensorSpec([config.batch_size, 28, 28, 1], tf.float32),
      tf.TensorSpec([config.batch_size], tf.int32),
    ),
  )
  it = iter(strategy.experimental_distribute_dataset(dataset))
  sums = []
  for _ in batches:
    s, bad = train(it, tf.constant(1))
    assert int(bad) == -1
    sums.append({k: float(v) for k, v in s.items()})
  return sums, model.get_weights()


def running_means(sums):
  """What the trainer's window_metrics give over steps 1..k, for each k (Keras' batch logs)."""
  out, acc = [], dict.fromkeys(sums[0], 0.0)
  for k, s in enumerate(sums, 1):
    acc = {key: acc[key] + s[key] for key in acc}
    window = dict(acc, steps=k)
    out.append({n.split('/')[1]: v for n, v in train_metrics(window).items()})
  return out


def train_metrics(window):
  from acet_tf.training import trainer

  metrics = trainer.window_metrics(window, 0.0)
  del metrics['train/learning_rate']
  return metrics


@pytest.mark.parametrize('method', acet_keras.METHODS)
def test_fit_gives_the_trainers_losses_and_weights(method):
  config = mnist5k_config(method)
  batches = mnist5k_batches(config, STEPS)
  keras.utils.set_random_seed(config.seed)
  init = models.model_for_config(config, (28, 28, 1), 10).get_weights()
  # GOOD's and ProoD's ramps over 10 steps (0 until step 0.5, full at step 3): the steps below
  # are on them.
  want_sums, want_weights = trainer_steps(config, init, batches, total_steps=10)

  # For prood the model wraps the LeNet in a ProodModel itself; it then gets the trainer's
  # initial weights (classifier's, then discriminator's).
  classifier = models.create_model('lenet', (28, 28, 1), 10)
  model = acet_keras.OutlierAwareModel(classifier, config=config, total_steps=10)
  model.classifier.set_weights(init)
  model.compile(optimizer=train_step.create_optimizer(config, total_steps=100))
  images = np.concatenate([b[0] for b in batches])
  labels = np.concatenate([b[1] for b in batches])
  logs = BatchLogs()
  model.fit(images, labels, batch_size=config.batch_size, epochs=1, shuffle=False, callbacks=[logs])

  assert len(logs.logs) == STEPS
  for step, (got, want) in enumerate(zip(logs.logs, running_means(want_sums))):
    assert set(want) <= set(got), (step, sorted(got))
    for name, value in want.items():
      if name == 'images_per_second':
        continue
      assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, name)
  got_weights = model.classifier.get_weights()
  assert len(got_weights) == len(want_weights)
  for got, want in zip(got_weights, want_weights):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if method == 'prood':
    assert isinstance(model.classifier, models.ProodModel)
    assert model.classifier.classifier is classifier
  if method == 'plain':
    assert 'loss_out' not in logs.logs[-1]
  else:
    assert logs.logs[-1]['mmc_out'] > 0.1


# ----------------------------------------------------------------------------------------------
# A user's own Keras model and data.
# ----------------------------------------------------------------------------------------------


def user_classifier(head_activation=None, flatten=True):
  """A small keras.Sequential that acet_tf did not define (12x12 grey images, 3 classes)."""
  layers = [
    keras.Input((12, 12, 1)),
    keras.layers.Conv2D(8, 3, padding='same', activation='relu'),
    keras.layers.MaxPooling2D(2),
  ]
  if flatten:
    layers += [keras.layers.Flatten(), keras.layers.Dense(32, activation='relu')]
  layers.append(keras.layers.Dense(3, activation=head_activation))
  return keras.Sequential(layers)


def toy_acet(**kwargs):
  """ACET with the paper's eps and a 3-step PGD (seconds on a CPU)."""
  return acet_keras.OutlierAwareModel(
    user_classifier(), method='acet', pgd=dict(steps=3, step_size=0.1), **kwargs
  )


def test_a_user_model_trains_with_callbacks_and_gets_the_acet_effect(tmp_path):
  images, labels = support.toy_data(512, seed=0)
  val_images, val_labels = support.toy_data(128, seed=1)
  noise = acet_keras_noise(val_images)
  mmc = {}
  for method in ('plain', 'acet'):
    keras.utils.set_random_seed(0)
    model = acet_keras.OutlierAwareModel(
      user_classifier(),
      method=method,
      **({'pgd': dict(steps=3, step_size=0.1)} if method == 'acet' else {}),
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=['accuracy'])
    checkpoint = str(tmp_path / f'{method}.keras')
    history = model.fit(
      images,
      labels,
      batch_size=32,
      epochs=6,
      validation_data=(val_images, val_labels),
      verbose=0,
      callbacks=[
        keras.callbacks.ModelCheckpoint(
          checkpoint, monitor='val_loss_in', mode='min', save_best_only=True
        ),
        keras.callbacks.EarlyStopping(monitor='val_error', mode='min', patience=10, baseline=0.5),
        keras.callbacks.TensorBoard(str(tmp_path / f'logs_{method}')),
      ],
    )
    assert history.history['val_accuracy'][-1] > 0.9, history.history
    best = keras.models.load_model(checkpoint)
    assert isinstance(best, acet_keras.OutlierAwareModel) and best.method == method
    probs = tf.nn.softmax(model.classifier(noise, training=False))
    mmc[method] = float(tf.reduce_mean(tf.reduce_max(probs, axis=-1)))
  assert os.listdir(tmp_path / 'logs_acet' / 'train')
  # Uniform over 3 classes is 1/3; the plain model is confident on noise, ACET is not.
  print('MMC on noise after 6 epochs:', mmc)
  assert mmc['acet'] < 0.5 < mmc['plain'], mmc


def acet_keras_noise(images):
  """The training p_out (the paper's noise) of `images`, from the in-graph generator."""
  config = train_step.step_config('ceda')
  return train_step.image_noise(config)(images, tf.constant([5, 6], tf.int64))


def test_save_and_load_keep_the_method_the_weights_and_the_optimizer(tmp_path):
  images, labels = support.toy_data(64)
  keras.utils.set_random_seed(0)
  model = toy_acet(seed=3)
  model.compile(optimizer='adam', metrics=['accuracy'])
  model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
  path = str(tmp_path / 'acet.keras')
  model.save(path)
  loaded = keras.models.load_model(path)
  assert loaded.step_config.to_dict() == model.step_config.to_dict()
  assert loaded.step_config.seed == 3 and loaded.step_config.pgd.steps == 3
  assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
  np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
  # Both continue with the same step: same seeds, same noise, same update.
  for m in (model, loaded):
    m.fit(images, labels, batch_size=32, epochs=1, verbose=0, shuffle=False)
  for a, b in zip(model.classifier.get_weights(), loaded.classifier.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ProoD on a small discriminator and without the eps ramp (no total_steps needed).
TOY_PROOD = dict(eps=0.05, ramp_start=0, ramp_end=0, disc_filters=(4, 8), disc_dense=16)


def test_prood_saves_and_loads_with_its_method_weights_and_outputs(tmp_path):
  images, labels = support.toy_data(64)
  keras.utils.set_random_seed(0)
  model = acet_keras.OutlierAwareModel(user_classifier(), method='prood', prood=TOY_PROOD)
  model.compile(optimizer='adam')
  # validation_data runs test_step: ProoD's losses at the ramp's end (step None).
  history = model.fit(
    images, labels, batch_size=32, epochs=1, verbose=0, validation_data=(images, labels)
  )
  assert np.isfinite(history.history['val_loss_out'][0])
  path = str(tmp_path / 'prood.keras')
  model.save(path)
  loaded = keras.models.load_model(path)
  assert loaded.method == 'prood' and isinstance(loaded.classifier, models.ProodModel)
  assert loaded.step_config.to_dict() == model.step_config.to_dict()
  got, want = loaded.classifier.get_weights(), model.classifier.get_weights()
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
  # The output is the mixture's logits of the user's classifier and the discriminator.
  prood_model = model.classifier
  mixture = prood.mixture_logits(prood_model.classifier(images), prood_model.in_logit(images))
  np.testing.assert_allclose(model.predict(images, verbose=0), mixture, rtol=1e-5, atol=1e-6)


def test_prood_with_a_frozen_classifier_trains_the_discriminator_alone(tmp_path):
  images, labels = support.toy_data(64)
  keras.utils.set_random_seed(1)
  classifier = user_classifier()
  classifier.trainable = False
  before = [w.copy() for w in classifier.get_weights()]
  model = acet_keras.OutlierAwareModel(classifier, method='prood', prood=TOY_PROOD)
  disc = model.classifier.discriminator
  disc_before = [w.copy() for w in disc.get_weights()]
  model.compile(optimizer='adam')
  model.fit(images, labels, batch_size=16, epochs=1, verbose=0)
  assert int(model.optimizer.iterations) == 4
  for got, want in zip(classifier.get_weights(), before):
    np.testing.assert_array_equal(got, want)
  assert all(not np.array_equal(a, b) for a, b in zip(disc.get_weights(), disc_before))
  # A .keras file keeps it frozen: no classifier loss in loss_in, as before saving.
  path = str(tmp_path / 'frozen.keras')
  model.save(path)
  loaded = keras.models.load_model(path)
  assert not loaded.classifier.classifier.trainable
  want = model.evaluate(images, labels, batch_size=32, verbose=0, return_dict=True)
  got = loaded.evaluate(images, labels, batch_size=32, verbose=0, return_dict=True)
  assert got['loss_in'] == pytest.approx(want['loss_in'], rel=1e-6)


def test_prood_is_refused_under_a_mixed_precision_policy():
  classifier = user_classifier()
  keras.config.set_dtype_policy('mixed_float16')
  try:
    with pytest.raises(ValueError, match="global Keras dtype policy is 'mixed_float16'"):
      acet_keras.OutlierAwareModel(classifier, method='prood', prood=TOY_PROOD)
  finally:
    keras.config.set_dtype_policy('float32')


class FailAt(keras.callbacks.Callback):
  """Raises at (epoch, batch), as a crash in the middle of an epoch would."""

  def __init__(self, epoch, batch):
    super().__init__()
    self.at = (epoch, batch)
    self.epoch = 0

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if (self.epoch, batch) == self.at:
      raise RuntimeError('injected failure')


def test_backup_and_restore_resumes_after_a_failure_to_the_same_weights(tmp_path):
  images, labels = support.toy_data(96)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(32)  # No shuffle.
  keras.utils.set_random_seed(0)
  init = user_classifier().get_weights()

  def fresh():
    classifier = user_classifier()
    classifier.set_weights(init)
    model = acet_keras.OutlierAwareModel(
      classifier, method='acet', pgd=dict(steps=2, step_size=0.15)
    )
    model.compile(optimizer='adam')
    return model

  straight = fresh()
  straight.fit(dataset, epochs=3, verbose=0)

  backup = keras.callbacks.BackupAndRestore(str(tmp_path / 'backup'))
  crashed = fresh()
  with pytest.raises(RuntimeError, match='injected failure'):
    crashed.fit(dataset, epochs=3, verbose=0, callbacks=[backup, FailAt(epoch=2, batch=1)])
  resumed = fresh()  # A new process would start like this: same code, a new model.
  epochs = []
  resumed.fit(
    dataset,
    epochs=3,
    verbose=0,
    callbacks=[
      keras.callbacks.BackupAndRestore(str(tmp_path / 'backup')),
      keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epochs.append(e)),
    ],
  )
  assert epochs == [2]  # Resumed at the epoch that failed, after the last backup.
  assert int(resumed.optimizer.iterations) == int(straight.optimizer.iterations) == 9
  for a, b in zip(resumed.classifier.get_weights(), straight.classifier.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # 3-20 s (two strategies, each traced for fit and validation).
def test_two_replicas_give_the_one_device_update():
  images, labels = support.toy_data(48, seed=2)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16, drop_remainder=True)
  keras.utils.set_random_seed(1)
  init = user_classifier().get_weights()
  results = []
  for strategy in (
    tf.distribute.OneDeviceStrategy('/cpu:0'),
    tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1']),
  ):
    with strategy.scope():
      classifier = user_classifier()
      classifier.set_weights(init)
      model = acet_keras.OutlierAwareModel(
        classifier, method='acet', pgd=dict(steps=2, step_size=0.15)
      )
      model.compile(optimizer=keras.optimizers.SGD(0.05))
    history = model.fit(dataset, epochs=1, verbose=0, validation_data=dataset.take(2))
    results.append((classifier.get_weights(), history.history))
  (w1, h1), (w2, h2) = results
  # Validation (test_step: noise and PGD on its own seeds) too.
  for name in ('loss', 'loss_in', 'loss_out', 'mmc_out', 'error', 'val_loss_in', 'val_mmc_out'):
    assert h2[name][0] == pytest.approx(h1[name][0], rel=1e-5, abs=1e-6), name
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, atol=1e-5)  # Only the order of float sums differs.


# ----------------------------------------------------------------------------------------------
# Bad input, refused with a message that names it.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'make, match',
  [
    (lambda: user_classifier('softmax'), 'ends in a softmax'),
    (
      lambda: keras.Sequential([user_classifier(), keras.layers.Lambda(tf.nn.softmax)]),
      'outputs probabilities',
    ),
    (lambda: user_classifier(flatten=False), r'outputs shape \(4, 6, 6, 3\)'),
    (
      lambda: keras.Sequential([keras.Input((12,)), keras.layers.Dense(3)]),
      r'takes inputs of shape \(None, 12\)',
    ),
  ],
)
def test_a_classifier_without_logits_is_refused(make, match):
  with pytest.raises(ValueError, match=match):
    acet_keras.OutlierAwareModel(make(), method='ceda')


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(method='nope'), "Unknown method 'nope'"),
    (dict(method='good'), 'give total_steps='),
    (dict(method='prood'), r"method 'prood' ramps its eps .* give total_steps="),
    (dict(method='acet', prood=dict(eps=0.1)), "prood= sets the hyperparameters of method 'prood'"),
    (dict(method='prood', total_steps=5, prood=dict(epz=0.1)), r'Unknown prood field\(s\)'),
    (dict(method='acet', total_steps=0), 'total_steps must be >= 1'),
    (dict(method='acet', pgd=dict(stepz=3)), r"Unknown pgd field\(s\) \['stepz'\]"),
    (dict(method='acet', epsilon=0.3), "Unknown hyperparameter 'epsilon'"),
    (dict(method='ceda', pgd=dict(steps=5)), 'method ceda uses no PGD'),
    (dict(method='plain', config=train_step.step_config('acet')), "config is for 'acet'"),
    (dict(config=ml_collections.ConfigDict(dict(method='acet'))), 'The config lacks'),
  ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    acet_keras.OutlierAwareModel(user_classifier(), **kwargs)


def test_prood_refuses_a_classifier_of_unknown_input_shape():
  unbuilt = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
  with pytest.raises(ValueError, match='input shape, which is not known yet'):
    acet_keras.OutlierAwareModel(unbuilt, method='prood', prood=TOY_PROOD)


def test_a_prood_model_is_refused_for_another_method():
  with pytest.raises(ValueError, match="is a ProodModel .* train it with method='prood'"):
    acet_keras.OutlierAwareModel(support.tiny_prood(), method='ceda')


@pytest.mark.parametrize(
  'transform, error, match',
  [
    (lambda x, y: (x * 2.0, y), tf.errors.InvalidArgumentError, r'images must be in \[0, 1\]'),
    (lambda x, y: (x - 0.5, y), tf.errors.InvalidArgumentError, r'found a value below 0'),
    (lambda x, y: (x[..., 0], y), ValueError, 'got rank 3'),
    (lambda x, y: ((x * 255).astype(np.uint8), y), ValueError, 'got uint8'),
    (lambda x, y: (x, np.eye(3, dtype=np.float32)[y]), ValueError, 'one-hot labels'),
    (lambda x, y: (x, y + 3), tf.errors.InvalidArgumentError, r'class indices in \[0, 3\)'),
  ],
)
def test_bad_batches_are_refused_with_a_message_naming_them(transform, error, match):
  images, labels = transform(*support.toy_data(16))
  model = acet_keras.OutlierAwareModel(user_classifier(), method='ceda')
  model.compile(optimizer='adam')
  with pytest.raises(error, match=match):
    model.fit(images, labels, batch_size=8, epochs=1, verbose=0)


def test_compile_with_a_loss_is_refused():
  model = acet_keras.OutlierAwareModel(user_classifier(), method='plain')
  with pytest.raises(ValueError, match='compile it without loss='):
    model.compile(optimizer='adam', loss='sparse_categorical_crossentropy')


def test_a_non_finite_loss_stops_fit_naming_the_step():
  images, labels = support.toy_data(32)
  model = acet_keras.OutlierAwareModel(user_classifier(), method='plain')
  model.compile(optimizer='sgd')
  model.fit(images[:16], labels[:16], batch_size=8, epochs=1, verbose=0)  # Steps 0 and 1.
  kernel = model.classifier.layers[-1].kernel
  kernel.assign(np.full(kernel.shape, np.inf, np.float32))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'Non-finite loss or gradient at step'):
    model.fit(images, labels, batch_size=8, epochs=1, verbose=0)


@pytest.mark.slow  # Three TensorFlow processes.
def test_backup_and_restore_resumes_after_kill_9(tmp_path):
  def worker(backup, out, *kill_at):
    return subprocess.run(
      [sys.executable, '-m', 'tests.keras.backup_worker', str(backup), str(out), *kill_at],
      cwd=support.ROOT,
      capture_output=True,
      text=True,
      timeout=600,
    )

  straight = worker(tmp_path / 'b1', tmp_path / 'straight.npz')
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = worker(tmp_path / 'b2', tmp_path / 'killed.npz', '2', '1')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'killed.npz')
  resumed = worker(tmp_path / 'b2', tmp_path / 'resumed.npz')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  want, got = np.load(tmp_path / 'straight.npz'), np.load(tmp_path / 'resumed.npz')
  assert int(got['iterations']) == int(want['iterations']) == 9
  for key in want.files:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
