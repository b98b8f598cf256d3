"""acet_tf.serve's gRPC API through TF Serving's own Python stubs, called as TF Serving's docs
show: answers equal to REST's to the last bit, encoded images, accept/abstain, every status code,
deadlines (not run), labels, and the --port compatibility refusal."""

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from werkzeug import test as werkzeug_test

from acet_tf.artifacts import export_layout
from acet_tf.artifacts import warmup
from acet_tf.serving import grpc_service
from acet_tf.serving import model_config
from acet_tf.serving import model_versions
from acet_tf.serving import rest_app
from acet_tf.serving import served_model
from tests import support

NAME = 'digits'
OUTPUTS = ['accepted', 'class_name', 'confidence', 'predicted_class', 'probabilities']
# The module's server waits this long for a batch to fill: a call with a shorter deadline is
# still queued when it expires.
BATCH_WAIT_S = 0.3


@pytest.fixture(scope='module')
def server(exported_run, tmp_path_factory):
  log = tmp_path_factory.mktemp('grpc') / 'stderr.txt'
  proc, url = support.start_server(
    exported_run['export_dir'],
    NAME,
    log,
    '--enable_batching',
    '--batching_max_batch_size=64',
    f'--batching_timeout_micros={int(BATCH_WAIT_S * 1e6)}',
    '--version_labels=stable=1',
  )
  channel = grpc.insecure_channel(support.grpc_address(log))
  yield proc, url, channel
  channel.close()
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def predict_request(images=None, signature='', version=None, label=None, **inputs):
  """A PredictRequest as TF Serving's docs build one (make_tensor_proto for each input)."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = NAME
  request.model_spec.signature_name = signature
  if version is not None:
    request.model_spec.version.value = version
  if label is not None:
    request.model_spec.version_label = label
  if images is not None:
    inputs['images'] = images
  for key, value in inputs.items():
    request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  return request


def outputs_of(response):
  return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def rest_predict(url, body, path=f'/v1/models/{NAME}:predict'):
  request = urllib.request.Request(url + path, data=json.dumps(body).encode())
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.load(response)
  except urllib.error.HTTPError as e:
    return e.code, json.load(e)


def png_files(images):
  u8 = np.round(np.asarray(images) * 255).astype(np.uint8)
  return [tf.io.encode_png(x).numpy() for x in u8]


def assert_same_as_rest(grpc_outputs, rest_outputs):
  """Every output equal to the last bit: REST's JSON numbers are the float32 values exactly."""
  assert sorted(grpc_outputs) == sorted(rest_outputs) == OUTPUTS
  for key, got in grpc_outputs.items():
    want = np.asarray(rest_outputs[key])
    if key == 'class_name':
      assert [x.decode() for x in got] == want.tolist()
    elif key == 'accepted':
      np.testing.assert_array_equal(got, want.astype(bool))
    else:
      np.testing.assert_array_equal(got, want.astype(got.dtype))


@pytest.mark.slow
def test_status_and_metadata_through_the_model_service(server):
  _, _, channel = server
  stub = model_service_pb2_grpc.ModelServiceStub(channel)
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = NAME
  response = stub.GetModelStatus(request, 30.0)
  [status] = response.model_version_status
  assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
  assert status.status.error_code == 0 and status.status.error_message == ''
  request.model_spec.version_label = 'stable'
  assert stub.GetModelStatus(request, 30.0).model_version_status[0].version == 1

  prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  request = get_model_metadata_pb2.GetModelMetadataRequest()
  request.model_spec.name = NAME
  request.metadata_field.append('signature_def')
  response = prediction.GetModelMetadata(request, 30.0)
  assert response.model_spec.version.value == 1
  signatures = get_model_metadata_pb2.SignatureDefMap()
  response.metadata['signature_def'].Unpack(signatures)
  defs = signatures.signature_def
  assert sorted(defs) == [
    'serving_default',
    'serving_image_bytes',
    'serving_uint8',
    'with_threshold',
  ]
  assert defs['serving_image_bytes'].inputs['image_bytes'].dtype == tf.string.as_datatype_enum
  assert sorted(defs['serving_default'].outputs) == OUTPUTS


@pytest.mark.slow
def test_float_and_encoded_images_answer_as_rest_does_to_the_last_bit(exported_run, server):
  _, url, channel = server
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  images, _ = support.digits(6)
  response = stub.Predict(predict_request(images), 30.0)
  assert response.model_spec.name == NAME and response.model_spec.version.value == 1
  assert response.model_spec.signature_name == 'serving_default'
  got = outputs_of(response)
  status, rest = rest_predict(url, {'inputs': images.tolist()})
  assert status == 200
  assert_same_as_rest(got, rest['outputs'])
  threshold = exported_run['metadata']['threshold']['value']
  want = support.keras_outputs(exported_run['model'], images, threshold)
  np.testing.assert_allclose(got['probabilities'], want['probabilities'], atol=1e-5)
  assert got['predicted_class'].tolist() == want['predicted_class'].tolist()
  assert [x.decode() for x in got['class_name']] == [str(k) for k in want['predicted_class']]
  np.testing.assert_array_equal(got['accepted'], got['confidence'] >= np.float32(threshold))

  files = png_files(images)
  response = stub.Predict(
    predict_request(signature='serving_image_bytes', image_bytes=np.array(files, dtype=object)),
    30.0,
  )
  from_files = outputs_of(response)
  b64 = [{'b64': base64.b64encode(f).decode()} for f in files]
  status, rest = rest_predict(url, {'signature_name': 'serving_image_bytes', 'inputs': b64})
  assert status == 200
  assert_same_as_rest(from_files, rest['outputs'])
  # The files decode to the same pixels; the in-graph decode path may differ in the last bits.
  np.testing.assert_allclose(from_files['probabilities'], got['probabilities'], atol=1e-5)
  assert from_files['predicted_class'].tolist() == got['predicted_class'].tolist()


@pytest.mark.slow
def test_output_filter_version_label_and_accept_or_abstain(server):
  _, _, channel = server
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  images, _ = support.digits(4)
  request = predict_request(images, version=1)
  request.output_filter.extend(['accepted', 'confidence'])
  response = stub.Predict(request, 30.0)
  assert sorted(response.outputs) == ['accepted', 'confidence']
  by_label = stub.Predict(predict_request(images, label='stable'), 30.0)
  np.testing.assert_array_equal(
    outputs_of(by_label)['confidence'], outputs_of(response)['confidence']
  )
  for threshold, accepted in [(0.0, [True] * 4), (1.0, None)]:
    out = outputs_of(
      stub.Predict(predict_request(images, 'with_threshold', threshold=np.float32(threshold)), 30.0)
    )
    if accepted is None:  # Threshold 1: only a confidence of exactly 1 is accepted.
      accepted = (out['confidence'] >= 1.0).tolist()
      assert not all(accepted)
    assert out['accepted'].tolist() == accepted


@pytest.mark.slow
def test_labels_in_rest_paths(server):
  _, url, _ = server
  images, _ = support.digits(2)
  with urllib.request.urlopen(f'{url}/v1/models/{NAME}/labels/stable', timeout=60) as r:
    assert json.load(r)['model_version_status'][0]['version'] == '1'
  path = f'/v1/models/{NAME}/labels/stable:predict'
  status, by_label = rest_predict(url, {'inputs': images.tolist()}, path)
  assert status == 200
  assert by_label == rest_predict(url, {'inputs': images.tolist()})[1]
  status, reply = rest_predict(url, {'inputs': images.tolist()}, path.replace('stable', 'canary'))
  assert status == 404 and 'canary' in reply['error']


def _code(call):
  with pytest.raises(grpc.RpcError) as e:
    call()
  return e.value.code(), e.value.details()


@pytest.mark.slow
@pytest.mark.parametrize(
  'case, request_kwargs, code, says',
  [
    ('float64 images', dict(images=np.zeros([1, 28, 28, 1])), 'INVALID_ARGUMENT', 'float64'),
    ('above 1', dict(images=np.full([1, 28, 28, 1], 2, np.float32)), 'INVALID_ARGUMENT', 'outside'),
    ('NaN', dict(images=np.full([1, 28, 28, 1], np.nan, np.float32)), 'INVALID_ARGUMENT', 'NaN'),
    ('shape', dict(images=np.zeros([1, 27, 28, 1], np.float32)), 'INVALID_ARGUMENT', 'shape'),
    (
      'signature',
      dict(images=np.zeros([1, 28, 28, 1], np.float32), signature='nope'),
      'INVALID_ARGUMENT',
      'nope',
    ),
    (
      'not an image',
      dict(signature='serving_image_bytes', image_bytes=np.array([b'hello'], dtype=object)),
      'INVALID_ARGUMENT',
      'not a PNG',
    ),
    (
      'version',
      dict(images=np.zeros([1, 28, 28, 1], np.float32), version=7),
      'NOT_FOUND',
      'Version 7',
    ),
    (
      'label',
      dict(images=np.zeros([1, 28, 28, 1], np.float32), label='canary'),
      'NOT_FOUND',
      'canary',
    ),
  ],
)
def test_refusals_get_tf_serving_status_codes(server, case, request_kwargs, code, says):
  del case
  proc, url, channel = server
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  got, details = _code(lambda: stub.Predict(predict_request(**request_kwargs), 30.0))
  assert got == getattr(grpc.StatusCode, code) and says in details
  assert proc.poll() is None
  images, _ = support.digits(1)
  assert len(outputs_of(stub.Predict(predict_request(images), 30.0))['accepted']) == 1


@pytest.mark.slow
def test_unknown_model_and_output_filter(server):
  _, _, channel = server
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  images, _ = support.digits(1)
  request = predict_request(images)
  request.model_spec.name = 'other'
  assert _code(lambda: stub.Predict(request, 30.0))[0] == grpc.StatusCode.NOT_FOUND
  status = get_model_status_pb2.GetModelStatusRequest()
  status.model_spec.name = 'other'
  model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
  assert _code(lambda: model_stub.GetModelStatus(status, 30.0))[0] == grpc.StatusCode.NOT_FOUND
  request = predict_request(images)
  request.output_filter.append('logits')
  code, details = _code(lambda: stub.Predict(request, 30.0))
  assert code == grpc.StatusCode.INVALID_ARGUMENT and 'logits' in details


def _examples_decided(url):
  """accepted + abstained examples the server counted (each model call adds its batch)."""
  with urllib.request.urlopen(f'{url}/monitoring/prometheus/metrics', timeout=60) as r:
    text = r.read().decode()
  total = 0.0
  for line in text.splitlines():
    if line.startswith(('acet_serving_accepted_examples_total', 'acet_serving_abstained_examples')):
      total += float(line.rsplit(' ', 1)[1])
  return total


@pytest.mark.slow
def test_an_expired_deadline_is_deadline_exceeded_and_not_run(server):
  _, url, channel = server
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  images, _ = support.digits(3)
  before = _examples_decided(url)
  code, _ = _code(lambda: stub.Predict(predict_request(images), BATCH_WAIT_S / 3))
  assert code == grpc.StatusCode.DEADLINE_EXCEEDED
  time.sleep(2 * BATCH_WAIT_S)  # Were it run, its batch would have run by now.
  assert _examples_decided(url) == before
  stub.Predict(predict_request(images), 30.0)
  assert _examples_decided(url) == before + 3  # The counter does count what runs.


def batching_app(exported_run, max_batch_size, timeout_micros, max_enqueued_batches, **kwargs):
  """A REST app of the export with one batch thread and the given batching limits."""
  return rest_app.create_app(
    exported_run['export_dir'],
    NAME,
    batching={
      'max_batch_size': max_batch_size,
      'batch_timeout_micros': timeout_micros,
      'num_batch_threads': 1,
      'max_enqueued_batches': max_enqueued_batches,
    },
    **kwargs,
  )


@pytest.mark.slow
def test_rest_request_timeout_is_504_and_not_run(exported_run):
  rest = batching_app(exported_run, 8, 500_000, 4, request_timeout_s=0.1)
  calls = []
  model = rest.model
  predict = model.predict
  model.predict = lambda *a: calls.append(a) or predict(*a)
  try:
    client = werkzeug_test.Client(rest)
    body = json.dumps({'instances': support.digits(1)[0].tolist()})
    response = client.post(f'/v1/models/{NAME}:predict', data=body)
    assert response.status_code == 504 and 'not run' in response.get_json()['error']
    time.sleep(0.8)
    assert calls == []
    rest.request_timeout_s = 5.0
    assert client.post(f'/v1/models/{NAME}:predict', data=body).status_code == 200
    assert len(calls) == 1
  finally:
    rest_app.close_app(rest)


@pytest.mark.slow
def test_full_batch_queue_is_resource_exhausted(exported_run):
  rest = batching_app(exported_run, 1, 2_000_000, 2)
  model = rest.model
  predict = model.predict
  model.predict = lambda *a: time.sleep(1.0) or predict(*a)  # The batch thread stays busy.
  server, port = grpc_service.create_server(rest, '127.0.0.1', 0, num_threads=8)
  channel = grpc.insecure_channel(f'127.0.0.1:{port}')
  try:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    images, _ = support.digits(1)
    # Each is a batch of its own (max_batch_size 1); the single batch thread runs one (1 s) and
    # the queue holds two: the fourth call finds it full.
    futures = [stub.Predict.future(predict_request(images), 60.0) for _ in range(3)]
    time.sleep(0.5)
    code, details = _code(lambda: stub.Predict(predict_request(images), 60.0))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and 'full' in details
    for f in futures:
      assert len(outputs_of(f.result())['accepted']) == 1
  finally:
    channel.close()
    server.stop(0).wait()
    rest_app.close_app(rest)


@pytest.mark.slow
def test_a_loading_version_is_unavailable_then_served(exported_run, tmp_path):
  base = tmp_path / 'export'
  shutil.copytree(exported_run['path'], base / '1')
  release = threading.Event()

  def load(path):
    if path.endswith(os.sep + '2'):
      release.wait(60)
    return served_model.ServedModel.from_version_dir(path)

  versions = model_versions.ModelVersions(str(base), load, keep=2, poll_interval_s=0.1)
  rest = rest_app.RestApp(versions, NAME)
  server, port = grpc_service.create_server(rest, '127.0.0.1', 0)
  channel = grpc.insecure_channel(f'127.0.0.1:{port}')
  try:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    shutil.copytree(exported_run['path'], base / '2')
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = NAME
    loading = get_model_status_pb2.ModelVersionStatus.LOADING
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      states = {
        s.version: s.state for s in model_stub.GetModelStatus(status, 30.0).model_version_status
      }
      if states.get(2) == loading:
        break
      time.sleep(0.05)
    assert states.get(2) == loading
    images, _ = support.digits(1)
    code, details = _code(lambda: stub.Predict(predict_request(images, version=2), 30.0))
    assert code == grpc.StatusCode.UNAVAILABLE and 'loading' in details
    assert len(outputs_of(stub.Predict(predict_request(images, version=1), 30.0))['accepted']) == 1
    release.set()
    deadline = time.monotonic() + 60
    while 2 not in versions.versions and time.monotonic() < deadline:
      time.sleep(0.05)
    assert outputs_of(stub.Predict(predict_request(images, version=2), 30.0))['accepted'].shape == (
      1,
    )
  finally:
    release.set()
    channel.close()
    server.stop(0).wait()
    versions.close()


def test_port_alone_is_refused_naming_the_rest_flag(tmp_path):
  """Before gRPC, --port was REST: an old command stops with a message, never serves gRPC."""
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'acet_tf.serve',
      f'--export_dir={tmp_path}',
      '--model_name=m',
      '--port=8501',
    ],
    cwd=support.ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
  )
  assert result.returncode != 0
  assert '--rest_api_port=8501' in result.stderr and 'gRPC port' in result.stderr


def test_model_config_parse_and_refusals():
  config = model_config.parse(
    'model_config_list { config { name: "m" base_path: "/e" model_platform: "tensorflow" '
    'model_version_policy { specific { versions: 3 versions: 1 } } '
    'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 3 } } }'
  )
  assert config == model_config.ModelConfig('m', '/e', 2, (1, 3), {'stable': 1, 'canary': 3})
  latest = model_config.parse(
    'model_config_list { config { name: "m" base_path: "/e" '
    'model_version_policy { latest { num_versions: 2 } } } }'
  )
  assert (latest.keep, latest.versions, latest.labels) == (2, None, {})
  assert model_config.parse('model_config_list { config { name: "m" base_path: "/e" } }').keep == 1
  for text, says in [
    (
      'model_config_list { config { name: "a" base_path: "/a" } '
      'config { name: "b" base_path: "/b" } }',
      'one model per process',
    ),
    ('model_config_list { config { name: "a" } }', 'base_path'),
    ('model_config_list { config { name: "a" base_path: "/a" model_platform: "pt" } }', 'pt'),
    ('model_config_list { nonsense: 1 }', 'not a text-format'),
  ]:
    with pytest.raises(model_config.ConfigError, match=says):
      model_config.parse(text)


def _config_text(export_dir, canary):
  return (
    f'model_config_list {{ config {{ name: "{NAME}" base_path: "{export_dir}" '
    'model_platform: "tensorflow" model_version_policy { latest { num_versions: 2 } } '
    'version_labels { key: "stable" value: 1 } '
    f'version_labels {{ key: "canary" value: {canary} }} }} }}'
  )


@pytest.mark.slow
def test_model_config_file_serves_two_versions_and_relabels_live(exported_run, tmp_path):
  base = tmp_path / 'export'
  for version in (1, 2):
    shutil.copytree(exported_run['path'], base / str(version))
  config = tmp_path / 'models.config'
  config.write_text(_config_text(base, 2))
  log = tmp_path / 'stderr.txt'
  proc, _ = support.start_server(
    None,
    None,
    log,
    f'--model_config_file={config}',
    '--model_config_file_poll_wait_seconds=0.3',
  )
  channel = grpc.insecure_channel(support.grpc_address(log))
  try:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    images, _ = support.digits(1)

    def version_of(label):
      return stub.Predict(predict_request(images, label=label), 30.0).model_spec.version.value

    assert (version_of('stable'), version_of('canary')) == (1, 2)
    config.write_text(_config_text(base, 1))
    deadline = time.monotonic() + 30
    while version_of('canary') != 1 and time.monotonic() < deadline:
      time.sleep(0.1)
    assert version_of('canary') == 1
    config.write_text(_config_text(base, 9))  # Not a served version: refused, old labels kept.
    time.sleep(1.5)
    assert version_of('canary') == 1
    assert 'label' in log.read_text() and 'version 9' in log.read_text()
  finally:
    channel.close()
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_export_writes_warm_up_requests_replayed_before_available(exported_run, tmp_path):
  requests = warmup.read(exported_run['path'])
  assert sorted(r.model_spec.signature_name for r in requests) == sorted(
    ['serving_default', 'serving_uint8', 'with_threshold', 'serving_image_bytes']
  )
  assert served_model.ServedModel.from_version_dir(exported_run['path']).warmed_up == 4
  assert (
    served_model.ServedModel.from_version_dir(exported_run['path'], warm_up=False).warmed_up == 0
  )
  # A version whose warm-up request fails is not served; the one before keeps serving.
  base = tmp_path / 'export'
  shutil.copytree(exported_run['path'], base / '1')
  versions = model_versions.ModelVersions(
    str(base), served_model.ServedModel.from_version_dir, keep=1
  )
  shutil.copytree(exported_run['path'], base / '2')
  bad = predict_pb2.PredictRequest()
  bad.model_spec.signature_name = 'serving_default'
  bad.inputs['images'].CopyFrom(tf.make_tensor_proto(np.full([1, 28, 28, 1], 5.0, np.float32)))
  warmup.write(str(base / '2'), [('serving_default', bad)])
  export_layout.write_manifest(str(base / '2'))
  try:
    versions.poll()
    assert versions.versions == [1]
    [status] = versions.status(2)
    assert status['state'] == 'END' and 'Warm-up request 0' in status['status']['error_message']
  finally:
    versions.close()


@pytest.mark.slow
def test_load_test_tool_reports_every_case_over_rest_and_grpc_without_errors(exported_run):
  # One run of tools.load_test for both protocols (its REST-only run was a second server start).
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'tools.load_test',
      f'--export_dir={exported_run["export_dir"]}',
      '--seconds=1',
      '--rounds=1',
      '--clients_b1=4',
      '--clients_b64=2',
      '--protocols=rest,grpc',
    ],
    cwd=support.ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  served = {(s['case'], s['batching'], s['protocol']) for s in lines if 'protocol' in s}
  assert served == {
    (c, m, p) for c in ('b1', 'b64', 'b64png') for m in ('off', 'on') for p in ('rest', 'grpc')
  }
  in_process = {s['case'] for s in lines if s.get('batching') == 'in-process'}
  assert in_process == {'b1', 'b64', 'b64png'}
  assert all(s['errors'] == 0 and s['requests'] > 0 for s in lines if 'requests' in s)
  assert '| b64png | batching on |' in proc.stdout
  assert '| b64png | gRPC, batching on |' in proc.stdout
  assert '| b64png | gRPC, batching on |' in proc.stdout
