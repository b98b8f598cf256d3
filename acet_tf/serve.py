"""Serves an exported abstaining classifier over TensorFlow Serving's REST API (a subset).

  python -m acet_tf.serve --export_dir=exports/mnist5k_acet --model_name=mnist5k_acet \
      [--enable_batching] [--keep_versions=2] [--file_system_poll_wait_seconds=1]

A thin binary: flags -> rest_app.create_app and runner.serve (acet_tf/serving/rest_app.py has the
API).
"""

from absl import app
from absl import flags

from acet_tf.serving import rest_app
from acet_tf.serving import runner

_EXPORT_DIR = flags.DEFINE_string(
  'export_dir', None, 'Base directory of an export (versions below it).'
)
_MODEL_NAME = flags.DEFINE_string('model_name', None, 'NAME in /v1/models/NAME.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Interface to bind; 0.0.0.0 exposes the server.')
_PORT = flags.DEFINE_integer('port', 8501, 'TCP port; 0 picks a free one (logged at start).')
_THRESHOLD = flags.DEFINE_float('threshold', None, 'Overrides the stored threshold, in [0, 1].')
_MAX_BODY_BYTES = flags.DEFINE_integer('max_body_bytes', 16 << 20, 'Larger request bodies get 413.')
_MAX_BATCH_SIZE = flags.DEFINE_integer('max_batch_size', 1024, 'Larger batches get 400.')
_POLL_SECONDS = flags.DEFINE_float(
  'file_system_poll_wait_seconds',
  1.0,
  "Seconds between looks for new versions (TF Serving's flag); 0 loads once.",
)
_KEEP_VERSIONS = flags.DEFINE_integer('keep_versions', 1, 'Serve the newest N complete versions.')
_ENABLE_BATCHING = flags.DEFINE_bool(
  'enable_batching', False, 'Merge concurrent requests into one model call.'
)
_BATCH_MAX = flags.DEFINE_integer('batching_max_batch_size', 64, 'Examples per merged model call.')
_BATCH_TIMEOUT = flags.DEFINE_integer(
  'batching_timeout_micros', 2000, 'Longest wait for a batch to fill, from its first request.'
)
_BATCH_THREADS = flags.DEFINE_integer(
  'batching_num_threads', 2, 'Threads running merged model calls.'
)
_BATCH_QUEUE = flags.DEFINE_integer(
  'batching_max_enqueued_batches',
  16,
  'Queue room, in batches; a request that does not fit gets 503.',
)
_HTTP_THREADS = flags.DEFINE_integer(
  'num_http_threads', 32, 'HTTP worker threads (requests in progress).'
)
_SOCKET_TIMEOUT = flags.DEFINE_integer(
  'socket_timeout_seconds',
  runner.SOCKET_TIMEOUT_S,
  'A client silent this long (mid-request or idle) is disconnected.',
)
_MAX_CONNECTIONS = flags.DEFINE_integer(
  'max_connections',
  runner.MAX_CONNECTIONS,
  'Open HTTP connections at once (idle ones cost no worker); past it new ones wait to be accepted.',
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _EXPORT_DIR.value or not _MODEL_NAME.value:
    raise app.UsageError('--export_dir and --model_name are required.')
  batching = None
  if _ENABLE_BATCHING.value:
    batching = {
      'max_batch_size': _BATCH_MAX.value,
      'batch_timeout_micros': _BATCH_TIMEOUT.value,
      'num_batch_threads': _BATCH_THREADS.value,
      'max_enqueued_batches': _BATCH_QUEUE.value,
    }
  rest = rest_app.create_app(
    _EXPORT_DIR.value,
    _MODEL_NAME.value,
    threshold=_THRESHOLD.value,
    max_body_bytes=_MAX_BODY_BYTES.value,
    max_batch_size=_MAX_BATCH_SIZE.value,
    keep_versions=_KEEP_VERSIONS.value,
    poll_interval_s=_POLL_SECONDS.value,
    batching=batching,
    tune_gc=True,
  )
  runner.serve(
    rest,
    _HOST.value,
    _PORT.value,
    num_threads=_HTTP_THREADS.value,
    socket_timeout_s=_SOCKET_TIMEOUT.value,
    max_connections=_MAX_CONNECTIONS.value,
    # Above the app's own limit, so that a body a little too large gets the app's JSON 413.
    max_body_bytes=2 * _MAX_BODY_BYTES.value + 1,
    on_stop=lambda: rest_app.close_app(rest),
    description=(
      f'model {_MODEL_NAME.value!r} version(s) {rest.versions.versions} '
      f'from {_EXPORT_DIR.value}, threshold {rest.model.threshold:.6f}, '
      f'batching {batching or "off"},'
    ),
  )


if __name__ == '__main__':
  app.run(main)
