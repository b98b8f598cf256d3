"""Dynamic batching, as TensorFlow Serving's --enable_batching: concurrent requests of the same
model version and signature are merged into one model call and split back.

One batch is open at a time: a batch thread takes the oldest queued request and adds the queued
requests of the same key until the batch holds max_batch_size examples or batch_timeout_micros have
passed since that first request arrived; meanwhile the other batch threads run closed batches. The
queue holds at most max_enqueued_batches * max_batch_size examples; a request that does not fit is
refused at once with QueueFullError (HTTP 503), never left waiting without bound.
"""

import collections
import threading
import time

import numpy as np

from acet_tf.serving import served_model


class QueueFullError(RuntimeError):
  """The batch queue has no room (or the batcher is shutting down); the client should retry."""


class _Task:
  __slots__ = ('key', 'fn', 'inputs', 'size', 'deadline', 'enqueued', 'done', 'outputs', 'error')

  def __init__(self, key, fn, inputs, size, deadline):
    self.key, self.fn, self.inputs, self.size, self.deadline = key, fn, inputs, size, deadline
    self.enqueued = time.monotonic()
    self.done = threading.Event()
    self.outputs = self.error = None


class Batcher:
  """Merges concurrent `run` calls with the same key into one call of their `fn`."""

  def __init__(
    self,
    *,
    max_batch_size,
    batch_timeout_micros,
    num_batch_threads,
    max_enqueued_batches,
    on_batch=None,
    on_queue=None,
  ):
    """on_batch(key, num_examples) is called before each model call; on_queue(examples queued)
    whenever the queue changes (metrics)."""
    for name, value in [
      ('max_batch_size', max_batch_size),
      ('num_batch_threads', num_batch_threads),
      ('max_enqueued_batches', max_enqueued_batches),
    ]:
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}.')
    if batch_timeout_micros < 0:
      raise ValueError(f'batch_timeout_micros must be >= 0, got {batch_timeout_micros}.')
    self.max_batch_size = max_batch_size
    self.timeout_s = batch_timeout_micros / 1e6
    self.capacity = max_enqueued_batches * max_batch_size
    self._on_batch = on_batch or (lambda key, n: None)
    self._on_queue = on_queue or (lambda n: None)
    self._cond = threading.Condition()
    self._queue = collections.deque()
    self._queued = 0  # Examples in the queue.
    self._collecting = False  # One thread fills the open batch at a time.
    self._closed = False
    self._threads = [
      threading.Thread(target=self._loop, name=f'batch-{i}', daemon=True)
      for i in range(num_batch_threads)
    ]
    for t in self._threads:
      t.start()

  def run(self, key, fn, inputs, size, deadline=None):
    """fn(inputs) -> {name: array [n, ...]}, possibly merged with other calls of the same key.

    inputs: {name: array [size, ...]}, size <= max_batch_size. deadline: a time.monotonic() time
    or None; a call whose deadline passes before its batch runs is not run and raises
    served_model.DeadlineExceededError. Returns this call's rows of the outputs; raises fn's error
    (a merged batch that fails is retried call by call, so one bad request does not fail the
    others) or QueueFullError.
    """
    if size > self.max_batch_size:
      raise ValueError(f'size {size} > max_batch_size {self.max_batch_size}')
    if deadline is not None and time.monotonic() >= deadline:
      raise served_model.DeadlineExceededError()
    task = _Task(key, fn, inputs, size, deadline)
    with self._cond:
      if self._closed:
        raise QueueFullError('The server is shutting down; retry on another replica.')
      if self._queued + size > self.capacity:
        raise QueueFullError(
          f'The batch queue is full ({self._queued} examples queued, room for {self.capacity}); '
          'retry later.'
        )
      self._queue.append(task)
      self._queued += size
      self._on_queue(self._queued)
      self._cond.notify_all()
    if deadline is not None and not task.done.wait(max(0.0, deadline - time.monotonic())):
      with self._cond:
        if task in self._queue:  # Not taken into a batch yet: withdrawn, never run.
          self._take(task)
          self._on_queue(self._queued)
          raise served_model.DeadlineExceededError()
    task.done.wait()  # Taken into a batch: _execute runs it or, if expired, refuses it.
    if task.error is not None:
      raise task.error
    return task.outputs

  def close(self):
    """Stops taking requests, runs those queued, and joins the batch threads."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    for t in self._threads:
      t.join()

  def _take(self, task):
    self._queue.remove(task)
    self._queued -= task.size

  def _collect(self):
    """The next batch (list of tasks), or None once closed and drained. Holds the lock."""
    while self._collecting or not self._queue:
      if self._closed and not self._queue:
        return None
      self._cond.wait()
    self._collecting = True
    first = self._queue[0]
    self._take(first)
    batch, rows = [first], first.size
    deadline = first.enqueued + self.timeout_s
    while rows < self.max_batch_size:
      for task in list(self._queue):
        if task.key == first.key and rows + task.size <= self.max_batch_size:
          self._take(task)
          batch.append(task)
          rows += task.size
      remaining = deadline - time.monotonic()
      if rows >= self.max_batch_size or remaining <= 0 or self._closed:
        break
      self._cond.wait(remaining)
    self._collecting = False
    self._on_queue(self._queued)
    self._cond.notify_all()  # Another thread may start the next batch.
    return batch

  def _loop(self):
    while True:
      with self._cond:
        batch = self._collect()
      if batch is None:
        return
      self._execute(batch)

  def _execute(self, batch):
    now = time.monotonic()
    for task in [t for t in batch if t.deadline is not None and now >= t.deadline]:
      task.error = served_model.DeadlineExceededError()
      task.done.set()
      batch.remove(task)
    if not batch:
      return
    if len(batch) == 1:
      self._run_alone(batch[0])
      return
    names = batch[0].inputs.keys()
    merged = {k: np.concatenate([t.inputs[k] for t in batch]) for k in names}
    try:
      self._on_batch(batch[0].key, sum(t.size for t in batch))
      outputs = batch[0].fn(merged)
    except Exception:  # Deliberately broad: any failure is reported, not fatal.
      for task in batch:  # Each gets its own answer or error.
        self._run_alone(task)
      return
    start = 0
    for task in batch:
      task.outputs = {k: v[start : start + task.size] for k, v in outputs.items()}
      start += task.size
      task.done.set()

  def _run_alone(self, task):
    try:
      self._on_batch(task.key, task.size)
      task.outputs = task.fn(task.inputs)
    except Exception as e:  # Deliberately broad: any failure is reported, not fatal.
      task.error = e
    task.done.set()
