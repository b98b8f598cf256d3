"""TF Serving's gRPC API (a subset) over the same loaded versions and batcher as the REST app.

  tensorflow.serving.PredictionService/Predict           inputs as TensorProto -> outputs
  tensorflow.serving.PredictionService/GetModelMetadata  signature_def (SignatureDefMap)
  tensorflow.serving.ModelService/GetModelStatus         model_version_status

with the official protos of tensorflow-serving-api, so TF Serving's own stubs (Python, Go, Java,
C++) call it unchanged. The request is checked by codec.check_tensor as REST's JSON is, run by
RestApp.run (batched with REST's requests when batching is on) and the refusals become TF Serving's
status codes: INVALID_ARGUMENT (bad tensor, signature or output_filter), NOT_FOUND (model, version
or label), UNAVAILABLE (version still loading), RESOURCE_EXHAUSTED (batch queue full),
DEADLINE_EXCEEDED (the call's deadline passed before the model ran; it is not run).
"""

from concurrent import futures
import time

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from acet_tf.serving import codec
from acet_tf.serving import dynamic_batching
from acet_tf.serving import model_versions
from acet_tf.serving import served_model

_STATES = get_model_status_pb2.ModelVersionStatus.State
_ERROR_CODES = {'OK': 0, 'UNKNOWN': 2}  # tensorflow.error.Code


class _Refused(Exception):
  def __init__(self, code, message):
    super().__init__(message)
    self.code = code


def _status_code(error):
  """The gRPC status TF Serving gives for each of the server's refusals."""
  if isinstance(error, served_model.DeadlineExceededError):
    return grpc.StatusCode.DEADLINE_EXCEEDED
  if isinstance(error, model_versions.VersionLoadingError):
    return grpc.StatusCode.UNAVAILABLE
  if isinstance(error, model_versions.VersionNotFoundError):
    return grpc.StatusCode.NOT_FOUND
  if isinstance(error, dynamic_batching.QueueFullError):
    return grpc.StatusCode.RESOURCE_EXHAUSTED
  if isinstance(error, served_model.RequestError):
    return grpc.StatusCode.NOT_FOUND if error.code == 404 else grpc.StatusCode.INVALID_ARGUMENT
  return None


def _answer(method):
  """Runs a servicer method; a refusal aborts the call with its status code and message."""

  def wrapped(self, request, context):
    try:
      return method(self, request, context)
    except _Refused as e:
      context.abort(e.code, str(e))
    except Exception as e:  # Deliberately broad: a failure is reported, not fatal.
      code = _status_code(e)
      if code is None:
        context.abort(grpc.StatusCode.INTERNAL, f'Internal error: {type(e).__name__}: {e}')
      context.abort(code, str(e))

  wrapped.__name__ = method.__name__
  wrapped.__doc__ = method.__doc__
  return wrapped


class Services(
  prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer
):
  """PredictionService and ModelService over a rest_app.RestApp's versions, batcher and metrics."""

  def __init__(self, rest):
    self.rest = rest

  def _model(self, spec):
    """The served version a ModelSpec names (name, then version or version_label)."""
    if spec.name != self.rest.model_name:
      raise _Refused(
        grpc.StatusCode.NOT_FOUND,
        f'Model {spec.name!r} not found; this server serves {self.rest.model_name!r}.',
      )
    which = spec.WhichOneof('version_choice')
    if which == 'version_label':
      return self.rest.versions.get(self.rest.version_for_label(spec.version_label))
    return self.rest.versions.get(spec.version.value if which == 'version' else None)

  @_answer
  def Predict(self, request, context):
    model = self._model(request.model_spec)  # Held to the end, as REST holds it.
    name = request.model_spec.signature_name or served_model.DEFAULT_SIGNATURE
    if name not in model.specs:
      raise _Refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        f'Unknown signature_name {name!r}; this model has {sorted(model.specs)}.',
      )
    specs = model.specs[name]
    missing = sorted(set(specs) - set(request.inputs))
    extra = sorted(set(request.inputs) - set(specs))
    if missing or extra:
      raise _Refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        f'Signature {name!r} takes the inputs {sorted(specs)}; missing {missing}, unknown {extra}.',
      )
    arrays = {}
    for key, spec in sorted(specs.items()):
      try:
        array = tf.make_ndarray(request.inputs[key])
      except Exception as e:  # Deliberately broad: any undecodable TensorProto is the client's.
        raise _Refused(
          grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}' is not a valid TensorProto: {e}"
        ) from None
      arrays[key] = codec.check_tensor(key, array, spec)
    sizes = {k: len(a) for k, a in arrays.items() if specs[k].batched}
    if len(set(sizes.values())) > 1:
      raise _Refused(
        grpc.StatusCode.INVALID_ARGUMENT, f'The batched inputs have different sizes {sizes}.'
      )
    if sizes and max(sizes.values()) > self.rest.max_batch_size:
      raise _Refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        f'Batch of {max(sizes.values())} examples exceeds the server limit of '
        f'{self.rest.max_batch_size}; split the request.',
      )
    wanted = list(request.output_filter)
    outputs_of = model.signature_defs[name]['outputs']
    unknown = sorted(set(wanted) - set(outputs_of))
    if unknown:
      raise _Refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        f'output_filter names {unknown}, not outputs of {name!r} ({sorted(outputs_of)}).',
      )
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    outputs = self.rest.run(model, name, arrays, deadline)
    if 'accepted' in outputs:
      self.rest.metrics.observe_decisions(model.version, name, outputs['accepted'])
    response = predict_pb2.PredictResponse()
    response.model_spec.name = self.rest.model_name
    response.model_spec.version.value = model.version
    response.model_spec.signature_name = name
    for key in wanted or sorted(outputs):
      value = outputs[key]
      if value.dtype.kind == 'U':  # class_name: back to the bytes of DT_STRING.
        value = np.char.encode(value, 'utf-8').astype(object)
      response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response

  @_answer
  def GetModelMetadata(self, request, context):
    del context
    fields = list(request.metadata_field)
    if fields != ['signature_def']:
      raise _Refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"metadata_field must be ['signature_def'] (the only field served), got {fields}.",
      )
    model = self._model(request.model_spec)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for name, proto in model.signature_def_protos.items():
      signatures.signature_def[name].CopyFrom(proto)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = self.rest.model_name
    response.model_spec.version.value = model.version
    response.metadata['signature_def'].Pack(signatures)
    return response

  @_answer
  def GetModelStatus(self, request, context):
    del context
    spec = request.model_spec
    if spec.name != self.rest.model_name:
      raise _Refused(
        grpc.StatusCode.NOT_FOUND,
        f'Model {spec.name!r} not found; this server serves {self.rest.model_name!r}.',
      )
    which = spec.WhichOneof('version_choice')
    version = None
    if which == 'version':
      version = spec.version.value
    elif which == 'version_label':
      version = self.rest.version_for_label(spec.version_label)
    response = get_model_status_pb2.GetModelStatusResponse()
    for entry in self.rest.versions.status(version):
      status = response.model_version_status.add()
      status.version = int(entry['version'])
      status.state = _STATES.Value(entry['state'])
      status.status.error_code = _ERROR_CODES[entry['status']['error_code']]
      status.status.error_message = entry['status']['error_message']
    return response


def create_server(rest, host, port, *, num_threads=16, max_message_bytes=64 << 20):
  """A started grpc.Server with the services on host:port (0 picks a free port).

  Returns (server, bound port). num_threads bounds the calls in progress at once (gRPC's own
  event loop holds idle and slow connections without a thread); messages up to
  max_message_bytes each way.
  """
  server = grpc.server(
    futures.ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix='grpc'),
    options=[
      ('grpc.max_receive_message_length', max_message_bytes),
      ('grpc.max_send_message_length', max_message_bytes),
    ],
  )
  services = Services(rest)
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(services, server)
  model_service_pb2_grpc.add_ModelServiceServicer_to_server(services, server)
  bound = server.add_insecure_port(f'{host}:{port}')
  if not bound:
    raise OSError(f'Could not bind the gRPC server to {host}:{port}.')
  server.start()
  return server, bound
