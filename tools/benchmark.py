"""Times the project's compiled train step and its PGD attack on synthetic data.

  python -m tools.benchmark --model=lenet --method=plain,ceda,acet --batch=128 --pgd_steps=40

Prints one JSON line per case: `train_step` lines (median step time, clean images/s, peak RSS) for
each model x method, then, unless --noattack, an `attack` line per model with PGD alone (images
attacked/s for the training attack and for evaluation's 200-step attack) and Table 2's alpha
search, each over the time of the passes it needs (`*_over_passes`, 1.0 = no overhead beyond
them; see time_attack).

The step timed is `train_step.make_train_function` itself, not a copy. Times are medians over
--reps repetitions after --warmup calls (the first call traces and compiles); each repetition runs
calls for at least --min_rep_s seconds. `peak_rss_mb` is the process's peak so far: run one case
per process to read it for that case alone.

With --keras_fit, each model x method case instead times acet_tf.keras.OutlierAwareModel.fit
beside the trainer's step on the same config, model and batch, in the same process and
alternating: each repetition runs --fit_steps trainer steps (one per call, as the trainer with
steps_per_call=1), one fit call of --fit_steps steps and one of a single step. One `keras_fit`
line per case (time_keras_fit): ms per step of each, wall and process CPU, fit's per-call set-up,
and the per-repetition ratios fit / trainer as [median, min, max].

With --profile, each train_step case is instead profiled (tf.profiler, --reps calls after the
warm-up) and printed as one `profile` line per op type (ms per step, share of all op time, ops per
step), largest first: where the step's time goes. Op time sums ops that ran concurrently, so it
can exceed the wall time.
"""

import collections
import glob
import json
import os
import resource
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import keras
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from acet_tf import cpu_backend
from acet_tf import keras as acet_keras
from acet_tf import models
from acet_tf.configs import common
from acet_tf.evaluation import alpha_search
from acet_tf.ops import noise as noise_lib
from acet_tf.ops import pgd
from acet_tf.training import train_step

_MODEL = flags.DEFINE_list('model', ['lenet'], 'Models: lenet, preact_resnet, resnet18.')
_METHOD = flags.DEFINE_list('method', ['plain', 'ceda', 'acet'], 'Any of train_step.METHODS.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Global clean images per step (as many noise again).')
_PGD_STEPS = flags.DEFINE_integer('pgd_steps', 40, 'PGD steps of the ACET step and attack line.')
_EVAL_PGD_STEPS = flags.DEFINE_integer(
  'eval_pgd_steps', 200, "Steps of evaluation's attack (0: skip that line)."
)
_JIT = flags.DEFINE_bool('jit', False, 'config.jit_compile: XLA for the step and the attack.')
_MIXED = flags.DEFINE_enum(
  'mixed_precision', '', ['', 'mixed_float16', 'mixed_bfloat16'], 'config.mixed_precision.'
)
_STEPS_PER_CALL = flags.DEFINE_integer('steps_per_call', 1, 'Train steps per tf.function call.')
_REPLICAS = flags.DEFINE_integer('replicas', 1, 'Logical CPU devices; > 1 uses MirroredStrategy.')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed repetitions (the median is reported).')
_MIN_REP_S = flags.DEFINE_float('min_rep_s', 1.0, 'Minimum seconds of one repetition.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls first (tracing, compilation, caches).')
_ATTACK = flags.DEFINE_bool('attack', True, 'Also time PGD alone (one line per model).')
_TABLE2 = flags.DEFINE_bool('table2', True, "With the attack line, also time Table 2's search.")
_INTRA = flags.DEFINE_integer('intra_op_threads', 0, 'TF intra-op threads (0: TF default).')
_INTER = flags.DEFINE_integer('inter_op_threads', 0, 'TF inter-op threads (0: TF default).')
_PGD_PASS = flags.DEFINE_string(
  'pgd_pass',
  'auto',
  "PGD's CPU pass: 'auto' (chosen from the kernel library), 'tape', or features joined by '+' "
  f'from {"/".join(pgd.CPU_PASS_FEATURES)} (pgd.force_cpu_pass).',
)
_KERAS_FIT = flags.DEFINE_bool(
  'keras_fit', False, "Time OutlierAwareModel.fit beside the trainer's step (keras_fit lines)."
)
_FIT_STEPS = flags.DEFINE_integer('fit_steps', 20, 'Steps per repetition with --keras_fit.')
_PROFILE = flags.DEFINE_integer(
  'profile', 0, 'Instead of timing: op time by op type of each step case, this many op types.'
)

MODEL_INPUTS = {'lenet': (28, 28, 1), 'preact_resnet': (32, 32, 3), 'resnet18': (32, 32, 3)}
NUM_CLASSES = 10


def setup_devices(replicas, intra_op_threads=0, inter_op_threads=0):
  """Splits the CPU into `replicas` logical devices and sets thread pools. Call before any
  tensor."""
  if replicas < 1:
    raise ValueError(f'replicas must be >= 1, got {replicas}')
  if replicas > 1:
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
    )
  if intra_op_threads:
    tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
  if inter_op_threads:
    tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)


def create_strategy(replicas):
  """OneDeviceStrategy, or MirroredStrategy over the logical CPUs (one per process)."""
  cpus = [d.name for d in tf.config.list_logical_devices('CPU')]
  if len(cpus) < replicas:
    raise ValueError(
      f'{replicas} replicas asked but {len(cpus)} logical CPUs exist: call '
      'setup_devices before creating any tensor.'
    )
  if replicas == 1:
    return tf.distribute.OneDeviceStrategy(cpus[0])
  # ReductionToOneDevice: no collective keys that a second strategy could collide with.
  return tf.distribute.MirroredStrategy(
    cpus[:replicas], cross_device_ops=tf.distribute.ReductionToOneDevice()
  )


def benchmark_config(
  model, method, batch, pgd_steps, jit=False, mixed_precision='', steps_per_call=1
):
  """The paper's recipe for `method` (configs/common.py) with the benchmark's sizes."""
  if model not in MODEL_INPUTS:
    raise ValueError(f'Unknown model {model!r}; choose from {sorted(MODEL_INPUTS)}.')
  if batch < 1 or steps_per_call < 1:
    raise ValueError(f'batch and steps_per_call must be >= 1, got {batch}, {steps_per_call}')
  c = common.base_config(method)
  c.model = model
  c.batch_size = batch
  if method == 'acet':
    if pgd_steps < 1:
      raise ValueError(f'acet needs pgd_steps >= 1, got {pgd_steps}')
    c.pgd.steps = pgd_steps
    c.pgd.step_size = c.pgd.eps / pgd_steps  # The reference's step = eps / steps.
  # SGD with momentum (the config's default) at the peer's rate; small enough to stay finite on
  # the synthetic data.
  c.optimizer.learning_rate = 0.01
  c.jit_compile = jit
  c.mixed_precision = mixed_precision
  c.steps_per_call = steps_per_call
  return c


def _median_seconds(fn, reps, min_rep_s, warmup, calls_per_unit=1):
  """Times `fn()`, which does `calls_per_unit` units of work.

  Returns (median wall seconds per unit, median process CPU seconds per unit, warm-up seconds).
  CPU time (all threads) is less sensitive than wall time to other processes on the machine.
  """
  t0 = time.perf_counter()
  for _ in range(warmup):
    fn()
  warm = time.perf_counter() - t0
  walls, cpus = [], []
  for _ in range(reps):
    n, t, c = 0, time.perf_counter(), time.process_time()
    while True:
      fn()
      n += 1
      if time.perf_counter() - t >= min_rep_s:
        break
    walls.append((time.perf_counter() - t) / (n * calls_per_unit))
    cpus.append((time.process_time() - c) / (n * calls_per_unit))
  return statistics.median(walls), statistics.median(cpus), warm


def peak_rss_mb():
  """The process's peak resident set size so far, MB (Linux reports KB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return round(peak / (2**20 if sys.platform == 'darwin' else 2**10))


_RESIDENT_FIELDS = {'RssAnon': 'rss_anon_mb', 'RssFile': 'rss_file_mb'}  # /proc/self/status.


def resident_split_mb():
  """{'rss_anon_mb', 'rss_file_mb'} now (Linux; {} elsewhere): the process's own memory vs the
  pages of mapped files, mostly TensorFlow's shared libraries (shared and reclaimable)."""
  try:
    with open('/proc/self/status') as f:
      lines = [line.split(':', 1) for line in f]
  except OSError:
    return {}
  return {
    _RESIDENT_FIELDS[key]: round(int(value.split()[0]) / 1024)  # Reported in kB.
    for key, value in lines
    if key in _RESIDENT_FIELDS
  }


def _environment():
  """What the figures depend on besides the case: the CPU, its kernels, versions, threads."""
  return dict(
    cpu=cpu_backend.cpu_model(),
    cpu_vector=cpu_backend.vector_extensions(),
    onednn=cpu_backend.onednn_enabled(),
    # Where set, oneDNN's own cap on the instructions its kernels use (e.g. AVX2).
    onednn_max_isa=os.environ.get('ONEDNN_MAX_CPU_ISA', ''),
    pgd_cpu_pass='+'.join(sorted(pgd.cpu_pass_features())) or 'tape',
    tf=tf.__version__,
    keras=keras.__version__,
    intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
    inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
  )


def build(config, strategy, total_steps=10**6):
  """Model and optimizer as the trainer makes them (inside the strategy's scope)."""
  keras.mixed_precision.set_global_policy(config.mixed_precision or 'float32')
  with strategy.scope():
    # The trainer's model of the method (a ProodModel for prood).
    model = models.model_for_config(config, MODEL_INPUTS[config.model], NUM_CLASSES)
    optimizer = train_step.create_optimizer(config, total_steps)
    optimizer.build(model.trainable_variables)
  return model, optimizer


def synthetic_batch(config, seed=0):
  """(images float32 [B, H, W, C] in [0, 1], labels int32 [B]) for config.model."""
  shape = MODEL_INPUTS[config.model]
  images = tf.random.stateless_uniform([config.batch_size, *shape], seed=[seed, 1])
  labels = tf.random.stateless_uniform(
    [config.batch_size], seed=[seed, 2], maxval=NUM_CLASSES, dtype=tf.int32
  )
  return images, labels


def train_call(config, strategy):
  """(fn() running config.steps_per_call steps of train_step.make_train_function, optimizer)."""
  model, optimizer = build(config, strategy)
  # One fixed batch: the timing is the step's, not the input pipeline's.
  dataset = tf.data.Dataset.from_tensors(synthetic_batch(config)).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  train_steps = train_step.make_train_function(model, optimizer, config, strategy)
  num = tf.constant(config.steps_per_call)

  def call():
    sums, bad = train_steps(iterator, num)
    if int(bad) >= 0:
      raise FloatingPointError(f'non-finite loss at step {int(bad)} of the benchmark')
    return sums

  return call, optimizer


def time_train_step(config, strategy, reps=5, min_rep_s=1.0, warmup=2):
  """Times train_step.make_train_function on one synthetic batch, repeated. Returns a dict."""
  call, optimizer = train_call(config, strategy)
  seconds, cpu_seconds, warm = _median_seconds(call, reps, min_rep_s, warmup, config.steps_per_call)
  return dict(
    case='train_step',
    model=config.model,
    method=config.method,
    batch=config.batch_size,
    replicas=strategy.num_replicas_in_sync,
    pgd_steps=config.pgd.steps,
    jit=config.jit_compile,
    mixed_precision=config.mixed_precision,
    steps_per_call=config.steps_per_call,
    warmup_s=round(warm, 2),
    median_step_ms=round(seconds * 1e3, 1),
    clean_img_per_s=round(config.batch_size / seconds, 2),
    cpu_ms_per_step=round(cpu_seconds * 1e3, 1),
    steps_run=int(optimizer.iterations.numpy()),
    peak_rss_mb=peak_rss_mb(),
    **resident_split_mb(),
    **_environment(),
  )


def fit_call(config, strategy):
  """fn(steps) running one OutlierAwareModel.fit of `steps` steps on the trainer's model,
  optimizer and fixed synthetic batch (train_call's); and the model."""
  keras.mixed_precision.set_global_policy(config.mixed_precision or 'float32')
  with strategy.scope():
    classifier = models.create_model(config.model, MODEL_INPUTS[config.model], NUM_CLASSES)
    # total_steps as train_call's step (make_train_function's default): GOOD and ProoD ramp on it.
    model = acet_keras.OutlierAwareModel(classifier, config=config, total_steps=1)
    model.compile(optimizer=train_step.create_optimizer(config, 10**6))
  dataset = tf.data.Dataset.from_tensors(synthetic_batch(config)).repeat()

  def call(steps):
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)

  return call, model


def _timed(fn, *args):
  """(wall ms, process CPU ms) of fn(*args). CPU time sums all threads and is less sensitive
  than wall time to other processes on the machine."""
  t, c = time.perf_counter(), time.process_time()
  fn(*args)
  return (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3


def time_keras_fit(config, strategy, reps=5, steps=20, warmup=2):
  """OutlierAwareModel.fit beside train_step.make_train_function, alternating. Returns a dict.

  Each repetition: `steps` trainer calls of one step, a fit call of `steps` steps and a fit call
  of one step. Per step, fit's time with its set-up spread over the steps (`fit_*`) and without
  it (`fit_steady_*` = (fit of `steps` - fit of 1) / (steps - 1)); `fit_setup_ms` is what a fit
  call costs beyond its steps (data adapter, iterator, callbacks). Ratios are fit / trainer per
  repetition: median, min, max; wall and process CPU time.
  """
  if config.steps_per_call != 1:
    raise ValueError('--keras_fit compares with the trainer at steps_per_call=1.')
  if steps < 2:
    raise ValueError(f'--fit_steps must be >= 2, got {steps}')
  trainer_call, _ = train_call(config, strategy)
  fit, model = fit_call(config, strategy)

  def trainer(n):
    for _ in range(n):
      trainer_call()

  for _ in range(warmup):
    trainer(1)
    fit(steps)
  rows = collections.defaultdict(list)
  for _ in range(reps):
    for name, fn, n in (('trainer', trainer, steps), ('fit', fit, steps), ('fit1', fit, 1)):
      wall, cpu = _timed(fn, n)
      rows[f'{name}_wall'].append(wall)
      rows[f'{name}_cpu'].append(cpu)
  out = dict(
    case='keras_fit',
    model=config.model,
    method=config.method,
    batch=config.batch_size,
    replicas=strategy.num_replicas_in_sync,
    pgd_steps=config.pgd.steps,
    steps_per_rep=steps,
  )
  for kind in ('wall', 'cpu'):
    trainer_ms = [t / steps for t in rows[f'trainer_{kind}']]
    fit_ms = [f / steps for f in rows[f'fit_{kind}']]
    steady = [(f - f1) / (steps - 1) for f, f1 in zip(rows[f'fit_{kind}'], rows[f'fit1_{kind}'])]
    setup = [f1 - s for f1, s in zip(rows[f'fit1_{kind}'], steady)]
    out[f'trainer_{kind}_ms_per_step'] = round(statistics.median(trainer_ms), 1)
    out[f'fit_{kind}_ms_per_step'] = round(statistics.median(fit_ms), 1)
    out[f'fit_steady_{kind}_ms_per_step'] = round(statistics.median(steady), 1)
    out[f'fit_setup_{kind}_ms'] = round(statistics.median(setup), 1)
    for label, values in (('fit', fit_ms), ('fit_steady', steady)):
      ratios = [v / t for v, t in zip(values, trainer_ms)]
      out[f'{label}_{kind}_ratio'] = [
        round(statistics.median(ratios), 3),
        round(min(ratios), 3),
        round(max(ratios), 3),
      ]
  out['fit_steps_run'] = int(model.optimizer.iterations.numpy())
  out.update(_environment())
  return out


NOT_OPS = ('Process', 'Run', 'Start')  # Profiler events named like ops that are not ops.


def op_times(logdir):
  """{op type: (total ms, count)} over every op event of the tf.profiler trace in logdir."""
  paths = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'tf.profiler wrote no .xplane.pb under {logdir}')
  space = xplane_pb2.XSpace()
  with open(paths[0], 'rb') as f:
    space.ParseFromString(f.read())
  totals, counts = collections.Counter(), collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        op_type = name.rpartition(':')[2].strip()
        # Op events are named 'op_name:OpType'; the runtime's and tf.function's events are not.
        if ':' in name and op_type not in NOT_OPS and not op_type.startswith('__'):
          totals[op_type] += event.duration_ps / 1e9
          counts[op_type] += 1
  return {k: (totals[k], counts[k]) for k in totals}


def profile_train_step(config, strategy, calls=2, warmup=2, top=25):
  """Op time by op type of the train step (tf.profiler over `calls` calls). Returns dicts."""
  call, _ = train_call(config, strategy)
  for _ in range(warmup):
    call()
  with tempfile.TemporaryDirectory() as logdir:
    start = time.perf_counter()
    tf.profiler.experimental.start(logdir)
    for _ in range(calls):
      call()
    tf.profiler.experimental.stop()
    wall_s = time.perf_counter() - start
    times = op_times(logdir)
  steps = calls * config.steps_per_call
  total_ms = sum(ms for ms, _ in times.values())
  case = dict(case='profile', model=config.model, method=config.method, batch=config.batch_size)
  env = _environment()
  case.update(cpu=env['cpu'], cpu_vector=env['cpu_vector'], onednn=env['onednn'])
  lines = [dict(case, wall_ms_per_step=round(wall_s * 1e3 / steps), op_ms=round(total_ms / steps))]
  for op_type, (ms, count) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(
      dict(
        case,
        op=op_type,
        ms_per_step=round(ms / steps, 1),
        share=round(ms / total_ms, 3),
        per_step=count // steps,
      )
    )
  return lines


def time_attack(config, eval_steps=200, reps=5, min_rep_s=1.0, warmup=2, table2=True):
  """Times PGD and Table 2's search on B noise images against the passes they need. Returns a dict.

  The training attack is pgd.pgd as train_step calls it (models.inference_logits_fn: the
  ResNet's folded batch norm), evaluation's as evaluation.attack_batches calls it
  (model(u, training=False)): the max log-confidence objective, random start, config.pgd's eps
  and step for the first, config.eval.adv_noise_* with `eval_steps` steps for the second. Each
  is compared with the passes it needs, timed alone with the same logits function: `steps`
  forward + input-gradient passes and 2 forwards (`*_over_passes`; 1.0 = no overhead; restarts
  repeat the attack, so they have the same ratio). Table 2's search (alpha_search.make_alpha_search)
  is compared with as many forwards as it runs (counted in-graph on one call).
  """
  model, _ = build(config, tf.distribute.get_strategy())
  images, _ = synthetic_batch(config)
  x0 = noise_lib.make_noise(images, tf.constant([0, 3], tf.int64), config.noise)
  seed = tf.constant([0, 4], tf.int64)
  objective = pgd.max_log_confidence_objective
  fns = {'train': models.inference_logits_fn(model), 'eval': lambda u: model(u, training=False)}
  jit = config.jit_compile

  def attack_fn(logits_fn, eps, step_size, steps):
    return tf.function(
      lambda x: pgd.pgd(
        logits_fn,
        x,
        objective,
        eps=eps,
        step_size=step_size,
        steps=steps,
        seed=seed,
        random_start=True,
      )[1],
      jit_compile=jit,
    )

  @tf.function(jit_compile=jit)
  def forward_and_input_gradient(x):
    # The straightforward pass: one forward and one input-gradient pass of the model's call.
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(x)
      obj = objective(fns['eval'](x), None)
    return tape.gradient(obj, x)

  def seconds(fn, one_call_is_long=False):
    if one_call_is_long:  # An attack: one call is long enough to time.
      return _median_seconds(lambda: fn(x0).numpy(), reps, 0.0, 1)[0]
    return _median_seconds(lambda: fn(x0).numpy(), reps, min_rep_s, warmup)[0]

  pass_s = seconds(forward_and_input_gradient)
  result = dict(
    case='attack',
    model=config.model,
    batch=config.batch_size,
    jit=jit,
    mixed_precision=config.mixed_precision,
    fwd_grad_ms=round(pass_s * 1e3, 2),
  )
  attacks_to_time = (
    ('train', config.pgd.eps, config.pgd.step_size, config.pgd.steps),
    ('eval', config.eval.adv_noise_eps, config.eval.adv_noise_step_size, eval_steps),
  )
  for name, eps, step_size, n in attacks_to_time:
    if n <= 0:
      continue
    logits_fn = fns[name]
    # The passes as PGD runs them (pgd.objective_and_input_gradient, CPU fast paths).
    grad_pass = tf.function(
      lambda x, f=logits_fn: pgd.objective_and_input_gradient(f, objective)(x, None)[1],
      jit_compile=jit,
    )
    forward = tf.function(lambda x, f=logits_fn: objective(f(x), None), jit_compile=jit)
    grad_s, fwd_s = seconds(grad_pass), seconds(forward)
    attack_s = seconds(attack_fn(logits_fn, eps, step_size, n), one_call_is_long=True)
    result[f'{name}_pgd_steps'] = n
    result[f'{name}_pass_fwd_grad_ms'] = round(grad_s * 1e3, 2)
    result[f'{name}_pass_fwd_ms'] = round(fwd_s * 1e3, 2)
    result[f'{name}_attack_ms'] = round(attack_s * 1e3, 1)
    result[f'{name}_attacked_img_per_s'] = round(config.batch_size / attack_s, 2)
    result[f'{name}_attack_over_passes'] = round(attack_s / (n * grad_s + 2 * fwd_s), 3)
    # Per PGD step (the attack's 2 extra forwards included) over one straightforward pass.
    result[f'{name}_attack_step_over_fwd_grad'] = round(attack_s / n / pass_s, 3)
  if table2:
    result.update(time_table2(model, x0, reps))
  result.update(peak_rss_mb=peak_rss_mb(), **_environment())
  return result


def time_table2(model, x0, reps):
  """Table 2's alpha search on x0 vs the forwards it runs. Returns a dict of table2_* keys."""
  forward = tf.function(lambda x: tf.nn.softmax(model(x, training=False)))
  calls = tf.Variable(0, dtype=tf.int64, trainable=False)

  def counting_forward(x):
    calls.assign_add(1)
    return forward(x)

  # The search as evaluate.py runs it (settings' defaults), on the benchmark's noise batch.
  tf.function(alpha_search.make_alpha_search(counting_forward))(x0)
  num_forwards = int(calls.numpy())
  search = alpha_search.make_alpha_search(forward)
  fwd_s = _median_seconds(lambda: forward(x0).numpy(), reps, 1.0, 2)[0]
  search_s = _median_seconds(lambda: search(x0)[0].numpy(), reps, 0.0, 1)[0]
  return dict(
    table2_forwards=num_forwards,
    table2_fwd_ms=round(fwd_s * 1e3, 2),
    table2_search_ms=round(search_s * 1e3, 1),
    table2_over_passes=round(search_s / (num_forwards * fwd_s), 3),
  )


def run(
  models,
  methods,
  *,
  batch,
  pgd_steps,
  eval_pgd_steps=200,
  jit=False,
  mixed_precision='',
  steps_per_call=1,
  replicas=1,
  reps=5,
  min_rep_s=1.0,
  warmup=2,
  attack=True,
  table2=True,
  profile=0,
  keras_fit=False,
  fit_steps=20,
  emit=print,
):
  """Runs every model x method case (and the attack lines); `emit`s and returns the dicts.

  With profile > 0 the step cases are profiled instead (that many op types each) and no attack
  line is run.
  """
  strategy = create_strategy(replicas)
  results = []
  for model in models:
    for method in methods:
      config = benchmark_config(
        model, method, batch, pgd_steps, jit, mixed_precision, steps_per_call
      )
      if keras_fit:
        lines = [time_keras_fit(config, strategy, reps, fit_steps, warmup)]
      elif profile:
        lines = profile_train_step(config, strategy, reps, warmup, profile)
      else:
        lines = [time_train_step(config, strategy, reps, min_rep_s, warmup)]
      for line in lines:
        emit(json.dumps(line))
      results += lines
    if attack and not profile and not keras_fit:
      config = benchmark_config(model, 'acet', batch, pgd_steps, jit, mixed_precision)
      results.append(time_attack(config, eval_pgd_steps, reps, min_rep_s, warmup, table2))
      emit(json.dumps(results[-1]))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  setup_devices(_REPLICAS.value, _INTRA.value, _INTER.value)
  if _PGD_PASS.value != 'auto':
    pgd.force_cpu_pass(_PGD_PASS.value)
  run(
    _MODEL.value,
    _METHOD.value,
    batch=_BATCH.value,
    pgd_steps=_PGD_STEPS.value,
    eval_pgd_steps=_EVAL_PGD_STEPS.value,
    jit=_JIT.value,
    mixed_precision=_MIXED.value,
    steps_per_call=_STEPS_PER_CALL.value,
    replicas=_REPLICAS.value,
    reps=_REPS.value,
    min_rep_s=_MIN_REP_S.value,
    warmup=_WARMUP.value,
    attack=_ATTACK.value,
    table2=_TABLE2.value,
    profile=_PROFILE.value,
    keras_fit=_KERAS_FIT.value,
    fit_steps=_FIT_STEPS.value,
  )


if __name__ == '__main__':
  app.run(main)
