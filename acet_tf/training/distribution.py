"""The tf.distribute strategy named in the config, and what differs between its workers.

Every worker of a run trains the same replicated model; they differ only in who writes. The chief
writes summaries, the config, final metrics and checkpoints into the workdir; the other workers
take part in each checkpoint save (saving distributed variables may run collective ops) but write
to a local temporary directory deleted right after, so they never clobber the chief's files.
Every worker restores from the chief's checkpoint directory, which must therefore be visible to
all machines (a shared filesystem or a bucket).

Preemption: with MultiWorkerMirroredStrategy, TF's PreemptionCheckpointHandler turns a SIGTERM
on any worker into a checkpoint saved by all workers at the same step; on one machine a plain
SIGTERM handler does the same between two train calls. Both then exit with EXIT_PREEMPTED.
"""

import json
import os
import shutil
import signal
import tempfile

from absl import logging
import tensorflow as tf

STRATEGIES = ('auto', 'one_device', 'mirrored', 'multi_worker', 'tpu')
# 128 + SIGTERM: "terminated, rerun me"; also the restart code GCE's preemption handling uses.
EXIT_PREEMPTED = 143


def create_strategy(name, tpu_address='', cross_device_ops=None):
  """Returns the strategy for `name`.

  auto: MirroredStrategy over all local GPUs if there are any, else the one device.
  mirrored: MirroredStrategy over all local GPUs (or all logical CPUs when there are no GPUs,
    which is how the tests exercise it).
  multi_worker: MultiWorkerMirroredStrategy, cluster from the TF_CONFIG environment variable.
  tpu: TPUStrategy on `tpu_address` (code path only; untested here).

  cross_device_ops: for `mirrored` only, e.g. tf.distribute.ReductionToOneDevice() in tests
    (two MirroredStrategy instances with collective ops in one process can collide,
    tensorflow#62790); None = TF's default.
  """
  if name not in STRATEGIES:
    raise ValueError(f'config.strategy must be one of {STRATEGIES}, got {name!r}')
  if name == 'auto':
    # Physical devices: listing logical ones would start the runtime.
    name = 'mirrored' if tf.config.list_physical_devices('GPU') else 'one_device'
  if cross_device_ops is not None and name != 'mirrored':
    raise ValueError(f'cross_device_ops applies to strategy mirrored, not {name!r}.')
  if name == 'multi_worker':
    if 'TF_CONFIG' not in os.environ:
      raise ValueError(
        'strategy multi_worker needs the TF_CONFIG environment variable '
        '(see README "Several machines").'
      )
    json.loads(os.environ['TF_CONFIG'])  # Fail here, clearly, on malformed JSON.
    # Must come before anything starts the TF runtime (TF raises "Collective ops must be
    # configured at program startup"), hence first in train_and_evaluate.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # Partial-batch handling would make the batch dimension dynamic, which the train step's
    # static shapes cannot take. It is not needed: every worker's input pipeline yields the same
    # number of full batches (input_pipeline.train_dataset) and the loop never reads past them.
    strategy.extended.experimental_enable_get_next_as_optional = False
  elif name in ('one_device', 'mirrored'):
    gpus = tf.config.list_logical_devices('GPU')
    if name == 'one_device':
      device = gpus[0].name if gpus else tf.config.list_logical_devices('CPU')[0].name
      strategy = tf.distribute.OneDeviceStrategy(device)
    else:
      devices = [d.name for d in (gpus or tf.config.list_logical_devices('CPU'))]
      strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
  else:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    strategy = tf.distribute.TPUStrategy(resolver)
  logging.info(
    'Strategy %s with %d replicas.', type(strategy).__name__, strategy.num_replicas_in_sync
  )
  return strategy


def _task(strategy):
  """(task_type, task_id) of this worker, or (None, 0) outside a cluster."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not resolver.task_type:
    return None, 0
  return resolver.task_type, resolver.task_id or 0


def is_chief(strategy):
  """True on the one worker that writes summaries, the config and exports."""
  task_type, task_id = _task(strategy)
  if task_type is None:
    return True
  return task_type == 'chief' or (
    task_type == 'worker'
    and task_id == 0
    and 'chief' not in strategy.cluster_resolver.cluster_spec().as_dict()
  )


def is_multi_worker(strategy):
  """True if replicas live in more than one process (collectives cross processes)."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None:
    return False
  spec = resolver.cluster_spec().as_dict()
  return sum(len(spec.get(job, ())) for job in ('chief', 'worker')) > 1


# ----------------------------------------------------------------------------------------------
# Checkpoints per worker.
# ----------------------------------------------------------------------------------------------


class WorkerCheckpoints:
  """The run's checkpoints as one worker sees them: restore from the chief's, save where allowed.

  Attributes:
    directory: the chief's checkpoint directory (every worker restores from it).
    chief: whether this worker writes into `directory`.
  """

  def __init__(self, strategy, checkpoint, directory, max_to_keep):
    self.directory = directory
    self.chief = is_chief(strategy)
    self._checkpoint = checkpoint
    self._task_id = _task(strategy)[1]
    # On a non-chief worker this manager only reads: it never saves.
    self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep)

  @property
  def latest(self):
    """Path prefix of the newest checkpoint in `directory`, or None."""
    return tf.train.latest_checkpoint(self.directory)

  def save(self, step):
    """Saves the state after `step` steps; returns the path the chief wrote (or None)."""
    if self.chief:
      return self.manager.save(checkpoint_number=step)
    scratch = tempfile.mkdtemp(prefix=f'acet_tf_worker{self._task_id}_')
    try:
      tf.train.CheckpointManager(self._checkpoint, scratch, max_to_keep=1).save(
        checkpoint_number=step
      )
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    return None


def check_same_on_all_workers(strategy, value, what):
  """Raises ValueError unless every worker of a multi-worker run passes the same `value`.

  A collective, so all workers must call it together. Catches workers that restored different
  checkpoints (e.g. a workdir that is not shared), which would otherwise train silently apart.

  Args:
    strategy: the run's strategy; a no-op unless it spans several workers.
    value: an int (exact in float64: |value| * replicas < 2**53).
    what: names `value` in the error.
  """
  if not is_multi_worker(strategy):
    return
  v = tf.constant(float(value), tf.float64)

  @tf.function
  def mean_and_spread():
    def replica_fn():
      ctx = tf.distribute.get_replica_context()
      mean = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, v)
      # Zero iff all values equal: then the mean is exactly each of them.
      return mean, ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.abs(v - mean))

    return strategy.run(replica_fn)

  mean, spread = (float(strategy.experimental_local_results(x)[0]) for x in mean_and_spread())
  if spread != 0:  # Every worker gets the same sums, so all of them stop here.
    raise ValueError(
      f'The workers disagree on {what}: this worker has {value}, the mean over the '
      f'{strategy.num_replicas_in_sync} replicas is {mean:g}. Every worker must read the '
      "chief's workdir (a shared filesystem or bucket) and run the same command."
    )


# ----------------------------------------------------------------------------------------------
# Preemption.
# ----------------------------------------------------------------------------------------------


def _exit_preempted():
  logging.warning('Preempted: checkpoint saved; rerun the same command to resume.')
  raise SystemExit(EXIT_PREEMPTED)


class SignalPreemption:
  """One process: a SIGTERM makes `after_call` save a checkpoint and exit.

  Use as a context manager around the train loop (it restores the previous SIGTERM handler) and
  call `after_call(step)` after every train call.
  """

  def __init__(self, save):
    """save(step) writes the checkpoint of the state after `step` steps."""
    self._save = save
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some test runners): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint and stopping after the current train call.')
    self.requested = True

  def after_call(self, step):
    if self.requested:
      self._save(step)
      logging.warning('Stopped at step %d after SIGTERM.', step)
      _exit_preempted()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class ClusterPreemption:
  """MultiWorkerMirroredStrategy: TF's PreemptionCheckpointHandler.

  A SIGTERM on any worker is announced to all workers through the coordination service; they
  agree on the train call after which all of them save (one more call runs meanwhile) and exit.
  The handler counts `after_call` calls; all workers make the same calls, so the counts agree.
  """

  def __init__(self, strategy, checkpoints):
    """checkpoints: the WorkerCheckpoints of the run, already restored."""
    self._strategy = strategy
    self._checkpoints = checkpoints
    self._handler = None
    self._previous = None

  def __enter__(self):
    self._previous = signal.getsignal(signal.SIGTERM)
    config = tf.distribute.experimental.TerminationConfig(
      exit_fn=_exit_preempted,
      save_fn=lambda checkpoint_number: self._checkpoints.save(checkpoint_number),
    )
    # Every worker gets the chief's manager: the handler restores from it at creation (so all
    # workers restore the same handler state), while saving goes through save_fn.
    self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
      self._strategy.cluster_resolver, self._checkpoints.manager, termination_config=config
    )
    return self

  def after_call(self, step):
    self._handler.save_checkpoint_if_preempted(checkpoint_number=step)

  def __exit__(self, *exc):
    # Dropping the handler stops its watcher threads (its __del__); then our SIGTERM handling.
    self._handler = None
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def preemption(strategy, checkpoints):
  """The preemption guard for `strategy`: ClusterPreemption for MWMS, else SignalPreemption."""
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return ClusterPreemption(strategy, checkpoints)
  return SignalPreemption(checkpoints.save)
