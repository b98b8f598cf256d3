"""Serves an exported abstaining classifier over TensorFlow Serving's REST API (a subset); the
binary is acet_tf/serve.py, this module reads no flags.

Serves the newest complete version(s) below --export_dir, watching it for new ones
(serving_versions), and answers
  GET  /v1/models/NAME[/versions/N]            status of every (or that) version, with its state
  GET  /v1/models/NAME[/versions/N]/metadata   signature defs, plus the export's metadata
  POST /v1/models/NAME[/versions/N]:predict    {"instances": [...]} -> {"predictions": [...]}
                                               {"inputs": ...} -> {"outputs": {...}}
  GET  /monitoring/prometheus/metrics          Prometheus text (serving_metrics)
with an optional "signature_name" (serving_default, serving_uint8, with_threshold or
serving_image_bytes) in the body. serving_image_bytes takes TF Serving's encoding of DT_STRING
values, {"b64": "<base64 of a PNG, JPEG, GIF or BMP file>"}, in both formats. Every request is
validated against the signature (shape, dtype, finite values, value range, batch size, decodable
images) before or when the model runs; a bad one gets a 4xx with {"error": "..."} naming the
problem (and the instance of a bad image) and the server goes on. With --enable_batching,
concurrent requests are merged into one model call (serving_batcher); a full queue gets 503.
The HTTP layer is cheroot (keep-alive, a fixed worker pool, socket timeouts); SIGTERM or SIGINT
stops it after the requests in flight are answered.

Needs nothing of the training code: it reads only the SavedModel and its metadata asset.
The parts are ServedModel (one loaded version), RestApp (the
WSGI app, usable in-process), create_app and serve (runs a WSGI app until a signal).
"""

import base64
import binascii
import dataclasses
import functools
import gc
import json
import os
import signal
import struct
import threading
import time

from absl import logging
from cheroot import wsgi
from google.protobuf import json_format
import numpy as np
import orjson
import tensorflow as tf
from werkzeug import exceptions
from werkzeug import routing
from werkzeug import wrappers

from acet_tf.artifacts import export_layout
from acet_tf.serving import dynamic_batching
from acet_tf.serving import model_versions
from acet_tf.serving import monitoring

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

  @property
  def is_string(self):
    return self.dtype.kind == 'O'  # DT_STRING: encoded image files.

  def describe(self):
    dims = ', '.join('batch' if d is None else str(d) for d in self.shape)
    if self.is_string:
      return f'DT_STRING [{dims}] of {{"b64": base64 of a PNG, JPEG, GIF or BMP file}}'
    return f'{self.dtype.name} [{dims}] in [{self.low:g}, {self.high:g}]'


class ServedModel:
  """One version of an export, loaded: its signatures, input specs, metadata and threshold."""

  def __init__(self, export_dir, *, version=None, threshold=None):
    """Loads `version` (default: the newest complete one) of `export_dir`.

    `threshold` overrides the stored one. Raises FileNotFoundError if there is no such complete
    version, ValueError for a bad threshold or an export without acet_tf metadata.
    """
    versions = export_layout.complete_versions(export_dir)
    if version is None and not versions:
      raise FileNotFoundError(
        f'No complete version in {export_dir} (found {export_layout.list_versions(export_dir)};'
        f' complete means {export_layout.MANIFEST} lists every file, see serving_layout).'
      )
    if version is not None and version not in versions:
      raise FileNotFoundError(
        f'Version {version} is not a complete version of {export_dir}; it has {versions}.'
      )
    self.load(
      os.path.join(export_dir, str(versions[-1] if version is None else version)), threshold
    )

  @classmethod
  def from_version_dir(cls, path, threshold=None):
    """Loads EXPORT/<version> directly (ModelVersions' loader)."""
    model = cls.__new__(cls)
    model.load(path, threshold)
    return model

  def load(self, path, threshold):
    self.path = path
    self.version = int(os.path.basename(os.path.normpath(path)))
    self._saved = tf.saved_model.load(self.path)
    if not hasattr(self._saved, 'metadata') or not hasattr(self._saved, 'set_threshold'):
      raise ValueError(
        f'{self.path} has no metadata asset or set_threshold: not an acet_tf '
        'export (acet_tf.export writes them).'
      )
    with tf.io.gfile.GFile(self._saved.metadata.asset_path.numpy().decode()) as f:
      self.metadata = json.load(f)
    self.specs = {name: self._input_specs(name) for name in self.metadata['signatures']}
    self.signature_defs = self._signature_defs()
    self._functions = {name: self._saved.signatures[name] for name in self.specs}
    if threshold is not None:
      self.set_threshold(threshold)

  def _input_specs(self, name):
    if name not in self._saved.signatures:
      raise ValueError(
        f'The metadata of {self.path} names signature {name!r}, which the '
        f'SavedModel lacks (it has {sorted(self._saved.signatures)}).'
      )
    ranges = self.metadata['signatures'][name]['inputs']
    _, kwargs = self._saved.signatures[name].structured_input_signature
    if set(kwargs) != set(ranges):
      raise ValueError(
        f'Signature {name!r} takes {sorted(kwargs)} but the metadata gives ranges '
        f'for {sorted(ranges)}.'
      )
    specs = {}
    for key, spec in kwargs.items():
      if spec.dtype == tf.string:
        specs[key] = InputSpec(np.dtype(object), tuple(spec.shape.as_list()), None, None)
      else:
        specs[key] = InputSpec(
          np.dtype(spec.dtype.as_numpy_dtype), tuple(spec.shape.as_list()), *ranges[key]
        )
    return specs

  def _signature_defs(self):
    """The served signatures as TensorFlow Serving's metadata shows them (SignatureDef JSON)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(self.path, 'saved_model.pb'), 'rb') as f:
      proto.ParseFromString(f.read())
    defs = proto.meta_graphs[0].signature_def
    return {
      name: json_format.MessageToDict(defs[name], preserving_proto_field_name=True)
      for name in self.specs
    }

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

    Returns {output name: numpy array with the batch first}. A file of an encoded-image input
    that does not decode raises RequestError naming the instance.
    """
    try:
      outputs = self._functions[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
    except tf.errors.InvalidArgumentError as e:
      for key, spec in self.specs[signature_name].items():
        if spec.is_string:
          _raise_for_bad_image(key, inputs[key])
      raise RequestError(f'The model refused the input: {e.message}') from None
    # String outputs (class_name) as str, which JSON can carry, as TF Serving returns them.
    return {
      k: (
        np.char.decode(v.numpy().astype(np.bytes_), 'utf-8') if v.dtype == tf.string else v.numpy()
      )
      for k, v in outputs.items()
    }


def _raise_for_bad_image(name, files):
  """RequestError naming the first file of `files` (bytes [n]) that tf.io.decode_image refuses."""
  for i, data in enumerate(files):
    try:
      tf.io.decode_image(data, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
      raise RequestError(
        f"instance {i} of '{name}' is not a decodable image: {e.message.splitlines()[0]}"
      ) from None


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


# The first bytes of the formats tf.io.decode_image reads.
_IMAGE_MAGIC = (b'\x89PNG\r\n\x1a\n', b'\xff\xd8\xff', b'GIF87a', b'GIF89a', b'BM')


# Decoding makes a float32 copy of each image: 4 Mpx is 48 MB in RGB, so a small file that claims
# a huge size (a decompression bomb) is refused before the model runs.
MAX_IMAGE_PIXELS = 1 << 22


def image_pixels(data):
  """Width x height an image file's header claims (PNG, GIF, BMP: fixed offsets; JPEG: TF's own
  header reader). None if the header is too short or unreadable (the decoder then names it)."""
  try:
    if data.startswith(b'\x89PNG'):
      width, height = struct.unpack('>II', data[16:24])
    elif data.startswith(b'GIF'):
      width, height = struct.unpack('<HH', data[6:10])
    elif data.startswith(b'BM'):
      width, height = struct.unpack('<ii', data[18:26])
    else:
      height, width = tf.image.extract_jpeg_shape(data).numpy()[:2]
  except (struct.error, tf.errors.InvalidArgumentError):
    return None
  return abs(int(width)) * abs(int(height))


def _is_b64(value):
  return isinstance(value, dict) and len(value) == 1 and 'b64' in value


def to_bytes_array(name, value, spec):
  """A batch of TF Serving {"b64": ...} values -> object array of bytes [n]; RequestError naming
  the instance otherwise (not an object with "b64", not base64, not an image format, too many
  pixels)."""
  if not isinstance(value, list):
    raise RequestError(
      f"input '{name}' must be a list, {spec.describe()}; got a JSON {type(value).__name__}."
    )
  if not value:
    raise RequestError(f"input '{name}' is an empty batch: send at least one example.")
  files = np.empty(len(value), dtype=object)
  for i, item in enumerate(value):
    if not _is_b64(item) or not isinstance(item['b64'], str):
      raise RequestError(
        f'instance {i} of \'{name}\' must be {{"b64": "<base64 of the file>"}} '
        "(TF Serving's encoding of DT_STRING values), got "
        f'{json.dumps(item)[:60]}.'
      )
    try:
      data = base64.b64decode(item['b64'], validate=True)
    except (binascii.Error, ValueError) as e:
      raise RequestError(f"instance {i} of '{name}' is not valid base64: {e}.") from None
    if not data.startswith(_IMAGE_MAGIC):
      raise RequestError(
        f"instance {i} of '{name}' is not a PNG, JPEG, GIF or BMP file (it "
        f'starts with {data[:8]!r}).'
      )
    pixels = image_pixels(data)
    if pixels is not None and pixels > MAX_IMAGE_PIXELS:
      raise RequestError(
        f"instance {i} of '{name}' claims {pixels} pixels, more than the server's "
        f'limit of {MAX_IMAGE_PIXELS}; send smaller images.'
      )
    files[i] = data
  return files


def to_array(name, value, spec):
  """A JSON value -> numpy array of spec.dtype; RequestError saying what is wrong otherwise."""
  if spec.is_string:
    return to_bytes_array(name, value, spec)
  try:
    array = np.asarray(value)
  except (ValueError, TypeError):
    raise RequestError(
      f"input '{name}' is ragged (nested lists of different lengths, first "
      f'sizes {_shape_of(value)}); it must be {spec.describe()}.'
    ) from None
  kind = array.dtype.kind
  if kind == 'O':
    raise RequestError(
      f"input '{name}' must be nested lists of numbers, {spec.describe()}; it "
      'holds other values (null, objects or integers out of range).'
    )
  if kind in 'USb':
    what = 'booleans' if kind == 'b' else 'strings'
    raise RequestError(f"input '{name}' holds {what}; it must be numbers, {spec.describe()}.")
  if spec.dtype.kind in 'iu' and kind == 'f':
    if np.isfinite(array).all() and (array == np.round(array)).all():
      pass  # 3.0 is an integer in JSON's eyes too.
    else:
      raise RequestError(
        f"input '{name}' must be integers, {spec.describe()}; it holds "
        'fractions (use serving_default for floats in [0, 1]).'
      )
  if kind == 'f' and not np.isfinite(array).all():
    bad = int((~np.isfinite(array)).sum())
    raise RequestError(f"input '{name}' has {bad} NaN or infinite value(s).")
  shape = array.shape
  if spec.batched and shape and shape[0] == 0:
    raise RequestError(f"input '{name}' is an empty batch: send at least one example.")
  if len(shape) != len(spec.shape) or any(
    d is not None and d != s for d, s in zip(spec.shape, shape)
  ):
    raise RequestError(f"input '{name}' has shape {list(shape)}; it must be {spec.describe()}.")
  if array.size and (array.min() < spec.low or array.max() > spec.high):
    raise RequestError(
      f"input '{name}' has values in [{array.min():g}, {array.max():g}], outside "
      f'[{spec.low:g}, {spec.high:g}]'
      + (' (float images are pixel / 255)' if spec.dtype.kind == 'f' and name == 'images' else '')
      + '.'
    )
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
    raise RequestError(
      'The body must be a JSON object with "instances" (row format) or '
      f'"inputs" (columnar format), got a JSON {type(body).__name__}.'
    )
  unknown = sorted(set(body) - set(REQUEST_KEYS))
  if unknown:
    raise RequestError(f'Unknown key(s) {unknown} in the body; accepted: {list(REQUEST_KEYS)}.')
  name = body.get('signature_name', DEFAULT_SIGNATURE)
  if not isinstance(name, str) or name not in specs:
    raise RequestError(f'Unknown signature_name {name!r}; this model has {sorted(specs)}.')
  spec = specs[name]
  if ('instances' in body) == ('inputs' in body):
    raise RequestError(
      'The body must have exactly one of "instances" (row format) and "inputs" (columnar format).'
    )
  row_format = 'instances' in body
  if row_format:
    values = _rows_to_columns(body['instances'], spec, name)
  else:
    values = body['inputs']
    if not isinstance(values, dict):
      if len(spec) != 1:
        raise RequestError(
          f'Signature {name!r} takes several inputs {sorted(spec)}: "inputs" '
          'must be an object keyed by input name.'
        )
      values = {next(iter(spec)): values}
    missing, extra = sorted(set(spec) - set(values)), sorted(set(values) - set(spec))
    if missing or extra:
      raise RequestError(
        f'Signature {name!r} takes the inputs {sorted(spec)}; missing {missing}, unknown {extra}.'
      )
  arrays = {key: to_array(key, values[key], spec[key]) for key in sorted(spec)}
  batches = {key: a.shape[0] for key, a in arrays.items() if spec[key].batched}
  if len(set(batches.values())) > 1:
    raise RequestError(f'The batched inputs have different batch sizes {batches}.')
  if batches and max(batches.values()) > max_batch_size:
    raise RequestError(
      f'Batch of {max(batches.values())} examples exceeds the server limit of '
      f'{max_batch_size}; split the request.'
    )
  return name, arrays, row_format


def _rows_to_columns(instances, spec, name):
  """Row format: a list of examples (bare values, or objects keyed by input name) -> columns."""
  if not isinstance(instances, list):
    raise RequestError(
      f'"instances" must be a list of examples, got a JSON {type(instances).__name__}.'
    )
  if not instances:
    raise RequestError('"instances" is an empty batch: send at least one example.')
  scalars = sorted(k for k, s in spec.items() if not s.batched)
  if scalars:
    raise RequestError(
      f'Signature {name!r} has non-batched input(s) {scalars}: use the columnar '
      'format {"inputs": {...}}.'
    )
  keyed = [isinstance(x, dict) and not _is_b64(x) for x in instances]
  if any(keyed) and not all(keyed):
    raise RequestError('"instances" mixes objects and bare values; use one form.')
  if not keyed[0]:
    if len(spec) != 1:
      raise RequestError(
        f'Signature {name!r} takes several inputs {sorted(spec)}: each instance '
        'must be an object keyed by input name.'
      )
    return {next(iter(spec)): instances}
  columns = {key: [] for key in spec}
  for i, instance in enumerate(instances):
    if set(instance) != set(spec):
      raise RequestError(
        f'Instance {i} has the keys {sorted(instance)}; signature {name!r} takes {sorted(spec)}.'
      )
    for key in spec:
      columns[key].append(instance[key])
  return columns


def decode_json(data):
  """Request body bytes -> JSON value. orjson first (C, several times faster than json); a body it
  refuses is read again by json, which also takes NaN and Infinity, as TF Serving's parser does, so
  that validation can name them."""
  try:
    return orjson.loads(data)
  except orjson.JSONDecodeError as e:
    if 'recursion' in str(e):  # Nesting past orjson's limit (1024): refused, not parsed again.
      raise RequestError(f'The body is not valid JSON: {e}') from None
  try:
    return json.loads(data)
  except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError.
    raise RequestError(f'The body is not valid JSON: {e}') from None


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


METRICS_PATH = '/monitoring/prometheus/metrics'


class RestApp:
  """The REST API as a WSGI app around the served versions (werkzeug Request/Response).

  Args:
    versions: a model_versions.ModelVersions (or a single ServedModel, served alone).
    model_name: NAME in /v1/models/NAME.
    max_body_bytes, max_batch_size: larger bodies get 413, larger batches 400.
    batcher: a dynamic_batching.Batcher for dynamic batching, or None (one model call a request).
    metrics: a monitoring.ServingMetrics (a new one by default).
  """

  def __init__(
    self,
    versions,
    model_name,
    *,
    max_body_bytes=16 << 20,
    max_batch_size=1024,
    batcher=None,
    metrics=None,
  ):
    if not model_name or '/' in model_name or ':' in model_name:
      raise ValueError(f'model_name must be non-empty without "/" or ":", got {model_name!r}.')
    if max_body_bytes < 1 or max_batch_size < 1:
      raise ValueError(
        f'max_body_bytes and max_batch_size must be >= 1, got {max_body_bytes}, {max_batch_size}.'
      )
    if isinstance(versions, ServedModel):
      versions = _SingleVersion(versions)
    self.versions = versions
    self.model_name = model_name
    self.max_body_bytes = max_body_bytes
    self.max_batch_size = max_batch_size
    self.batcher = batcher
    self.metrics = metrics or monitoring.ServingMetrics()
    base, version = '/v1/models/<name:name>', '/v1/models/<name:name>/versions/<int:version>'
    rules = [routing.Rule(METRICS_PATH, endpoint='metrics', methods=['GET'])]
    for prefix in (base, version):
      rules += [
        routing.Rule(prefix, endpoint='status', methods=['GET']),
        routing.Rule(prefix + '/metadata', endpoint='metadata', methods=['GET']),
        routing.Rule(prefix + ':predict', endpoint='predict', methods=['POST']),
      ]
    self.url_map = routing.Map(rules, converters={'name': _ModelNameConverter})

  @property
  def model(self):
    """The newest served version."""
    return self.versions.get()

  def __call__(self, environ, start_response):
    started = time.perf_counter()
    request = wrappers.Request(environ)
    request.max_content_length = self.max_body_bytes
    endpoint, mimetype = 'unknown', 'application/json'
    try:
      endpoint, args = self.url_map.bind_to_environ(environ).match()
      if endpoint == 'metrics':
        status, body, mimetype = 200, self.metrics.render(), monitoring.CONTENT_TYPE
      else:
        self._check_name(args['name'])
        status, body = getattr(self, '_' + endpoint)(request, args.get('version'))
    except RequestError as e:
      status, body = e.code, {'error': str(e)}
    except model_versions.VersionNotFoundError as e:
      status, body = 404, {'error': str(e)}
    except dynamic_batching.QueueFullError as e:
      status, body = 503, {'error': str(e)}
    except exceptions.RequestEntityTooLarge:
      status, body = (
        413,
        {
          'error': f'The request body exceeds the limit of '
          f'{self.max_body_bytes} bytes; send smaller batches.'
        },
      )
    except exceptions.MethodNotAllowed as e:
      status, body = (
        405,
        {
          'error': f'{request.method} is not allowed on {request.path}; use '
          f'{", ".join(sorted(e.valid_methods or []))}.'
        },
      )
    except exceptions.NotFound:
      status, body = (
        404,
        {
          'error': f'No endpoint {request.path}; the API is /v1/models/'
          f'{self.model_name}[/versions/N][/metadata|:predict] and '
          f'{METRICS_PATH}.'
        },
      )
    except exceptions.HTTPException as e:
      status, body = e.code, {'error': e.description}
    except Exception as e:  # Deliberately broad: any failure is reported, not fatal.
      logging.exception('Internal error on %s %s', request.method, request.path)
      status, body = 500, {'error': f'Internal error: {type(e).__name__}: {e}'}
    if not isinstance(body, bytes):
      body = orjson.dumps(body)
    response = wrappers.Response(body, status=status, mimetype=mimetype)
    result = response(environ, start_response)
    self.metrics.observe_request(endpoint, status, time.perf_counter() - started)
    return result

  def _check_name(self, name):
    if name != self.model_name:
      raise RequestError(f'Model {name!r} not found; this server serves {self.model_name!r}.', 404)

  def _status(self, request, version):
    del request
    return 200, {'model_version_status': self.versions.status(version)}

  def _metadata(self, request, version):
    del request
    model = self.versions.get(version)
    acet = dict(model.metadata)
    acet['threshold'] = dict(acet['threshold'], current=model.threshold)
    return 200, {
      'model_spec': {'name': self.model_name, 'signature_name': '', 'version': str(model.version)},
      'metadata': {'signature_def': {'signature_def': model.signature_defs}, 'acet_tf': acet},
    }

  def _predict(self, request, version):
    data = request.get_data(cache=False)  # Raises RequestEntityTooLarge past the cap.
    body = decode_json(data)
    model = self.versions.get(version)  # Held to the end: a version switch cannot cut it off.
    name, arrays, row_format = parse_predict_request(body, model.specs, self.max_batch_size)
    outputs = self._run(model, name, arrays)
    if 'accepted' in outputs:
      self.metrics.observe_decisions(model.version, name, outputs['accepted'])
    return 200, format_response(outputs, row_format)

  def _run(self, model, name, arrays):
    specs = model.specs[name]
    size = len(next(iter(arrays.values())))
    batchable = all(s.batched for s in specs.values())
    if self.batcher is None or not batchable or size > self.batcher.max_batch_size:
      self.metrics.batch_size.labels(name).observe(size)
      return model.predict(name, arrays)
    return self.batcher.run((id(model), name), functools.partial(model.predict, name), arrays, size)

  def on_batch(self, key, size):
    """Batcher callback: one merged model call of `size` examples."""
    self.metrics.batch_size.labels(key[1]).observe(size)


class _SingleVersion:
  """ModelVersions' interface over one loaded ServedModel (no directory watching)."""

  def __init__(self, model):
    self._model = model

  def get(self, version=None):
    if version is not None and version != self._model.version:
      raise model_versions.VersionNotFoundError(
        f'Version {version} is not served; the server serves version(s) [{self._model.version}].'
      )
    return self._model

  def status(self, version=None):
    self.get(version)
    return [
      {
        'version': str(self._model.version),
        'state': 'AVAILABLE',
        'status': {'error_code': 'OK', 'error_message': ''},
      }
    ]

  def close(self):
    pass


def freeze_gc():
  """Moves every object alive now (TensorFlow's and the loaded model's, about a million) out of
  the garbage collector's sight. Decoding a float batch makes ~50,000 lists, enough to set off
  full collections, and each scanned all of them: 300 ms instead of 13 ms per 64 images here.
  A larger first-generation threshold (20,000 allocations, not 700) takes a further third off.
  Called again after each version change: unfreezing first lets a full collection free the cycles
  of an unloaded version (a pause of a fraction of a second, once per change)."""
  gc.unfreeze()
  gc.collect()
  gc.freeze()
  gc.set_threshold(20_000, 20, 10)


def create_app(
  export_dir,
  model_name,
  *,
  version=None,
  threshold=None,
  max_body_bytes=16 << 20,
  max_batch_size=1024,
  keep_versions=1,
  poll_interval_s=0.0,
  batching=None,
  tune_gc=False,
):
  """Loads the export and returns its RestApp (a WSGI callable).

  version: serve only this version (no watching); otherwise the newest `keep_versions`, polled
  every `poll_interval_s` seconds (0: loaded once). batching: None, or a dict of
  dynamic_batching.Batcher's arguments (max_batch_size, batch_timeout_micros, num_batch_threads,
  max_enqueued_batches). tune_gc: freeze_gc() after each load (process-wide, so for the server
  binary, not for a library caller).
  """
  after_load = freeze_gc if tune_gc else (lambda: None)
  metrics = monitoring.ServingMetrics()
  if version is not None:
    versions = _SingleVersion(ServedModel(export_dir, version=version, threshold=threshold))
    metrics.observe_versions({version: ('AVAILABLE', '')})
    after_load()
  else:
    versions = model_versions.ModelVersions(
      export_dir,
      functools.partial(ServedModel.from_version_dir, threshold=threshold),
      keep=keep_versions,
      poll_interval_s=poll_interval_s,
      on_change=lambda states: (metrics.observe_versions(states), after_load()),
    )
  rest = RestApp(
    versions,
    model_name,
    max_body_bytes=max_body_bytes,
    max_batch_size=max_batch_size,
    metrics=metrics,
  )
  if batching is not None:
    rest.batcher = dynamic_batching.Batcher(
      on_batch=rest.on_batch, on_queue=metrics.queue.set, **batching
    )
  return rest


def close_app(rest):
  """Stops the app's threads: the batcher after running what is queued, the version polling."""
  if rest.batcher is not None:
    rest.batcher.close()
  rest.versions.close()


# ----------------------------------------------------------------------------------------------
# Running the server.
# ----------------------------------------------------------------------------------------------


def serve(
  wsgi_app,
  host,
  port,
  *,
  num_threads=32,
  socket_timeout_s=SOCKET_TIMEOUT_S,
  keep_alive_limit=64,
  shutdown_timeout_s=60.0,
  description='',
  on_stop=None,
):
  """Serves `wsgi_app` on host:port with cheroot until SIGTERM or SIGINT.

  cheroot: HTTP/1.1 keep-alive (up to keep_alive_limit idle connections kept), a fixed pool of
  num_threads workers (further connections wait in the listen backlog), socket_timeout_s for a
  client that stops sending or an idle kept-alive connection. Call from the main thread. On the
  signal it stops accepting, lets the workers finish the requests in flight (up to
  shutdown_timeout_s), calls on_stop() and returns.
  """
  server = wsgi.Server(
    (host, port),
    wsgi_app,
    numthreads=num_threads,
    max=num_threads,
    timeout=socket_timeout_s,
    shutdown_timeout=shutdown_timeout_s,
    request_queue_size=max(64, num_threads),
  )
  server.keep_alive_conn_limit = keep_alive_limit
  server.prepare()  # Binds: port 0 becomes a real port.
  stop = threading.Event()
  previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
  thread = threading.Thread(target=server.serve, name='cheroot')
  thread.start()
  logging.info('Serving %s at http://%s:%d', description, host, server.bind_addr[1])
  try:
    while not stop.wait(0.5) and thread.is_alive():
      pass
    logging.info('Signal received: shutting down.')
  finally:
    server.stop()  # Closes the socket, then joins the workers as they finish their requests.
    thread.join()
    if on_stop is not None:
      on_stop()
    for s, handler in previous.items():
      signal.signal(s, handler)
  logging.info('Server stopped.')
