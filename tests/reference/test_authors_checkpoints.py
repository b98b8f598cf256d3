"""acet_tf.import_reference: the authors' checkpoints as acet_tf runs, exact against their graph.

The logits test needs the authors' nine released ResNets in <repo>/../shared/reference_models
(github max-andr/relu_networks_overconfident, folder exps_paper/); without them it skips. The
LeNet-naming and mismatch tests write their own checkpoints with the reference's variable names.
"""

import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from acet_tf import models
from acet_tf.artifacts import runs
from acet_tf.configs import cifar10
from acet_tf.configs import cifar100
from acet_tf.configs import mnist
from acet_tf.configs import svhn
from acet_tf.exporting import exporter
from acet_tf.ops import noise as noise_lib
from acet_tf.reference import authors_checkpoints as rc
from tests import support
from tools import tf1_reference_graph

ROOT = support.ROOT
REFERENCE_DIR = os.path.join(os.path.dirname(ROOT), 'shared', 'reference_models')
NINE = [f'{d}_{m}' for d in ('svhn', 'cifar10', 'cifar100') for m in ('plain', 'ceda', 'acet')]
CONFIGS = {'svhn': svhn, 'cifar10': cifar10, 'cifar100': cifar100}
# The authors' run names (exps_paper/ of their repository, commit ce2d3a1).
RUN_NAMES = {
  'cifar10_plain': '2019-04-03 09:02:11_dataset=cifar10 model=resnet_small p_norm=inf '
  'lmbd=0.0005 at_frac=0.0 pgd_eps=0.1 pgd_niter=0 frac_perm=0.5 loss=max_conf',
  'cifar10_ceda': '2019-04-03 09:02:27_dataset=cifar10 model=resnet_small p_norm=inf '
  'lmbd=0.0005 at_frac=1.0 pgd_eps=0.1 pgd_niter=0 frac_perm=0.5 loss=max_conf',
  'svhn_acet': '2019-04-04 16:28:15_dataset=svhn model=resnet_small p_norm=inf lmbd=0.0005 '
  'at_frac=1.0 pgd_eps=0.3 pgd_niter=40 frac_perm=0.5 loss=max_conf',
  'cifar100_plain': '2019-04-03 22:56:05_dataset=cifar100 model=resnet_small p_norm=inf '
  'lmbd=0.0005 at_frac=0.0 pgd_eps=0.1 pgd_niter=0 frac_perm=0.5 '
  'loss=uniform_conf',
  'mnist_acet': '2019-04-03 23:07:48_dataset=mnist model=lenet p_norm=inf lmbd=0.0005 '
  'at_frac=1.0 pgd_eps=0.3 pgd_niter=40 frac_perm=0.5 loss=max_conf',
}
needs_reference = pytest.mark.skipif(
  not os.path.isdir(REFERENCE_DIR),
  reason=f"the authors' checkpoints are not in {REFERENCE_DIR} (get them from github "
  'max-andr/relu_networks_overconfident, folder exps_paper/, as ../shared/README.md says)',
)


# ------------------------------------------------------------------------------------------------
# Run names.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('key', sorted(RUN_NAMES))
def test_parse_run_name(key):
  dataset, method = key.rsplit('_', 1)
  parsed = rc.parse_run_name(RUN_NAMES[key])
  assert parsed['method'] == method
  assert parsed['dataset'] == {'svhn': 'svhn_cropped'}.get(dataset, dataset)
  assert parsed['model'] == ('lenet' if dataset == 'mnist' else 'preact_resnet')
  assert parsed['fields']['lmbd'] == '0.0005'


def test_parse_run_name_refuses_other_names():
  with pytest.raises(ValueError, match='no at_frac=, pgd_niter='):
    rc.parse_run_name('2019_dataset=cifar10 model=resnet_small')
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
    rc.parse_run_name('2019-01-01 00:00:00_dataset=imagenet model=lenet at_frac=0.0 pgd_niter=0')


def test_resolve_from_the_authors_layout_and_conflicts():
  run = RUN_NAMES['svhn_acet']
  path = f'/data/exps_paper/{run}/models/{run}-100'
  assert rc.run_name_of(path) == run
  assert rc.resolve(path) == ('svhn_cropped', 'acet', run)
  assert rc.resolve(path, dataset='svhn', method='acet') == ('svhn_cropped', 'acet', run)
  with pytest.raises(ValueError, match='--method=plain but the run name'):
    rc.resolve(path, method='plain')
  assert rc.run_name_of('/work/shared/reference_models/svhn_acet/model-100') is None
  with pytest.raises(ValueError, match='pass --dataset and --method'):
    rc.resolve('/work/shared/reference_models/svhn_acet/model-100', dataset='svhn')
  assert rc.resolve('/x/model-100', dataset='cifar10', method='ceda') == ('cifar10', 'ceda', None)


# ------------------------------------------------------------------------------------------------
# LeNet naming and mismatches, on checkpoints written here with the reference's names.
# ------------------------------------------------------------------------------------------------


def reference_lenet_weights(num_classes=10, seed=0):
  """{reference name: array} of a LeNet for 28x28x1 as the reference's models.LeNet names them."""
  rng = np.random.default_rng(seed)
  shapes = {
    'conv1/conv1/weights': (5, 5, 1, 32),
    'conv1/conv1/biases': (32,),
    'conv2/conv2/weights': (5, 5, 32, 64),
    'conv2/conv2/biases': (64,),
    'fc1/weights': (7 * 7 * 64, 1024),
    'fc1/biases': (1024,),
    'fc2/weights': (1024, num_classes),
    'fc2/biases': (num_classes,),
  }
  return {
    k: (rng.normal(size=s) * (0.5 if len(s) == 1 else np.sqrt(2 / np.prod(s[:-1])))).astype(
      np.float32
    )
    for k, s in shapes.items()
  }


def write_tf1_checkpoint(prefix, tensors):
  """A checkpoint with exactly these variable names (as TF 1's Saver writes them)."""
  names = sorted(tensors)
  tf.raw_ops.SaveV2(
    prefix=prefix,
    tensor_names=names,
    shape_and_slices=[''] * len(names),
    tensors=[tf.constant(tensors[n]) for n in names],
  )


def lenet_forward(w, x):
  """The reference's LeNet in plain TF ops: conv SAME + ReLU, max-pool 2 SAME, twice; dense."""
  for i in (1, 2):
    x = tf.nn.relu(
      tf.nn.conv2d(x, w[f'conv{i}/conv{i}/weights'], 1, 'SAME') + w[f'conv{i}/conv{i}/biases']
    )
    x = tf.nn.max_pool2d(x, 2, 2, 'SAME')
  x = tf.reshape(x, [tf.shape(x)[0], -1])
  x = tf.nn.relu(x @ w['fc1/weights'] + w['fc1/biases'])
  return x @ w['fc2/weights'] + w['fc2/biases']


def test_lenet_naming_imports_exactly(tmp_path):
  weights = reference_lenet_weights()
  counters = {
    'Variable': np.int32(1234),
    'beta1_power': np.float32(0.9),
    'beta2_power': np.float32(0.99),
  }
  slots = {f'{k}/Adam': np.zeros_like(v) for k, v in weights.items()}
  slots.update({f'{k}/Adam_1': np.zeros_like(v) for k, v in weights.items()})
  prefix = str(tmp_path / 'ckpt' / 'model-100')
  write_tf1_checkpoint(prefix, {**weights, **counters, **slots})
  workdir = str(tmp_path / 'run')
  config = mnist.get_config('acet')
  _, step, path = rc.import_checkpoint(prefix, workdir, config, run_name='made here')
  assert step == 1234 and path.endswith('ckpt-1234')
  assert tf.train.latest_checkpoint(runs.checkpoint_dir(workdir)) == path

  model, saved_config, info, restored_step = runs.restore_model(workdir)
  assert restored_step == 1234 and saved_config.method == 'acet' and info.num_classes == 10
  x = np.random.default_rng(1).uniform(size=(4, 28, 28, 1)).astype(np.float32)
  want = lenet_forward(weights, x).numpy()
  np.testing.assert_allclose(
    model(x, training=False).numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
  )
  source = runs.read_json(workdir, runs.SOURCE)
  assert source['run_name'] == 'made here' and source['architecture'] == 'lenet'
  assert source['weights_sha256'] == rc.weights_sha256(weights)
  assert source['skipped'] == {'counters': sorted(counters), 'optimizer_slots': len(slots)}
  assert source['num_variables'] == len(weights)
  # A changed weight changes the hash.
  changed = dict(weights, **{'fc2/biases': weights['fc2/biases'] + 1})
  assert rc.weights_sha256(changed) != source['weights_sha256']


@pytest.mark.parametrize(
  'edit, expected',
  [
    (lambda w: w.pop('fc2/biases'), r'missing: fc2/biases \(model logits/bias, shape \(10,\)\)'),
    (
      lambda w: w.update({'conv3/conv3/weights': np.zeros((5, 5, 64, 64), np.float32)}),
      r'extra: conv3/conv3/weights \(checkpoint shape \(5, 5, 64, 64\)\)',
    ),
    (
      lambda w: w.update({'fc2/weights': np.zeros((1024, 5), np.float32)}),
      r'shape: fc2/weights has shape \(1024, 5\) in the checkpoint, the model \(logits/kernel\) '
      r'expects \(1024, 10\)',
    ),
  ],
)
def test_mismatch_names_the_variable_and_writes_nothing(tmp_path, edit, expected):
  weights = reference_lenet_weights()
  edit(weights)
  prefix = str(tmp_path / 'model-100')
  write_tf1_checkpoint(prefix, weights)
  workdir = tmp_path / 'run'
  with pytest.raises(rc.MismatchError, match=expected):
    rc.import_checkpoint(prefix, str(workdir), mnist.get_config('plain'))
  assert not workdir.exists()


def test_unknown_architecture_and_wrong_model(tmp_path):
  prefix = str(tmp_path / 'model-1')
  write_tf1_checkpoint(prefix, {'dense/kernel': np.zeros((3, 2), np.float32)})
  with pytest.raises(ValueError, match=r'Unknown architecture.*dense/kernel'):
    rc.import_checkpoint(prefix, str(tmp_path / 'a'), mnist.get_config('plain'))
  write_tf1_checkpoint(prefix, reference_lenet_weights())
  with pytest.raises(
    rc.MismatchError,
    match=r"reference's lenet .* config.model is "
    "'preact_resnet'",
  ):
    rc.import_checkpoint(prefix, str(tmp_path / 'b'), cifar10.get_config('plain'))
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_resnet_with_layers_the_reference_lacks_is_refused():
  model = models.preact_resnet((32, 32, 3), 10, shortcut='conv')
  with pytest.raises(rc.MismatchError, match=r'stage2_unit1_shortcut \(kernel \(1, 1, 16, 32\)\)'):
    rc.reference_names(model, 'resnet_small')


def test_resnet_names_cover_the_reference_layout():
  table = rc.reference_names(models.preact_resnet((32, 32, 3), 10), 'resnet_small')
  assert len(table) == 97  # The released checkpoints' model weights.
  assert table['block_2_0/shared_activation/batch_normalization/gamma'].shape == (16,)
  assert table['block_3_2/residual_only_activation/batch_normalization/moving_variance'].path == (
    'stage3_unit3_bn1/moving_variance'
  )
  assert table['logit/fc/biases'].path == 'logits/bias'


def test_import_refuses_an_existing_run(tmp_path):
  prefix = str(tmp_path / 'model-100')
  write_tf1_checkpoint(prefix, reference_lenet_weights())
  rc.import_checkpoint(prefix, str(tmp_path / 'run'), mnist.get_config('plain'))
  with pytest.raises(FileExistsError, match='already holds a run'):
    rc.import_checkpoint(prefix, str(tmp_path / 'run'), mnist.get_config('plain'))


@pytest.mark.slow
def test_binary_infers_dataset_and_method_from_the_authors_layout(tmp_path):
  run = RUN_NAMES['mnist_acet']
  prefix = tmp_path / run / 'models' / f'{run}-100'
  prefix.parent.mkdir(parents=True)
  write_tf1_checkpoint(str(prefix), reference_lenet_weights())
  workdir = tmp_path / 'imported'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'acet_tf.import_reference',
      f'--checkpoint={prefix}',
      f'--workdir={workdir}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads((workdir / 'config.json').read_text())
  assert (config['dataset'], config['method'], config['model']) == ('mnist', 'acet', 'lenet')
  assert config == json.loads(mnist.get_config('acet').to_json())
  source = json.loads((workdir / 'source.json').read_text())
  assert source['run_name'] == run and source['config_source'] == 'configs/mnist.py:acet'


# ------------------------------------------------------------------------------------------------
# The nine released ResNets against the authors' own graph.
# ------------------------------------------------------------------------------------------------


def probe_images(seed=0, n=6):
  """Uniform noise, the same scaled by 50 (far from the data), permuted and blurred images."""
  rng = np.random.default_rng(seed)
  uniform = rng.uniform(size=(n, 32, 32, 3)).astype(np.float32)
  ramps = np.broadcast_to(
    np.linspace(0, 1, 32, dtype=np.float32)[None, :, None, None], (n, 32, 32, 3)
  ) * rng.uniform(0.2, 1.0, size=(n, 1, 1, 3))
  blurred = noise_lib.make_noise(
    ramps.astype(np.float32), tf.constant([seed, 1]), _NoiseConfig()
  ).numpy()
  return {'uniform': uniform, 'uniform x 50': 50 * uniform, 'permuted+blurred': blurred}


class _NoiseConfig:
  permuted_fraction = 1.0  # Every image a pixel permutation, then the paper's blur.
  sigma_min, sigma_max, kernel_size = 1.0, 2.5, 15


@pytest.mark.slow
@needs_reference
@pytest.mark.parametrize('name', NINE)
def test_imported_logits_equal_the_authors_graph(tmp_path, name):
  dataset, method = name.split('_')
  checkpoint = os.path.join(REFERENCE_DIR, name, 'model-100')
  workdir = str(tmp_path / name)
  rc.import_checkpoint(checkpoint, workdir, CONFIGS[dataset].get_config(method))
  model, _, info, _ = runs.restore_model(workdir)
  graph = tf1_reference_graph.ReferenceGraph(checkpoint)
  try:
    for kind, images in probe_images().items():
      want = graph.logits(images)
      got = model(images, training=False).numpy()
      assert got.shape == want.shape == (len(images), info.num_classes)
      # Relative in the Frobenius norm over the batch: the ACET/CEDA models give logits near
      # 1e-4 on noise, as differences of far larger terms, so an entrywise ratio measures float32
      # cancellation, not the import.
      relative = np.linalg.norm(got - want) / np.linalg.norm(want)
      assert relative <= 1e-4, f'{name} on {kind}: relative difference {relative:.2e}'
  finally:
    graph.close()


# ------------------------------------------------------------------------------------------------
# Export and serve without the dataset.
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_reference
def test_imported_cifar10_acet_exports_and_serves_without_its_data(tmp_path):
  checkpoint = os.path.join(REFERENCE_DIR, 'cifar10_acet', 'model-100')
  workdir, export_dir = str(tmp_path / 'run'), str(tmp_path / 'export')
  rc.import_checkpoint(checkpoint, workdir, cifar10.get_config('acet'))
  model, _, info, _ = runs.restore_model(workdir)
  if info.has_data:
    pytest.skip('cifar10 is on this machine: this test is about the data-free export.')
  with pytest.raises(ValueError, match='--threshold=auto calibrates on the cifar10 test split'):
    exporter.export_model(workdir, export_dir, threshold='auto')
  path, metadata = exporter.export_model(
    workdir, export_dir, threshold=0.5, num_examples=8, adv_noise_examples=2
  )
  assert metadata['threshold']['value'] == 0.5
  assert set(metadata['threshold']['accept_rates']) == {'noise', 'adv_noise'}
  assert set(metadata['threshold']['not_measured']) == {'test', 'noise'}
  assert metadata['class_names'][:2] == ['airplane', 'automobile']

  proc, url = support.start_server(export_dir, 'cifar10_acet', tmp_path / 'server.txt')
  try:
    images = np.random.default_rng(3).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    request = urllib.request.Request(
      f'{url}/v1/models/cifar10_acet:predict',
      data=json.dumps({'instances': images.tolist()}).encode(),
    )
    with urllib.request.urlopen(request, timeout=120) as response:
      rows = json.load(response)['predictions']
  finally:
    proc.kill()
    proc.wait()
  probs = tf.nn.softmax(model(images, training=False)).numpy()
  assert [r['predicted_class'] for r in rows] == probs.argmax(axis=1).tolist()
  np.testing.assert_allclose([r['confidence'] for r in rows], probs.max(axis=1), atol=1e-5)
  # ACET's answer on uniform noise: close to uniform over the 10 classes, so it abstains.
  assert all(r['confidence'] < 0.5 and r['accepted'] is False for r in rows)
