"""tools/benchmark.op_times: op time by op type from a tf.profiler trace."""

import pytest
import tensorflow as tf

from tools import benchmark


def test_op_times_counts_each_op_of_a_profiled_function(tmp_path):
  x = tf.random.uniform([8, 16, 16, 3])
  kernel = tf.random.uniform([3, 3, 3, 4])
  f = tf.function(lambda u: tf.reduce_sum(tf.nn.relu(tf.nn.conv2d(u, kernel, 1, 'SAME'))))
  f(x).numpy()  # Traced and compiled before the profile.
  calls = 3
  tf.profiler.experimental.start(str(tmp_path))
  for _ in range(calls):
    f(x).numpy()
  tf.profiler.experimental.stop()
  times = benchmark.op_times(str(tmp_path))
  conv = [k for k in times if 'Conv2D' in k]
  relu = [k for k in times if k.endswith('Relu') and 'Conv' not in k]
  assert conv, f'no convolution among {sorted(times)}'
  # oneDNN may fuse the ReLU into the convolution; either way each call ran each op once.
  assert sum(times[k][1] for k in conv + relu) in (calls, 2 * calls)
  assert all(times[k][0] > 0 for k in conv)
  assert all(ms >= 0 for ms, _ in times.values())
  assert not set(times) & set(benchmark.NOT_OPS)
  assert not [k for k in times if k.startswith('__')]  # tf.function events are not ops.


def test_resident_split_adds_up_to_the_resident_set():
  split = benchmark.resident_split_mb()
  with open('/proc/self/status') as f:
    rss_kb = int(next(line for line in f if line.startswith('VmRSS')).split()[1])
  assert set(split) == {'rss_anon_mb', 'rss_file_mb'}
  # TensorFlow is imported: its shared libraries are mapped, so both parts are large.
  assert split['rss_anon_mb'] > 50 and split['rss_file_mb'] > 50
  assert abs(split['rss_anon_mb'] + split['rss_file_mb'] - rss_kb / 1024) < 0.05 * rss_kb / 1024


@pytest.mark.slow  # About 8 s alone, more beside other jobs: two traces of the ACET step.
def test_keras_fit_mode_times_fit_beside_the_trainers_step():
  config = benchmark.benchmark_config('lenet', 'acet', batch=4, pgd_steps=2)
  strategy = benchmark.create_strategy(1)
  line = benchmark.time_keras_fit(config, strategy, reps=2, steps=2, warmup=1)
  assert line['case'] == 'keras_fit' and line['pgd_steps'] == 2
  assert line['fit_steps_run'] == 2 + 2 * (2 + 1)  # Warm-up, then per repetition 2 + 1.
  for kind in ('wall', 'cpu'):
    median, low, high = line[f'fit_{kind}_ratio']
    assert low <= median <= high and low > 0
    assert line[f'trainer_{kind}_ms_per_step'] > 0 and line[f'fit_{kind}_ms_per_step'] > 0
