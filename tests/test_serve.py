"""acet_tf.serve over real HTTP: a subprocess on a free loopback port, bad requests, SIGTERM."""
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from werkzeug import test as werkzeug_test

from acet_tf import serve
from tests import support


# Subprocesses, servers and whole training runs: the slow tier.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'digits'
MAX_BODY = 200_000  # Bytes: about 25 float images of 28 x 28 as JSON.
MAX_BATCH = 16


@pytest.fixture(scope='module')
def run(exported_run):
  return exported_run


@pytest.fixture(scope='module')
def server(run, tmp_path_factory):
  """The binary on port 0 (it picks a free one and logs it). Yields (process, base URL)."""
  log = tmp_path_factory.mktemp('serve') / 'stderr.txt'
  with open(log, 'w') as err:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'acet_tf.serve', f'--export_dir={run["export_dir"]}',
         f'--model_name={NAME}', '--port=0', f'--max_body_bytes={MAX_BODY}',
         f'--max_batch_size={MAX_BATCH}'], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
  deadline = time.monotonic() + 300
  port = None
  while port is None:
    match = re.search(r'at http://127\.0\.0\.1:(\d+)', log.read_text())
    if match:
      port = int(match.group(1))
    elif proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'server did not start:\n{log.read_text()[-3000:]}')
    else:
      time.sleep(0.2)
  yield proc, f'http://127.0.0.1:{port}'
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def http(url, body=None, data=None):
  """(status, decoded JSON) of a GET (no body) or a POST of `body` as JSON or raw `data` bytes."""
  if body is not None:
    data = json.dumps(body).encode()
  request = urllib.request.Request(url, data=data)
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.load(response)
  except urllib.error.HTTPError as e:
    return e.code, json.load(e)


def expected(run, images, threshold=None):
  """Keras' outputs for float images, and the threshold they were compared with."""
  if threshold is None:
    threshold = run['metadata']['threshold']['value']
  images = np.asarray(images, np.float32)
  return support.keras_outputs(run['model'], images, threshold), threshold


def assert_matches(rows, want_and_threshold):
  """Served rows equal Keras within 1e-5; `accepted` is the served confidence >= threshold."""
  want, threshold = want_and_threshold
  conf = np.array([r['confidence'] for r in rows])
  np.testing.assert_allclose([r['probabilities'] for r in rows], want['probabilities'], atol=1e-5)
  np.testing.assert_allclose(conf, want['confidence'], atol=1e-5)
  assert [r['predicted_class'] for r in rows] == want['predicted_class'].tolist()
  accepted = np.array([r['accepted'] for r in rows])
  np.testing.assert_array_equal(accepted, conf >= np.float32(threshold))
  # Keras on another batch size may differ in the last bits: compare only clear-cut cases.
  clear = np.abs(want['confidence'] - threshold) > 1e-5
  np.testing.assert_array_equal(accepted[clear], want['accepted'][clear])


def test_status_and_metadata(run, server):
  _, url = server
  assert http(f'{url}/v1/models/{NAME}') == (200, {'model_version_status': [{
      'version': '1', 'state': 'AVAILABLE', 'status': {'error_code': 'OK', 'error_message': ''}}]})
  assert http(f'{url}/v1/models/{NAME}/versions/1')[0] == 200
  status, meta = http(f'{url}/v1/models/{NAME}/metadata')
  assert status == 200
  assert meta['model_spec'] == {'name': NAME, 'signature_name': '', 'version': '1'}
  defs = meta['metadata']['signature_def']['signature_def']
  assert sorted(defs) == ['serving_default', 'serving_uint8', 'with_threshold']
  assert defs['serving_uint8']['inputs']['images']['dtype'] == 'DT_UINT8'
  assert sorted(defs['serving_default']['outputs']) == sorted(
      ['probabilities', 'confidence', 'predicted_class', 'accepted'])
  acet = meta['metadata']['acet_tf']
  assert acet['class_names'] == [str(k) for k in range(10)]
  assert acet['threshold']['current'] == pytest.approx(run['metadata']['threshold']['value'])


def test_predict_row_columnar_uint8_and_version(run, server):
  _, url = server
  images, _ = support.digits(6)
  want = expected(run, images)
  status, reply = http(f'{url}/v1/models/{NAME}:predict', {'instances': images.tolist()})
  assert status == 200
  assert_matches(reply['predictions'], want)

  status, reply = http(f'{url}/v1/models/{NAME}/versions/1:predict', {'inputs': images.tolist()})
  assert status == 200
  out = reply['outputs']
  assert_matches([dict(zip(out, v)) for v in zip(*out.values())], want)

  u8 = np.round(images * 255).astype(int)
  status, reply = http(f'{url}/v1/models/{NAME}:predict',
                       {'instances': u8.tolist(), 'signature_name': 'serving_uint8'})
  assert status == 200
  assert_matches(reply['predictions'], want)

  # Row format with objects keyed by input name.
  status, reply = http(f'{url}/v1/models/{NAME}:predict',
                       {'instances': [{'images': x} for x in images.tolist()]})
  assert status == 200
  assert_matches(reply['predictions'], want)


def test_explicit_threshold_signature(run, server):
  _, url = server
  images, _ = support.digits(8)
  t = float(np.median(expected(run, images)[0]['confidence']))
  status, reply = http(f'{url}/v1/models/{NAME}:predict', {
      'signature_name': 'with_threshold', 'inputs': {'images': images.tolist(), 'threshold': t}})
  assert status == 200
  out = reply['outputs']
  assert_matches([dict(zip(out, v)) for v in zip(*out.values())], expected(run, images, t))
  assert 0 < sum(out['accepted']) < len(images)


def _digit_rows(n=1):
  return support.digits(n)[0].tolist()


BAD_REQUESTS = [
    # (name, raw body bytes or a JSON value, path suffix, status, part of the error)
    ('malformed JSON', b'{"instances": [', ':predict', 400, 'not valid JSON'),
    ('not UTF-8', b'\xff\xfe\xfa', ':predict', 400, 'not valid JSON'),
    ('deeply nested', b'[' * 50_000 + b']' * 50_000, ':predict', 400, 'not valid JSON'),
    ('body not an object', [1, 2], ':predict', 400, 'must be a JSON object'),
    ('missing keys', {'signature_name': 'serving_default'}, ':predict', 400, 'exactly one of'),
    ('both keys', {'instances': [], 'inputs': []}, ':predict', 400, 'exactly one of'),
    ('unknown key', {'instances': [], 'images': []}, ':predict', 400, "Unknown key(s) ['images']"),
    ('empty batch', {'instances': []}, ':predict', 400, 'empty batch'),
    ('empty columnar batch', {'inputs': []}, ':predict', 400, 'empty batch'),
    ('instances not a list', {'instances': 3}, ':predict', 400, 'must be a list'),
    ('wrong rank', {'instances': [[0.5] * 28] * 28}, ':predict', 400, 'has shape [28, 28]'),
    ('wrong size', {'instances': np.zeros((1, 27, 28, 1)).tolist()}, ':predict', 400,
     'has shape [1, 27, 28, 1]'),
    ('ragged', {'instances': [[[[0.5]], [[0.5], [0.5]]]]}, ':predict', 400, 'ragged'),
    ('strings', {'instances': [[[['0.5']] * 28] * 28]}, ':predict', 400, 'holds strings'),
    ('booleans', {'instances': [[[[True]] * 28] * 28]}, ':predict', 400, 'holds booleans'),
    ('nulls', {'instances': [[[[None]] * 28] * 28]}, ':predict', 400, 'nested lists of numbers'),
    ('NaN', b'{"instances": [' + json.dumps(np.zeros((28, 28, 1)).tolist()).replace(
        '0.0', 'NaN', 1).encode() + b']}', ':predict', 400, '1 NaN or infinite'),
    ('infinity', b'{"instances": [' + json.dumps(np.zeros((28, 28, 1)).tolist()).replace(
        '0.0', '1e999', 1).encode() + b']}', ':predict', 400, '1 NaN or infinite'),
    ('above 1', {'instances': np.full((1, 28, 28, 1), 255.0).tolist()}, ':predict', 400,
     'outside [0, 1]'),
    ('negative', {'instances': np.full((1, 28, 28, 1), -0.1).tolist()}, ':predict', 400,
     'outside [0, 1]'),
    ('uint8 fractions', {'signature_name': 'serving_uint8', 'instances': _digit_rows()},
     ':predict', 400, 'must be integers'),
    ('uint8 above 255', {'signature_name': 'serving_uint8',
                         'instances': np.full((1, 28, 28, 1), 256).tolist()}, ':predict', 400,
     'outside [0, 255]'),
    ('threshold out of range', {'signature_name': 'with_threshold',
                                'inputs': {'images': _digit_rows(), 'threshold': 2.0}},
     ':predict', 400, "'threshold' has values in [2, 2]"),
    ('threshold missing', {'signature_name': 'with_threshold', 'inputs': _digit_rows()},
     ':predict', 400, 'several inputs'),
    ('scalar in row format', {'signature_name': 'with_threshold', 'instances': _digit_rows()},
     ':predict', 400, 'columnar'),
    ('batch over the limit', {'instances': np.zeros((MAX_BATCH + 1, 28, 28, 1)).tolist()},
     ':predict', 400, f'exceeds the server limit of {MAX_BATCH}'),
    ('unknown signature', {'signature_name': 'serving_f16', 'instances': _digit_rows()},
     ':predict', 400, "Unknown signature_name 'serving_f16'"),
    ('unknown model', {'instances': _digit_rows()}, 'MODEL=cats:predict', 404,
     "Model 'cats' not found"),
    ('unknown version', {'instances': _digit_rows()}, '/versions/7:predict', 404,
     'Version 7'),
    ('unknown verb', {'instances': _digit_rows()}, ':classify', 404, 'No endpoint'),
    ('oversize body', b' ' * (MAX_BODY + 1), ':predict', 413, f'limit of {MAX_BODY} bytes'),
]


@pytest.mark.parametrize('name,body,suffix,status,error', BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_4xx_with_error_and_server_keeps_serving(server, name, body, suffix,
                                                                  status, error):
  del name
  _, url = server
  if suffix.startswith('MODEL='):
    path = f'{url}/v1/models/{suffix[len("MODEL="):]}'
  else:
    path = f'{url}/v1/models/{NAME}{suffix}'
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  got_status, reply = http(path, data=data)
  assert got_status == status, reply
  assert set(reply) == {'error'}
  assert error in reply['error']
  assert http(f'{url}/v1/models/{NAME}')[0] == 200


def test_wrong_method_and_garbage_bytes(server):
  proc, url = server
  status, reply = http(f'{url}/v1/models/{NAME}:predict')  # GET.
  assert status == 405 and 'use POST' in reply['error']
  port = int(url.rsplit(':', 1)[1])
  with socket.create_connection(('127.0.0.1', port), timeout=60) as s:
    s.sendall(b'\x00\x01 not HTTP at all\r\n\r\n')
    s.recv(1024)
  assert proc.poll() is None
  assert http(f'{url}/v1/models/{NAME}')[0] == 200


def test_concurrent_requests_get_their_own_answers(run, server):
  _, url = server
  images, _ = support.digits(24)
  batches = [images[i:i + 3] for i in range(0, 24, 3)]  # 8 different requests.

  def send(batch):
    return http(f'{url}/v1/models/{NAME}:predict', {'instances': batch.tolist()})

  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    replies = list(pool.map(send, batches * 2))
  for batch, (status, reply) in zip(batches * 2, replies):
    assert status == 200
    assert_matches(reply['predictions'], expected(run, batch))


def test_client_prints_decisions(run, server):
  _, url = server
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'client.py'), f'--url={url}',
       f'--model={NAME}', f'--request={run["demo"]}'],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  rows = [line.split() for line in proc.stdout.splitlines()[2:]]
  with open(run['demo']) as f:
    demo = json.load(f)
  want, threshold = expected(run, demo['instances'])
  assert len(rows) == len(demo['instances'])
  for row, k, conf in zip(rows, want['predicted_class'], want['confidence']):
    assert row[-3] == str(k)
    assert float(row[-2]) == pytest.approx(conf, abs=1e-4)
    if abs(conf - threshold) > 1e-5:
      assert row[-1] == ('accepted' if conf >= threshold else 'abstained')
  assert 'label' in proc.stdout and 'adv_noise image 2' in proc.stdout

  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'client.py'), f'--url={url}', '--model=cats',
       '--uniform_noise=2'], capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1 and "Model 'cats' not found" in proc.stderr


def test_threshold_override_in_process(run):
  app = serve.create_app(run['export_dir'], NAME, threshold=0.0)
  client = werkzeug_test.Client(app)
  images, _ = support.digits(4)
  reply = client.post(f'/v1/models/{NAME}:predict', json={'instances': images.tolist()})
  assert reply.status_code == 200
  assert all(r['accepted'] for r in reply.get_json()['predictions'])
  app.model.set_threshold(1.0)
  reply = client.post(f'/v1/models/{NAME}:predict', json={'instances': images.tolist()})
  assert not any(r['accepted'] for r in reply.get_json()['predictions'])
  meta = client.get(f'/v1/models/{NAME}/metadata').get_json()
  assert meta['metadata']['acet_tf']['threshold']['current'] == 1.0
  with pytest.raises(ValueError, match=r'threshold must be a number in \[0, 1\]'):
    app.model.set_threshold(1.5)
  with pytest.raises(FileNotFoundError, match='Version 3'):
    serve.ServedModel(run['export_dir'], version=3)


def test_sigterm_shuts_down_cleanly(server):
  proc, url = server
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  port = int(url.rsplit(':', 1)[1])
  with pytest.raises(ConnectionRefusedError):
    socket.create_connection(('127.0.0.1', port), timeout=10).close()
