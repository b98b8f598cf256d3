"""TF Serving's REST request and response bodies <-> the arrays a ServedModel takes and gives.

The decode and encode steps around a model call, knowing nothing of HTTP: JSON parsing, the
"instances" (row) and "inputs" (columnar) formats, {"b64": ...} image bytes, and validation of
every input against the signature's InputSpec (shape, dtype, finite values, range, batch size,
image headers) before the model runs; a bad request raises served_model.RequestError.
"""

import base64
import binascii
import json
import struct

import numpy as np
import orjson
import tensorflow as tf

from acet_tf.serving import served_model

REQUEST_KEYS = ('instances', 'inputs', 'signature_name')


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
    raise served_model.RequestError(
      f"input '{name}' must be a list, {spec.describe()}; got a JSON {type(value).__name__}."
    )
  if not value:
    raise served_model.RequestError(f"input '{name}' is an empty batch: send at least one example.")
  files = np.empty(len(value), dtype=object)
  for i, item in enumerate(value):
    if not _is_b64(item) or not isinstance(item['b64'], str):
      raise served_model.RequestError(
        f'instance {i} of \'{name}\' must be {{"b64": "<base64 of the file>"}} '
        "(TF Serving's encoding of DT_STRING values), got "
        f'{json.dumps(item)[:60]}.'
      )
    try:
      data = base64.b64decode(item['b64'], validate=True)
    except (binascii.Error, ValueError) as e:
      raise served_model.RequestError(
        f"instance {i} of '{name}' is not valid base64: {e}."
      ) from None
    _check_image(name, i, data)
    files[i] = data
  return files


def _check_image(name, i, data):
  """RequestError unless `data` starts as an image file and claims at most MAX_IMAGE_PIXELS."""
  if not data.startswith(_IMAGE_MAGIC):
    raise served_model.RequestError(
      f"instance {i} of '{name}' is not a PNG, JPEG, GIF or BMP file (it starts with {data[:8]!r})."
    )
  pixels = image_pixels(data)
  if pixels is not None and pixels > MAX_IMAGE_PIXELS:
    raise served_model.RequestError(
      f"instance {i} of '{name}' claims {pixels} pixels, more than the server's "
      f'limit of {MAX_IMAGE_PIXELS}; send smaller images.'
    )


def to_array(name, value, spec):
  """A JSON value -> numpy array of spec.dtype; RequestError saying what is wrong otherwise."""
  if spec.is_string:
    return to_bytes_array(name, value, spec)
  try:
    array = np.asarray(value)
  except (ValueError, TypeError):
    raise served_model.RequestError(
      f"input '{name}' is ragged (nested lists of different lengths, first "
      f'sizes {_shape_of(value)}); it must be {spec.describe()}.'
    ) from None
  kind = array.dtype.kind
  if kind == 'O':
    raise served_model.RequestError(
      f"input '{name}' must be nested lists of numbers, {spec.describe()}; it "
      'holds other values (null, objects or integers out of range).'
    )
  if kind in 'USb':
    what = 'booleans' if kind == 'b' else 'strings'
    raise served_model.RequestError(
      f"input '{name}' holds {what}; it must be numbers, {spec.describe()}."
    )
  if spec.dtype.kind in 'iu' and kind == 'f':
    if np.isfinite(array).all() and (array == np.round(array)).all():
      pass  # 3.0 is an integer in JSON's eyes too.
    else:
      raise served_model.RequestError(
        f"input '{name}' must be integers, {spec.describe()}; it holds "
        'fractions (use serving_default for floats in [0, 1]).'
      )
  return check_values(name, array, spec).astype(spec.dtype)


def check_values(name, array, spec):
  """A numeric array of a batch -> itself if finite, of spec's shape and within spec's range;
  RequestError otherwise."""
  kind = array.dtype.kind
  if kind == 'f' and not np.isfinite(array).all():
    bad = int((~np.isfinite(array)).sum())
    raise served_model.RequestError(f"input '{name}' has {bad} NaN or infinite value(s).")
  shape = array.shape
  if spec.batched and shape and shape[0] == 0:
    raise served_model.RequestError(f"input '{name}' is an empty batch: send at least one example.")
  if len(shape) != len(spec.shape) or any(
    d is not None and d != s for d, s in zip(spec.shape, shape)
  ):
    raise served_model.RequestError(
      f"input '{name}' has shape {list(shape)}; it must be {spec.describe()}."
    )
  if array.size and (array.min() < spec.low or array.max() > spec.high):
    raise served_model.RequestError(
      f"input '{name}' has values in [{array.min():g}, {array.max():g}], outside "
      f'[{spec.low:g}, {spec.high:g}]'
      + (' (float images are pixel / 255)' if spec.dtype.kind == 'f' and name == 'images' else '')
      + '.'
    )
  return array


def check_tensor(name, array, spec):
  """An array decoded from a gRPC TensorProto -> itself, checked as the REST inputs are: the
  dtype must be the signature's (as in TF Serving), DT_STRING items must be image files."""
  if array.dtype != spec.dtype and not (spec.is_string and array.dtype.kind in 'OS'):
    raise served_model.RequestError(
      f"input '{name}' is {array.dtype.name}; it must be {spec.describe()}."
    )
  if not spec.is_string:
    return check_values(name, array, spec)
  if array.ndim != 1 or not array.size:
    raise served_model.RequestError(
      f"input '{name}' has shape {list(array.shape)}; it must be a non-empty {spec.describe()}."
    )
  files = np.empty(len(array), dtype=object)
  for i, data in enumerate(array):
    _check_image(name, i, bytes(data))
    files[i] = bytes(data)
  return files


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
    raise served_model.RequestError(
      'The body must be a JSON object with "instances" (row format) or '
      f'"inputs" (columnar format), got a JSON {type(body).__name__}.'
    )
  unknown = sorted(set(body) - set(REQUEST_KEYS))
  if unknown:
    raise served_model.RequestError(
      f'Unknown key(s) {unknown} in the body; accepted: {list(REQUEST_KEYS)}.'
    )
  name = body.get('signature_name', served_model.DEFAULT_SIGNATURE)
  if not isinstance(name, str) or name not in specs:
    raise served_model.RequestError(
      f'Unknown signature_name {name!r}; this model has {sorted(specs)}.'
    )
  spec = specs[name]
  if ('instances' in body) == ('inputs' in body):
    raise served_model.RequestError(
      'The body must have exactly one of "instances" (row format) and "inputs" (columnar format).'
    )
  row_format = 'instances' in body
  if row_format:
    values = _rows_to_columns(body['instances'], spec, name)
  else:
    values = body['inputs']
    if not isinstance(values, dict):
      if len(spec) != 1:
        raise served_model.RequestError(
          f'Signature {name!r} takes several inputs {sorted(spec)}: "inputs" '
          'must be an object keyed by input name.'
        )
      values = {next(iter(spec)): values}
    missing, extra = sorted(set(spec) - set(values)), sorted(set(values) - set(spec))
    if missing or extra:
      raise served_model.RequestError(
        f'Signature {name!r} takes the inputs {sorted(spec)}; missing {missing}, unknown {extra}.'
      )
  arrays = {key: to_array(key, values[key], spec[key]) for key in sorted(spec)}
  batches = {key: a.shape[0] for key, a in arrays.items() if spec[key].batched}
  if len(set(batches.values())) > 1:
    raise served_model.RequestError(f'The batched inputs have different batch sizes {batches}.')
  if batches and max(batches.values()) > max_batch_size:
    raise served_model.RequestError(
      f'Batch of {max(batches.values())} examples exceeds the server limit of '
      f'{max_batch_size}; split the request.'
    )
  return name, arrays, row_format


def _rows_to_columns(instances, spec, name):
  """Row format: a list of examples (bare values, or objects keyed by input name) -> columns."""
  if not isinstance(instances, list):
    raise served_model.RequestError(
      f'"instances" must be a list of examples, got a JSON {type(instances).__name__}.'
    )
  if not instances:
    raise served_model.RequestError('"instances" is an empty batch: send at least one example.')
  scalars = sorted(k for k, s in spec.items() if not s.batched)
  if scalars:
    raise served_model.RequestError(
      f'Signature {name!r} has non-batched input(s) {scalars}: use the columnar '
      'format {"inputs": {...}}.'
    )
  keyed = [isinstance(x, dict) and not _is_b64(x) for x in instances]
  if any(keyed) and not all(keyed):
    raise served_model.RequestError('"instances" mixes objects and bare values; use one form.')
  if not keyed[0]:
    if len(spec) != 1:
      raise served_model.RequestError(
        f'Signature {name!r} takes several inputs {sorted(spec)}: each instance '
        'must be an object keyed by input name.'
      )
    return {next(iter(spec)): instances}
  columns = {key: [] for key in spec}
  for i, instance in enumerate(instances):
    if set(instance) != set(spec):
      raise served_model.RequestError(
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
      raise served_model.RequestError(f'The body is not valid JSON: {e}') from None
  try:
    return json.loads(data)
  except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError.
    raise served_model.RequestError(f'The body is not valid JSON: {e}') from None


def format_response(outputs, row_format):
  """TF Serving's response: {"predictions": [per example]} or {"outputs": {name: batch}}."""
  lists = {k: v.tolist() for k, v in sorted(outputs.items())}
  if not row_format:
    return {'outputs': lists if len(lists) > 1 else next(iter(lists.values()))}
  n = len(next(iter(lists.values())))
  if len(lists) == 1:
    return {'predictions': next(iter(lists.values()))}
  return {'predictions': [{k: v[i] for k, v in lists.items()} for i in range(n)]}
