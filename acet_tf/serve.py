"""Serves an exported abstaining classifier over TensorFlow Serving's gRPC and REST APIs (subsets).

  python -m acet_tf.serve --export_dir=exports/mnist5k_acet --model_name=mnist5k_acet \
      [--port=8500] [--rest_api_port=8501] [--enable_batching] [--keep_versions=2]

The ports are TF Serving's: --port is gRPC (8500), --rest_api_port is REST (8501); 0 picks a free
port (logged at start). --port was the REST port before gRPC existed, so --port without
--rest_api_port is refused with a message, never silently served as gRPC. --model_base_path is
TF Serving's name for --export_dir. A thin binary: flags -> rest_app.create_app,
grpc_service.create_server and runner.serve (the modules have the APIs).
"""

import time

from absl import app
from absl import flags
from absl import logging

from acet_tf.serving import grpc_service
from acet_tf.serving import model_config
from acet_tf.serving import rest_app
from acet_tf.serving import runner

_EXPORT_DIR = flags.DEFINE_string(
  'export_dir', None, 'Base directory of an export (versions below it).'
)
_MODEL_BASE_PATH = flags.DEFINE_string(
  'model_base_path', None, "TF Serving's name for --export_dir (give one of the two)."
)
_MODEL_NAME = flags.DEFINE_string('model_name', None, 'NAME in /v1/models/NAME and ModelSpec.name.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Interface to bind; 0.0.0.0 exposes the server.')
_PORT = flags.DEFINE_integer(
  'port', 8500, "gRPC port, as TF Serving's --port; 0 picks a free one (logged at start)."
)
_REST_PORT = flags.DEFINE_integer(
  'rest_api_port', 8501, "REST port, as TF Serving's --rest_api_port; 0 picks a free one."
)
_THRESHOLD = flags.DEFINE_float('threshold', None, 'Overrides the stored threshold, in [0, 1].')
_MAX_BODY_BYTES = flags.DEFINE_integer('max_body_bytes', 16 << 20, 'Larger request bodies get 413.')
_MAX_BATCH_SIZE = flags.DEFINE_integer('max_batch_size', 1024, 'Larger batches get 400.')
_POLL_SECONDS = flags.DEFINE_float(
  'file_system_poll_wait_seconds',
  1.0,
  "Seconds between looks for new versions (TF Serving's flag); 0 loads once.",
)
_KEEP_VERSIONS = flags.DEFINE_integer('keep_versions', 1, 'Serve the newest N complete versions.')
_LABELS = flags.DEFINE_string(
  'version_labels', '', 'Version labels, e.g. "stable=1,canary=2" (each must be a served version).'
)
_CONFIG_FILE = flags.DEFINE_string(
  'model_config_file',
  None,
  "TF Serving's text-format ModelServerConfig (one model): name, base_path, version policy and "
  'version_labels, instead of --model_name, --export_dir, --keep_versions, --version_labels.',
)
_CONFIG_POLL = flags.DEFINE_float(
  'model_config_file_poll_wait_seconds',
  0.0,
  'Seconds between re-reads of --model_config_file (its labels apply live); 0 reads it once.',
)
_ENABLE_BATCHING = flags.DEFINE_bool(
  'enable_batching', False, 'Merge concurrent requests (REST and gRPC) into one model call.'
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
  'Queue room, in batches; a request that does not fit gets 503 / RESOURCE_EXHAUSTED.',
)
_REQUEST_TIMEOUT = flags.DEFINE_float(
  'request_timeout_seconds',
  None,
  'A REST :predict not started this long after it arrived gets 504 and is not run (gRPC calls '
  "use the client's deadline).",
)
_HTTP_THREADS = flags.DEFINE_integer(
  'num_http_threads', 32, 'HTTP worker threads (requests in progress).'
)
_GRPC_THREADS = flags.DEFINE_integer('grpc_num_threads', 16, 'gRPC calls in progress at once.')
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

# After SIGTERM, gRPC serves this long (at least) before it stops: see main's on_stop.
GRPC_LAME_DUCK_S = 0.5

PORT_MOVED = (
  '--port is now the gRPC port, as in TensorFlow Serving (--port=8500 gRPC, '
  '--rest_api_port=8501 REST); before gRPC it was the REST port. To keep serving REST on {port}, '
  'pass --rest_api_port={port} instead. To serve gRPC on {port}, also pass --rest_api_port '
  '(8501 is the default REST port).'
)


def parse_labels(text):
  """'stable=1,canary=2' -> {'stable': 1, 'canary': 2}; UsageError for anything else."""
  labels = {}
  for item in filter(None, text.split(',')):
    label, _, version = item.partition('=')
    if not label or not version.isdigit():
      raise app.UsageError(f'--version_labels takes LABEL=VERSION pairs, got {item!r}.')
    labels[label] = int(version)
  return labels


def model_from_flags():
  """The served model (a model_config.ModelConfig) from --model_config_file or the flags."""
  if _CONFIG_FILE.value:
    clash = [
      f'--{n}'
      for n in ('export_dir', 'model_base_path', 'model_name', 'keep_versions', 'version_labels')
      if flags.FLAGS[n].present
    ]
    if clash:
      raise app.UsageError(f'--model_config_file names the model; drop {", ".join(clash)}.')
    try:
      return model_config.read(_CONFIG_FILE.value)
    except (OSError, model_config.ConfigError) as e:
      raise app.UsageError(f'--model_config_file: {e}') from None
  if bool(_EXPORT_DIR.value) == bool(_MODEL_BASE_PATH.value):
    raise app.UsageError('Give one of --export_dir and --model_base_path (the same thing).')
  if not _MODEL_NAME.value:
    raise app.UsageError('--model_name is required.')
  return model_config.ModelConfig(
    name=_MODEL_NAME.value,
    base_path=_EXPORT_DIR.value or _MODEL_BASE_PATH.value,
    keep=_KEEP_VERSIONS.value,
    versions=None,
    labels=parse_labels(_LABELS.value),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if flags.FLAGS['port'].present and not flags.FLAGS['rest_api_port'].present:
    raise app.UsageError(PORT_MOVED.format(port=_PORT.value))
  config = model_from_flags()
  batching = None
  if _ENABLE_BATCHING.value:
    batching = {
      'max_batch_size': _BATCH_MAX.value,
      'batch_timeout_micros': _BATCH_TIMEOUT.value,
      'num_batch_threads': _BATCH_THREADS.value,
      'max_enqueued_batches': _BATCH_QUEUE.value,
    }
  export_dir, labels = config.base_path, config.labels
  rest = rest_app.create_app(
    export_dir,
    config.name,
    threshold=_THRESHOLD.value,
    max_body_bytes=_MAX_BODY_BYTES.value,
    max_batch_size=_MAX_BATCH_SIZE.value,
    keep_versions=config.keep,
    allowed_versions=config.versions,
    poll_interval_s=_POLL_SECONDS.value,
    batching=batching,
    tune_gc=True,
    request_timeout_s=_REQUEST_TIMEOUT.value,
    labels=labels,
  )
  try:  # Each label must point at a served version, as in TF Serving.
    rest.set_labels(labels)
  except LookupError as e:
    rest_app.close_app(rest)
    raise app.UsageError(f'version labels: {e}') from None
  watcher = None
  if _CONFIG_FILE.value and _CONFIG_POLL.value > 0:
    watcher = model_config.Watcher(_CONFIG_FILE.value, config, rest.set_labels, _CONFIG_POLL.value)
  grpc_server, grpc_port = grpc_service.create_server(
    rest, _HOST.value, _PORT.value, num_threads=_GRPC_THREADS.value
  )
  logging.info('Serving gRPC at %s:%d', _HOST.value, grpc_port)
  signalled = []

  def on_stop():
    # gRPC's shutdown cancels (CANCELLED) the calls its core has received but not yet handed to
    # the Python server, and under load (the GIL) calls wait there for milliseconds: stopping it
    # at the signal failed calls sent before the signal. So gRPC serves on while REST drains, for
    # at least GRPC_LAME_DUCK_S after the signal, then refuses new calls and finishes the others.
    if signalled:
      time.sleep(max(0.0, signalled[0] + GRPC_LAME_DUCK_S - time.monotonic()))
    grpc_server.stop(grace=60).wait()  # Those in progress get up to 60 s.
    if watcher is not None:
      watcher.close()
    rest_app.close_app(rest)

  runner.serve(
    rest,
    _HOST.value,
    _REST_PORT.value,
    num_threads=_HTTP_THREADS.value,
    socket_timeout_s=_SOCKET_TIMEOUT.value,
    max_connections=_MAX_CONNECTIONS.value,
    # Above the app's own limit, so that a body a little too large gets the app's JSON 413.
    max_body_bytes=2 * _MAX_BODY_BYTES.value + 1,
    on_signal=lambda: signalled.append(time.monotonic()),
    on_stop=on_stop,
    description=(
      f'model {config.name!r} version(s) {rest.versions.versions} '
      f'from {export_dir}, threshold {rest.model.threshold:.6f}, '
      f'batching {batching or "off"}, gRPC port {grpc_port}, REST'
    ),
  )


if __name__ == '__main__':
  app.run(main)
