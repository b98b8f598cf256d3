"""A model trained with fit goes to acet_tf's evaluation (the API and the binary on a .keras file)
and to the abstaining SavedModel export."""

import contextlib
import dataclasses
import io
import json
import os

from absl import flags
from absl.testing import flagsaver
import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import evaluate as evaluate_binary
from acet_tf import keras as acet_keras
from acet_tf import models
from acet_tf.data import input_pipeline
from acet_tf.evaluation import saved_model_classifier
from acet_tf.evaluation import settings as settings_lib
from tests import support

SMALL = settings_lib.Settings(
  sets=('noise', 'adv_noise'),
  max_examples=32,
  batch_size=32,
  adv_noise_steps=3,
  adv_samples_steps=3,
)


@pytest.fixture(scope='module')
def mnist5k_model():
  """A LeNet trained 4 steps with fit (CEDA) on mnist5k, compiled."""
  keras.utils.set_random_seed(0)
  model = acet_keras.OutlierAwareModel(
    models.create_model('lenet', (28, 28, 1), 10), method='ceda', seed=4
  )
  model.compile(optimizer='adam')
  images, labels = support.digits(64)
  model.fit(images, labels, batch_size=16, epochs=1, verbose=0)
  return model


def test_evaluate_on_an_acet_tf_dataset_and_on_your_own_test_data(mnist5k_model, tmp_path):
  results = acet_keras.evaluate(
    mnist5k_model, SMALL, dataset='mnist5k', output_dir=str(tmp_path / 'eval')
  )
  assert set(results['out_sets']) == {'noise', 'adv_noise'}
  assert results['model']['source'] == 'keras_model' and results['model']['method'] == 'ceda'
  assert results['model']['step'] == 4
  assert results['settings']['seed'] == 4  # The step config's seed.
  assert os.path.exists(tmp_path / 'eval' / 'results.json')
  # The test numbers are the classifier's on the first 32 test images.
  images, labels = next(iter(input_pipeline.eval_dataset('mnist5k', 'test', 32)))
  probs = tf.nn.softmax(mnist5k_model.classifier(images, training=False)).numpy()
  assert results['test']['error'] == pytest.approx(np.mean(probs.argmax(1) != labels.numpy()))

  own = acet_keras.evaluate(mnist5k_model, SMALL, test_data=(images.numpy(), labels.numpy()))
  assert own['test']['error'] == pytest.approx(results['test']['error'])
  assert own['out_sets']['noise']['mmc'] == pytest.approx(results['out_sets']['noise']['mmc'])


def test_the_binary_evaluates_a_saved_keras_file(mnist5k_model, tmp_path):
  path = str(tmp_path / 'ceda.keras')
  mnist5k_model.save(path)
  out = tmp_path / 'eval'
  argv = [
    'evaluate',
    f'--keras_model={path}',
    '--dataset=mnist5k',
    f'--output_dir={out}',
    '--sets=noise,adv_noise',
    '--max_examples=32',
    '--batch_size=32',
    '--adv_noise_steps=3',
  ]
  printed = io.StringIO()
  with flagsaver.flagsaver(), contextlib.redirect_stdout(printed):
    flags.FLAGS(argv)
    evaluate_binary.main(argv[:1])
  results = json.loads((out / 'results.json').read_text())
  assert results['model']['source'] == 'keras_model' and results['model']['method'] == 'ceda'
  assert set(results['out_sets']) == {'noise', 'adv_noise'}
  assert (out / 'table.md').read_text() in printed.getvalue()


def test_export_of_a_classifier_in_memory_serves_its_probabilities(mnist5k_model, tmp_path):
  images, labels = support.digits(32)
  path, metadata = acet_keras.export(
    mnist5k_model,
    str(tmp_path / 'export'),
    test_data=(images, labels),
    class_names=[str(i) for i in range(10)],
    adv_noise_examples=8,
  )
  assert path.endswith('/1') and metadata['method'] == 'ceda' and metadata['step'] == 4
  assert metadata['threshold']['mode'] == 'auto' and metadata['threshold']['examples']['test'] == 32
  classifier = saved_model_classifier.SavedModelClassifier(path)
  predict_fn, _ = classifier.fns()
  want = tf.nn.softmax(mnist5k_model.classifier(images, training=False)).numpy()
  np.testing.assert_allclose(predict_fn(images).numpy(), want, atol=1e-6)
  # The threshold came from these 32 test images: 95% of the correct ones are accepted.
  served = tf.saved_model.load(path).signatures['serving_default'](images=tf.constant(images))
  correct = served['predicted_class'].numpy() == labels
  assert served['accepted'].numpy()[correct].mean() >= 0.95


def test_handoff_refuses_ambiguous_or_bad_data(mnist5k_model):
  with pytest.raises(ValueError, match='Give one of dataset='):
    acet_keras.evaluate(mnist5k_model, SMALL)
  images, labels = support.digits(8)
  with pytest.raises(ValueError, match='one-hot'):
    acet_keras.evaluate(mnist5k_model, SMALL, test_data=(images, np.eye(10)[labels]))
  with pytest.raises(ValueError, match=r'in \[0, 1\]'):
    acet_keras.export(mnist5k_model, '/nonexistent', test_data=(images * 255, labels))


def test_a_prood_model_from_fit_is_evaluated_with_prood_bounds_and_exported(tmp_path):
  keras.utils.set_random_seed(0)
  model = acet_keras.OutlierAwareModel(
    support.tiny_model(), method='prood', prood=dict(ramp_start=0, ramp_end=0)
  )
  # p(in|x) <= sigmoid(bias) everywhere: ProoD's bound certifies about 1/K on every ball, which
  # the classifier's own IBP bound (what a bare classifier would get) does not.
  model.classifier.discriminator.get_layer('disc_in_logit').bias.assign([-30.0])
  images, labels = support.toy_data(32)
  settings = dataclasses.replace(
    SMALL, sets=('noise',), attacked_sets=('adv_noise',), guaranteed=True
  )
  results = acet_keras.evaluate(model, settings, test_data=(images, labels))
  assert results['model']['method'] == 'prood' and results['model']['num_classes'] == 3
  for entry in results['attacked']['adv_noise']['guaranteed'].values():
    assert entry['mmc'] == pytest.approx(1 / 3, abs=1e-4)
  path, metadata = acet_keras.export(
    model, str(tmp_path / 'export'), test_data=(images, labels), adv_noise_examples=4
  )
  assert metadata['method'] == 'prood'
  served = tf.saved_model.load(path).signatures['serving_default'](images=tf.constant(images))
  want = tf.nn.softmax(model.classifier(images)).numpy()  # The mixture's probabilities.
  np.testing.assert_allclose(served['probabilities'], want, atol=1e-6)
