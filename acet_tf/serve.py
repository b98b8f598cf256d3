"""Serves an exported abstaining classifier over TensorFlow Serving's REST API (a subset).

  python -m acet_tf.serve --export_dir=exports/mnist5k_acet --model_name=mnist5k_acet

Loads the newest version below --export_dir and answers
  GET  /v1/models/NAME[/versions/N]            status (model_version_status)
  GET  /v1/models/NAME[/versions/N]/metadata   signature defs, plus the export's metadata
  POST /v1/models/NAME[/versions/N]:predict    {"instances": [...]} -> {"predictions": [...]}
                                               {"inputs": ...} -> {"outputs": {...}}
with an optional "signature_name" (serving_default, serving_uint8 or with_threshold) in the body.
Every request is validated against the signature (shape, dtype, finite values, value range, batch
size) before the model runs; a bad one gets a 4xx with {"error": "..."} and the server goes on.
The HTTP layer is werkzeug (threaded development server, one thread per request, no keep-alive):
it stops cleanly on SIGTERM or SIGINT.

Needs nothing of the training code: it reads only the SavedModel and its metadata asset.
`main` only parses flags; the library parts are ServedModel (the loaded export), RestApp (the WSGI
app, usable in-process) and serve (runs a WSGI app until a signal).
"""
import dataclasses
import json
import os
import signal
import threading

from absl import app
from absl import flags
from absl import logging
from google.protobuf import json_format
import numpy as np
import tensorflow as tf
from acet_tf import serving_layout
from werkzeug import exceptions
from werkzeug import routing
from werkzeug import serving
from werkzeug import wrappers


DEFAULT_SIGNATURE = 'serving_default'
REQUEST_KEYS = ('instances', 'inputs', 'signature_name')
# A client that stops sending mid-request frees its thread after this many seconds.
SOCKET_TIMEOUT_S = 30


class RequestError(ValueError):
  """A request the server refuses; the message says what is wrong. HTTP status `code`."""

  def __init__(self, message, code=400):
    super().__init__(message)
    self.code = code


# ----------------------------------------------------------------------------------------------
# The loaded model.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputSpec:
  dtype: np.dtype
  shape: tuple  # Dims; None = any size (the batch).
  low: float  # Inclusive range of the values.
  high: float

  @property
  def batched(self):
    return bool(self.shape) and self.shape[0] is None

  def describe(self):
    dims = ', '.join('batch' if d is None else str(d) for d in self.shape)
    return f'{self.dtype.name} [{dims}] in [{self.low:g}, {self.high:g}]'


class ServedModel:
  """One version of an export, loaded: its signatures, input specs, metadata and threshold."""

  def __init__(self, export_dir, *, version=None, threshold=None):
    """Loads `version` (default: the newest) of `export_dir`; `threshold` overrides the stored one.

    Raises FileNotFoundError if there is no such version, ValueError for a bad threshold or an
    export without acet_tf metadata.
    """
    versions = serving_layout.list_versions(export_dir)
    if not versions:
      raise FileNotFoundError(f'No version directory with a saved_model.pb in {export_dir}.')
    if version is not None and version not in versions:
      raise FileNotFoundError(f'Version {version} is not in {export_dir}; it has {versions}.')
    self.version = versions[-1] if version is None else version
    self.path = os.path.join(export_dir, str(self.version))
    self._saved = tf.saved_model.load(self.path)
    if not hasattr(self._saved, 'metadata') or not hasattr(self._saved, 'set_threshold'):
      raise ValueError(f'{self.path} has no metadata asset or set_threshold: not an acet_tf '
                       'export (acet_tf.export writes them).')
    with tf.io.gfile.GFile(self._saved.metadata.asset_path.numpy().decode()) as f:
      self.metadata = json.load(f)
    self.specs = {name: self._input_specs(name) for name in self.metadata['signatures']}
    self.signature_defs = self._signature_defs()
    if threshold is not None:
      self.set_threshold(threshold)

  def _input_specs(self, name):
    if name not in self._saved.signatures:
      raise ValueError(f'The metadata of {self.path} names signature {name!r}, which the '
                       f'SavedModel lacks (it has {sorted(self._saved.signatures)}).')
    ranges = self.metadata['signatures'][name]['inputs']
    _, kwargs = self._saved.signatures[name].structured_input_signature
    if set(kwargs) != set(ranges):
      raise ValueError(f'Signature {name!r} takes {sorted(kwargs)} but the metadata gives ranges '
                       f'for {sorted(ranges)}.')
    return {key: InputSpec(np.dtype(spec.dtype.as_numpy_dtype), tuple(spec.shape.as_list()),
                           *ranges[key]) for key, spec in kwargs.items()}

  def _signature_defs(self):
    """The served signatures as TensorFlow Serving's metadata shows them (SignatureDef JSON)."""
    from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(self.path, 'saved_model.pb'), 'rb') as f:
      proto.ParseFromString(f.read())
    defs = proto.meta_graphs[0].signature_def
    return {name: json_format.MessageToDict(defs[name], preserving_proto_field_name=True)
            for name in self.specs}

  @property
  def threshold(self):
    return float(self._saved.threshold.numpy())

  def set_threshold(self, threshold):
    """Sets the stored threshold variable (no re-export); ValueError outside [0, 1]."""
    try:
      value = float(threshold)
    except (TypeError, ValueError):
      value = float('nan')
    if isinstance(threshold, bool) or not 0.0 <= value <= 1.0:
      raise ValueError(f'threshold must be a number in [0, 1], got {threshold!r}.')
    self._saved.set_threshold(tf.constant(value, tf.float32))

  def predict(self, signature_name, inputs):
    """One model call. inputs: {name: numpy array} as validated by `parse_predict_request`.

    Returns {output name: numpy array with the batch first}.
    """
    outputs = self._saved.signatures[signature_name](
        **{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


# ----------------------------------------------------------------------------------------------
# Request validation.
# ----------------------------------------------------------------------------------------------


def _shape_of(value):
  """Best-effort nested-list shape for error messages."""
  shape = []
  while isinstance(value, list):
    shape.append(len(value))
    value = value[0] if value else None
  return shape


def to_array(name, value, spec):
  """A JSON value -> numpy array of spec.dtype; RequestError saying what is wrong otherwise."""
  try:
    array = np.asarray(value)
  except (ValueError, TypeError):
    raise RequestError(f"input '{name}' is ragged (nested lists of different lengths, first "
                       f'sizes {_shape_of(value)}); it must be {spec.describe()}.') from None
  kind = array.dtype.kind
  if kind == 'O':
    raise RequestError(f"input '{name}' must be nested lists of numbers, {spec.describe()}; it "
                       'holds other values (null, objects or integers out of range).')
  if kind in 'USb':
    what = 'booleans' if kind == 'b' else 'strings'
    raise RequestError(f"input '{name}' holds {what}; it must be numbers, {spec.describe()}.")
  if spec.dtype.kind in 'iu' and kind == 'f':
    if np.isfinite(array).all() and (array == np.round(array)).all():
      pass  # 3.0 is an integer in JSON's eyes too.
    else:
      raise RequestError(f"input '{name}' must be integers, {spec.describe()}; it holds "
                         'fractions (use serving_default for floats in [0, 1]).')
  if kind == 'f' and not np.isfinite(array).all():
    bad = int((~np.isfinite(array)).sum())
    raise RequestError(f"input '{name}' has {bad} NaN or infinite value(s).")
  shape = array.shape
  if spec.batched and shape and shape[0] == 0:
    raise RequestError(f"input '{name}' is an empty batch: send at least one example.")
  if len(shape) != len(spec.shape) or any(
      d is not None and d != s for d, s in zip(spec.shape, shape)):
    raise RequestError(f"input '{name}' has shape {list(shape)}; it must be {spec.describe()}.")
  if array.size and (array.min() < spec.low or array.max() > spec.high):
    raise RequestError(
        f"input '{name}' has values in [{array.min():g}, {array.max():g}], outside "
        f'[{spec.low:g}, {spec.high:g}]' + (' (float images are pixel / 255)'
                                           if spec.dtype.kind == 'f' and name == 'images' else '')
        + '.')
  return array.astype(spec.dtype)


def parse_predict_request(body, specs, max_batch_size):
  """Validates a decoded :predict body against the served signatures.

  Args:
    body: the decoded JSON value.
    specs: {signature name: {input name: InputSpec}}.
    max_batch_size: the largest batch accepted.

  Returns:
    (signature name, {input name: numpy array}, row_format: bool).
  """
  if not isinstance(body, dict):
    raise RequestError('The body must be a JSON object with "instances" (row format) or '
                       f'"inputs" (columnar format), got a JSON {type(body).__name__}.')
  unknown = sorted(set(body) - set(REQUEST_KEYS))
  if unknown:
    raise RequestError(f'Unknown key(s) {unknown} in the body; accepted: {list(REQUEST_KEYS)}.')
  name = body.get('signature_name', DEFAULT_SIGNATURE)
  if not isinstance(name, str) or name not in specs:
    raise RequestError(f'Unknown signature_name {name!r}; this model has {sorted(specs)}.')
  spec = specs[name]
  if ('instances' in body) == ('inputs' in body):
    raise RequestError('The body must have exactly one of "instances" (row format) and "inputs" '
                       '(columnar format).')
  row_format = 'instances' in body
  if row_format:
    values = _rows_to_columns(body['instances'], spec, name)
  else:
    values = body['inputs']
    if not isinstance(values, dict):
      if len(spec) != 1:
        raise RequestError(f'Signature {name!r} takes several inputs {sorted(spec)}: "inputs" '
                           'must be an object keyed by input name.')
      values = {next(iter(spec)): values}
    missing, extra = sorted(set(spec) - set(values)), sorted(set(values) - set(spec))
    if missing or extra:
      raise RequestError(f'Signature {name!r} takes the inputs {sorted(spec)}; missing '
                         f'{missing}, unknown {extra}.')
  arrays = {key: to_array(key, values[key], spec[key]) for key in sorted(spec)}
  batches = {key: a.shape[0] for key, a in arrays.items() if spec[key].batched}
  if len(set(batches.values())) > 1:
    raise RequestError(f'The batched inputs have different batch sizes {batches}.')
  if batches and max(batches.values()) > max_batch_size:
    raise RequestError(f'Batch of {max(batches.values())} examples exceeds the server limit of '
                       f'{max_batch_size}; split the request.')
  return name, arrays, row_format


def _rows_to_columns(instances, spec, name):
  """Row format: a list of examples (bare values, or objects keyed by input name) -> columns."""
  if not isinstance(instances, list):
    raise RequestError(f'"instances" must be a list of examples, got a JSON '
                       f'{type(instances).__name__}.')
  if not instances:
    raise RequestError('"instances" is an empty batch: send at least one example.')
  scalars = sorted(k for k, s in spec.items() if not s.batched)
  if scalars:
    raise RequestError(f'Signature {name!r} has non-batched input(s) {scalars}: use the columnar '
                       'format {"inputs": {...}}.')
  keyed = [isinstance(x, dict) for x in instances]
  if any(keyed) and not all(keyed):
    raise RequestError('"instances" mixes objects and bare values; use one form.')
  if not keyed[0]:
    if len(spec) != 1:
      raise RequestError(f'Signature {name!r} takes several inputs {sorted(spec)}: each instance '
                         'must be an object keyed by input name.')
    return {next(iter(spec)): instances}
  columns = {key: [] for key in spec}
  for i, instance in enumerate(instances):
    if set(instance) != set(spec):
      raise RequestError(f'Instance {i} has the keys {sorted(instance)}; signature {name!r} '
                         f'takes {sorted(spec)}.')
    for key in spec:
      columns[key].append(instance[key])
  return columns


def format_response(outputs, row_format):
  """TF Serving's response: {"predictions": [per example]} or {"outputs": {name: batch}}."""
  lists = {k: v.tolist() for k, v in sorted(outputs.items())}
  if not row_format:
    return {'outputs': lists if len(lists) > 1 else next(iter(lists.values()))}
  n = len(next(iter(lists.values())))
  if len(lists) == 1:
    return {'predictions': next(iter(lists.values()))}
  return {'predictions': [{k: v[i] for k, v in lists.items()} for i in range(n)]}


# ----------------------------------------------------------------------------------------------
# The WSGI app.
# ----------------------------------------------------------------------------------------------


class _ModelNameConverter(routing.BaseConverter):
  regex = '[^/:]+'  # Stops before ':predict'.


class RestApp:
  """The REST API as a WSGI app around a ServedModel (werkzeug Request/Response)."""

  def __init__(self, model, model_name, *, max_body_bytes=16 << 20, max_batch_size=1024):
    if not model_name or '/' in model_name or ':' in model_name:
      raise ValueError(f'model_name must be non-empty without "/" or ":", got {model_name!r}.')
    if max_body_bytes < 1 or max_batch_size < 1:
      raise ValueError(f'max_body_bytes and max_batch_size must be >= 1, got {max_body_bytes}, '
                       f'{max_batch_size}.')
    self.model = model
    self.model_name = model_name
    self.max_body_bytes = max_body_bytes
    self.max_batch_size = max_batch_size
    base, version = '/v1/models/<name:name>', '/v1/models/<name:name>/versions/<int:version>'
    rules = []
    for prefix in (base, version):
      rules += [routing.Rule(prefix, endpoint='status', methods=['GET']),
                routing.Rule(prefix + '/metadata', endpoint='metadata', methods=['GET']),
                routing.Rule(prefix + ':predict', endpoint='predict', methods=['POST'])]
    self.url_map = routing.Map(rules, converters={'name': _ModelNameConverter})

  def __call__(self, environ, start_response):
    request = wrappers.Request(environ)
    request.max_content_length = self.max_body_bytes
    try:
      endpoint, args = self.url_map.bind_to_environ(environ).match()
      self._check_model(args['name'], args.get('version'))
      status, body = getattr(self, '_' + endpoint)(request)
    except RequestError as e:
      status, body = e.code, {'error': str(e)}
    except exceptions.RequestEntityTooLarge:
      status, body = 413, {'error': f'The request body exceeds the limit of '
                                    f'{self.max_body_bytes} bytes; send smaller batches.'}
    except exceptions.MethodNotAllowed as e:
      status, body = 405, {'error': f'{request.method} is not allowed on {request.path}; use '
                                    f'{", ".join(sorted(e.valid_methods or []))}.'}
    except exceptions.NotFound:
      status, body = 404, {'error': f'No endpoint {request.path}; the API is /v1/models/'
                                    f'{self.model_name}[/versions/N][/metadata|:predict].'}
    except exceptions.HTTPException as e:
      status, body = e.code, {'error': e.description}
    except tf.errors.InvalidArgumentError as e:  # The graph's own checks; validation should win.
      status, body = 400, {'error': f'The model refused the input: {e.message}'}
    except Exception as e:  # pylint: disable=broad-except
      logging.exception('Internal error on %s %s', request.method, request.path)
      status, body = 500, {'error': f'Internal error: {type(e).__name__}: {e}'}
    response = wrappers.Response(json.dumps(body), status=status, mimetype='application/json')
    return response(environ, start_response)

  def _check_model(self, name, version):
    if name != self.model_name:
      raise RequestError(f'Model {name!r} not found; this server serves {self.model_name!r}.', 404)
    if version is not None and version != self.model.version:
      raise RequestError(f'Version {version} of {name!r} is not loaded; the server serves '
                         f'version {self.model.version}.', 404)

  def _status(self, request):
    del request
    return 200, {'model_version_status': [{
        'version': str(self.model.version), 'state': 'AVAILABLE',
        'status': {'error_code': 'OK', 'error_message': ''}}]}

  def _metadata(self, request):
    del request
    acet = dict(self.model.metadata)
    acet['threshold'] = dict(acet['threshold'], current=self.model.threshold)
    return 200, {
        'model_spec': {'name': self.model_name, 'signature_name': '',
                       'version': str(self.model.version)},
        'metadata': {'signature_def': {'signature_def': self.model.signature_defs},
                     'acet_tf': acet},
    }

  def _predict(self, request):
    data = request.get_data(cache=False)  # Raises RequestEntityTooLarge past the cap.
    try:
      body = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError.
      raise RequestError(f'The body is not valid JSON: {e}') from None
    name, arrays, row_format = parse_predict_request(body, self.model.specs, self.max_batch_size)
    return 200, format_response(self.model.predict(name, arrays), row_format)


def create_app(export_dir, model_name, *, version=None, threshold=None, max_body_bytes=16 << 20,
               max_batch_size=1024):
  """Loads the export and returns its RestApp (a WSGI callable)."""
  model = ServedModel(export_dir, version=version, threshold=threshold)
  return RestApp(model, model_name, max_body_bytes=max_body_bytes, max_batch_size=max_batch_size)


# ----------------------------------------------------------------------------------------------
# Running the server.
# ----------------------------------------------------------------------------------------------


class _RequestHandler(serving.WSGIRequestHandler):
  timeout = SOCKET_TIMEOUT_S


def serve(wsgi_app, host, port, *, description=''):
  """Serves `wsgi_app` on host:port, one thread per request, until SIGTERM or SIGINT.

  Call from the main thread. On the signal it stops accepting, finishes the requests in flight,
  closes the socket and returns.
  """
  server = serving.make_server(host, port, wsgi_app, threaded=True,
                               request_handler=_RequestHandler)
  server.daemon_threads = False  # So server_close() waits for the requests in flight.
  stop = threading.Event()
  previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
  thread = threading.Thread(target=server.serve_forever, name='serve_forever')
  thread.start()
  logging.info('Serving %s at http://%s:%d', description, host, server.port)
  try:
    while not stop.wait(0.5):
      pass
    logging.info('Signal received: shutting down.')
  finally:
    server.shutdown()  # Returns once serve_forever has stopped.
    thread.join()
    server.server_close()
    for s, handler in previous.items():
      signal.signal(s, handler)
  logging.info('Server stopped.')


def define_flags():
  """The binary's flags. Defined only when run as a program: acet_tf.export has flags of the same
  names, and both modules are imported together (tests, tools)."""
  flags.DEFINE_string('export_dir', None, 'Base directory of an export (versions below it).')
  flags.DEFINE_string('model_name', None, 'NAME in /v1/models/NAME.')
  flags.DEFINE_string('host', '127.0.0.1', 'Interface to bind; 0.0.0.0 exposes the server.')
  flags.DEFINE_integer('port', 8501, 'TCP port; 0 picks a free one (logged at start).')
  flags.DEFINE_float('threshold', None, 'Overrides the stored threshold, in [0, 1].')
  flags.DEFINE_integer('max_body_bytes', 16 << 20, 'Larger request bodies get 413.')
  flags.DEFINE_integer('max_batch_size', 1024, 'Larger batches get 400.')


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not f.export_dir or not f.model_name:
    raise app.UsageError('--export_dir and --model_name are required.')
  rest = create_app(f.export_dir, f.model_name, threshold=f.threshold,
                    max_body_bytes=f.max_body_bytes, max_batch_size=f.max_batch_size)
  serve(rest, f.host, f.port, description=(
      f'model {f.model_name!r} version {rest.model.version} from {rest.model.path}, threshold '
      f'{rest.model.threshold:.6f},'))


if __name__ == '__main__':
  define_flags()
  app.run(main)
