"""One loaded version of an export: its signatures' input specs, its threshold, predict().

The first of the server's layers (KServe's model): knows the SavedModel and its metadata asset,
nothing of requests or HTTP. predict() takes validated arrays; RequestError is the refusal every
layer above raises and the protocol layers turn into their status codes.
"""

import dataclasses
import json
import os

from google.protobuf import json_format
import numpy as np
import tensorflow as tf

from acet_tf.artifacts import export_layout
from acet_tf.artifacts import warmup

DEFAULT_SIGNATURE = 'serving_default'


class RequestError(ValueError):
  """A request the server refuses; the message says what is wrong. HTTP status `code`."""

  def __init__(self, message, code=400):
    super().__init__(message)
    self.code = code


class DeadlineExceededError(RequestError):
  """The request's deadline passed before its model call started; it was not run."""

  def __init__(self, message='The request deadline passed before the model ran; it was not run.'):
    super().__init__(message, 504)


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

  def __init__(self, export_dir, *, version=None, threshold=None, warm_up=True):
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
      os.path.join(export_dir, str(versions[-1] if version is None else version)),
      threshold,
      warm_up,
    )

  @classmethod
  def from_version_dir(cls, path, threshold=None, warm_up=True):
    """Loads EXPORT/<version> directly (ModelVersions' loader)."""
    model = cls.__new__(cls)
    model.load(path, threshold, warm_up)
    return model

  def load(self, path, threshold, warm_up=True):
    """Loads the SavedModel at `path`; with warm_up, replays its warm-up file (ValueError if a
    record does not run: the version is then not served, as in TF Serving)."""
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
    self.warmed_up = self._warm_up() if warm_up else 0

  def _warm_up(self):
    """Runs each request of the warm-up file once; returns how many ran."""
    requests = warmup.read(self.path)
    for i, request in enumerate(requests):
      name = request.model_spec.signature_name or DEFAULT_SIGNATURE
      try:
        if name not in self._functions:
          raise RequestError(f'unknown signature {name!r}')
        self.predict(name, {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
      except (RequestError, TypeError, ValueError) as e:
        raise ValueError(f'Warm-up request {i} of {self.path} failed: {e}') from None
    return len(requests)

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
    self.signature_def_protos = {name: defs[name] for name in self.specs}  # For gRPC metadata.
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
