"""TF Serving's warm-up file: EXPORT/<version>/assets.extra/tf_serving_warmup_requests, a TFRecord
of PredictionLog protos (each a PredictRequest), replayed by the server when it loads the version
and before the version is AVAILABLE, so that the first real request does not pay for the first
run of each signature's kernels. TF Serving reads the same file."""

import os

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

PATH = os.path.join('assets.extra', 'tf_serving_warmup_requests')
# TF Serving reads at most this many records (its kMaxNumRecords).
MAX_RECORDS = 1000


def requests_for(image_shape, signature_inputs):
  """One PredictRequest per signature, batch 1, of values inside its input ranges.

  image_shape: (H, W, C). signature_inputs: {signature: {input name: (low, high) or None for
  encoded images}}. Returns [(signature, PredictRequest)].
  """
  requests = []
  for signature, inputs in sorted(signature_inputs.items()):
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = signature
    for name, value_range in sorted(inputs.items()):
      if value_range is None:  # DT_STRING image files: one black PNG.
        value = np.array([tf.io.encode_png(tf.zeros(image_shape, tf.uint8)).numpy()], object)
      elif name == 'threshold':
        value = np.float32(value_range[1])
      else:
        dtype = np.uint8 if value_range[1] > 1 else np.float32
        value = np.full((1, *image_shape), value_range[0], dtype)
      request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    requests.append((signature, request))
  return requests


def write(version_dir, requests):
  """Writes `requests` ([(signature, PredictRequest)]) as the version's warm-up file."""
  path = os.path.join(version_dir, PATH)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path) as writer:
    for _, request in requests:
      log = prediction_log_pb2.PredictionLog()
      log.predict_log.request.CopyFrom(request)
      writer.write(log.SerializeToString())


def read(version_dir):
  """The PredictRequests of the version's warm-up file ([] if it has none). ValueError for a file
  that is not a TFRecord of PredictionLog with predict_log requests, or has too many."""
  path = os.path.join(version_dir, PATH)
  if not tf.io.gfile.exists(path):
    return []
  requests = []
  try:
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      log = prediction_log_pb2.PredictionLog.FromString(record)
      if log.WhichOneof('log_type') != 'predict_log':
        raise ValueError(f'a {log.WhichOneof("log_type")} record; only predict_log is replayed')
      requests.append(log.predict_log.request)
      if len(requests) > MAX_RECORDS:
        raise ValueError(f'more than {MAX_RECORDS} records')
  except (tf.errors.OpError, ValueError) as e:
    message = getattr(e, 'message', str(e))
    raise ValueError(f'Warm-up file {path} is unreadable: {message}') from None
  return requests
