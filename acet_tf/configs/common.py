"""Shared pieces of the experiment configs: the typed argument parser and the base config.

Every config file exposes `get_config(arg)`. `arg` is a comma-separated list: the method (one of
train_step.METHODS) and small typed options such as `runlocal`. Unknown words are an error.
"""

import ml_collections

from acet_tf.training import train_step

METHODS = train_step.METHODS


def parse_arg(arg, **defaults):
  """Parses 'acet,runlocal,epochs=3' against typed defaults; refuses unknown keys.

  Args:
    arg: the string after ':' in `--config=configs/x.py:arg` (may be None or empty).
    **defaults: every accepted option with its default; the default's type is the option's type.
      `method` is always accepted and must be one of METHODS.

  Returns:
    An ml_collections.ConfigDict with `method` and every option.
  """
  parsed = dict(method=None, **defaults)
  for word in (arg or '').split(','):
    word = word.strip()
    if not word:
      continue
    if word in METHODS:
      parsed['method'] = word
      continue
    key, has_value, value = word.partition('=')
    if key not in defaults:
      accepted = ', '.join(list(METHODS) + sorted(defaults))
      raise ValueError(f'Unknown config argument {word!r}; accepted: {accepted}.')
    kind = type(defaults[key])
    if kind is bool:
      if has_value and value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'Config argument {key!r} takes true/false, got {value!r}.')
      parsed[key] = (not has_value) or value.lower() in ('true', '1')
    elif not has_value:
      raise ValueError(f'Config argument {key!r} needs a value: {key}=...')
    else:
      try:
        parsed[key] = kind(value)
      except ValueError as e:
        raise ValueError(f'Config argument {key!r} expects {kind.__name__}, got {value!r}.') from e
  if parsed['method'] is None:
    raise ValueError(f'The config argument must name a method, one of {METHODS}; got {arg!r}.')
  return ml_collections.ConfigDict(parsed)


def base_config(method):
  """The paper's recipe (docs/recipe.md) for `method`; dataset files fill in and override.

  Every hyperparameter the code reads lives here, so `--config.x.y=...` can change it.
  """
  step = train_step.step_config(method)  # What the step reads; refuses an unknown method.
  c = ml_collections.ConfigDict()
  c.method = method
  c.dataset = ''  # 'mnist5k', a TFDS name ('mnist', 'svhn_cropped', 'cifar10', 'cifar100'),
  # 'folder:PATH' (one sub-folder of images per class) or 'npz:PATH' (x_train, y_train, ...).
  c.data_dir = ''  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets).
  # Your own data (c.dataset = 'folder:PATH' or 'npz:PATH', acet_tf/data/custom_data.py); the TFDS
  # datasets and mnist5k need these at their defaults.
  c.image_size = 0  # S > 0 resizes every image to S x S; 0 keeps the size (must be one size).
  c.channels = 0  # 1 (grey) or 3 (RGB); 0: 1 if every image is grey, else 3.
  c.test_fraction = 0.2  # Share of each class held out as test split (folders without test/).
  c.model = ''  # 'lenet', 'preact_resnet' (the reference's small ResNet), 'resnet18', or your
  # own 'package.module:factory', factory(input_shape, num_classes) -> keras.Model of logits.
  c.seed = step.seed

  c.batch_size = (
    128  # Global number of clean images per step; as many noise images again (lambda=1).
  )
  c.num_epochs = 100
  c.num_train_steps = -1  # > 0 overrides num_epochs (smoke runs, benchmarks).
  c.shuffle_buffer = 10_000

  c.augment = ml_collections.ConfigDict()
  c.augment.crop_padding = 4  # Random crop after zero padding, every dataset.
  c.augment.flip = False  # Horizontal flip: CIFAR only.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'  # 'sgd' (with momentum) or 'adam'.
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.decay_at = (0.5, 0.75, 0.9)  # Fractions of training where the rate is divided.
  c.optimizer.decay_factor = 0.1
  c.weight_decay = step.weight_decay  # Times the sum of squares of the decayed variables.
  # Which variables: 'reference' = every variable of the convolution and dense layers, kernels and
  # biases (the reference decays names containing 'weight', 'fc' or 'conv': all LeNet biases and
  # the ResNet's final dense bias; no batch-norm parameters); 'kernels' = kernels only.
  c.weight_decay_variables = step.weight_decay_variables

  # p_out: noise images (docs/recipe.md "The out-distribution").
  # permuted_fraction: share built by permuting the pixels of training images; then a Gaussian
  # blur with sigma ~ U[sigma_min, sigma_max] and a kernel_size x kernel_size kernel.
  c.noise = step.noise
  # lambda = c.noise.ratio: noise images per clean image, in (0, 1] (0 for plain).
  # Where the out images come from (data/outlier_data.py): 'noise' (the paper's, above),
  # 'photos' (crops of scikit-image pictures not in the 'photos' evaluation set), a TFDS name,
  # 'folder:PATH' or 'npz:PATH'; shares: the part of each step's out-batch from each source.
  c.out_data = ml_collections.ConfigDict()
  c.out_data.sources = ('noise',)
  c.out_data.shares = (1.0,)
  c.out_data.num_photos = 20_000  # Crops drawn once (from config.seed) when 'photos' is a source.

  # ACET's inner maximisation of the max log-confidence around each noise image: pgd.steps (0
  # unless acet), eps, step_size, random_start.
  c.pgd = step.pgd

  if method == 'good':
    c.good = step.good  # GOOD_Q's eps, q, weight and ramp (train_step.step_config).
  if method == 'prood':
    c.prood = step.prood  # ProoD's eps, weight, ramp and discriminator (train_step.step_config).
    # '' trains the classifier (config.model) jointly with plain cross-entropy; a run directory
    # (runs/mnist5k_plain, an imported authors' model) takes its classifier, frozen.
    c.classifier_workdir = ''

  # Evaluation during and at the end of training (the full Table 1 is acet_tf.evaluate).
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 1000
  c.eval.batch_size = 500
  c.eval.max_examples = 10_000  # Caps the test set and the generated noise sets.
  c.eval.adv_noise_steps = 200  # The paper's evaluation attack on noise: 200 x 0.0075, eps 0.3.
  c.eval.adv_noise_eps = 0.3
  c.eval.adv_noise_step_size = 0.0075
  c.eval.adv_noise_examples = 1000  # Attacked noise images per evaluation.

  c.strategy = 'auto'  # 'auto', 'one_device', 'mirrored', 'multi_worker' or 'tpu'.
  c.tpu_address = ''
  c.jit_compile = step.jit_compile  # XLA for the whole step: for GPUs; slower on CPU here.
  c.mixed_precision = ''  # '', 'mixed_float16' or 'mixed_bfloat16' (GPU/TPU).
  c.steps_per_call = 1  # Train steps per tf.function call (hides dispatch on accelerators).

  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.max_checkpoints = 3
  c.num_summary_images = 8
  return c


def resnet_config(arg, dataset, flip):
  """The paper's SVHN/CIFAR recipe: a ResNet with SGD+momentum 0.1 (base_config's defaults).

  `arg` accepts the method, `runlocal` and `model=resnet18` (default: the reference's small
  pre-activation ResNet). `flip` turns on the horizontal flip (CIFAR only).
  """
  a = parse_arg(arg, runlocal=False, model='preact_resnet')
  c = base_config(a.method)
  c.dataset = dataset
  c.model = a.model
  c.augment.flip = flip
  if a.runlocal:
    runlocal(c)
  return c


def runlocal(c):
  """Shrinks `c` in place to a smoke run of seconds on a CPU."""
  c.num_train_steps = 6
  c.batch_size = 16
  c.shuffle_buffer = 256
  c.pgd.steps = min(c.pgd.steps, 3)
  c.eval.every_steps = 3
  c.eval.batch_size = 64
  c.eval.max_examples = 64
  c.eval.adv_noise_steps = 5
  c.eval.adv_noise_examples = 16
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.num_summary_images = 2
  return c
