"""acet_tf.serve: strict checks over real HTTP (a subprocess on a free loopback port), encoded
images, metrics, dynamic batching, new versions while serving, keep-alive and timeouts, SIGTERM."""

import base64
import concurrent.futures
from http import client as http_client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image  # matplotlib's dependency: GIF, BMP and JPEG files for the tests
import pytest
import tensorflow as tf
from werkzeug import test as werkzeug_test

from acet_tf.artifacts import export_layout
from acet_tf.exporting import abstaining_classifier
from acet_tf.serving import codec
from acet_tf.serving import dynamic_batching
from acet_tf.serving import model_versions
from acet_tf.serving import rest_app
from acet_tf.serving import served_model
from tests import support

ROOT = support.ROOT
NAME = 'digits'
MAX_BODY = 200_000  # Bytes: about 25 float images of 28 x 28 as JSON.
MAX_BATCH = 16
SOCKET_TIMEOUT = 5  # Seconds; the server drops a client silent this long.


@pytest.fixture(scope='module')
def run(exported_run):
  return exported_run


def start_server(export_dir, log, *flags):
  return support.start_server(export_dir, NAME, log, *flags)


@pytest.fixture(scope='module')
def server(run, tmp_path_factory):
  """With dynamic batching on, so every strict check also goes through the batcher."""
  log = tmp_path_factory.mktemp('serve') / 'stderr.txt'
  proc, url = start_server(
    run['export_dir'],
    log,
    f'--max_body_bytes={MAX_BODY}',
    f'--max_batch_size={MAX_BATCH}',
    '--enable_batching',
    '--batching_max_batch_size=8',
    '--batching_timeout_micros=2000',
    f'--socket_timeout_seconds={SOCKET_TIMEOUT}',
  )
  yield proc, url
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
  assert [r['class_name'] for r in rows] == [str(k) for k in want['predicted_class']]  # mnist5k.
  accepted = np.array([r['accepted'] for r in rows])
  np.testing.assert_array_equal(accepted, conf >= np.float32(threshold))
  # Keras on another batch size may differ in the last bits: compare only clear-cut cases.
  clear = np.abs(want['confidence'] - threshold) > 1e-5
  np.testing.assert_array_equal(accepted[clear], want['accepted'][clear])


@pytest.mark.slow
def test_status_and_metadata(run, server):
  _, url = server
  assert http(f'{url}/v1/models/{NAME}') == (
    200,
    {
      'model_version_status': [
        {'version': '1', 'state': 'AVAILABLE', 'status': {'error_code': 'OK', 'error_message': ''}}
      ]
    },
  )
  assert http(f'{url}/v1/models/{NAME}/versions/1')[0] == 200
  status, meta = http(f'{url}/v1/models/{NAME}/metadata')
  assert status == 200
  assert meta['model_spec'] == {'name': NAME, 'signature_name': '', 'version': '1'}
  defs = meta['metadata']['signature_def']['signature_def']
  assert sorted(defs) == [
    'serving_default',
    'serving_image_bytes',
    'serving_uint8',
    'with_threshold',
  ]
  assert defs['serving_uint8']['inputs']['images']['dtype'] == 'DT_UINT8'
  assert defs['serving_image_bytes']['inputs']['image_bytes']['dtype'] == 'DT_STRING'
  assert sorted(defs['serving_image_bytes']['outputs']) == sorted(
    ['probabilities', 'confidence', 'predicted_class', 'class_name', 'accepted']
  )
  assert sorted(defs['serving_default']['outputs']) == sorted(
    ['probabilities', 'confidence', 'predicted_class', 'class_name', 'accepted']
  )
  acet = meta['metadata']['acet_tf']
  assert acet['class_names'] == [str(k) for k in range(10)]
  assert acet['threshold']['current'] == pytest.approx(run['metadata']['threshold']['value'])


@pytest.mark.slow
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
  status, reply = http(
    f'{url}/v1/models/{NAME}:predict', {'instances': u8.tolist(), 'signature_name': 'serving_uint8'}
  )
  assert status == 200
  assert_matches(reply['predictions'], want)

  # Row format with objects keyed by input name.
  status, reply = http(
    f'{url}/v1/models/{NAME}:predict', {'instances': [{'images': x} for x in images.tolist()]}
  )
  assert status == 200
  assert_matches(reply['predictions'], want)


@pytest.mark.slow
def test_explicit_threshold_signature(run, server):
  _, url = server
  images, _ = support.digits(8)
  t = float(np.median(expected(run, images)[0]['confidence']))
  status, reply = http(
    f'{url}/v1/models/{NAME}:predict',
    {'signature_name': 'with_threshold', 'inputs': {'images': images.tolist(), 'threshold': t}},
  )
  assert status == 200
  out = reply['outputs']
  assert_matches([dict(zip(out, v)) for v in zip(*out.values())], expected(run, images, t))
  assert 0 < sum(out['accepted']) < len(images)


def _digit_rows(n=1):
  return support.digits(n)[0].tolist()


def png_files(images):
  """float32 [n, H, W, C] in [0, 1], multiples of 1/255 -> PNG files (bytes), exactly those."""
  u8 = np.round(np.asarray(images) * 255).astype(np.uint8)
  return [tf.io.encode_png(x).numpy() for x in u8]


def b64(files):
  return [{'b64': base64.b64encode(f).decode('ascii')} for f in files]


def _png_b64(corrupt=False):
  data = png_files(support.digits(1)[0])[0]
  if corrupt:  # A valid header, then garbage: only the decoder can tell.
    data = data[:40] + bytes(range(256)) * 2
  return base64.b64encode(data).decode('ascii')


def _big_png_b64():
  """A 4096 x 4096 black PNG: 16 KB of file, 16 Mpx once decoded."""
  return base64.b64encode(tf.io.encode_png(tf.zeros([4096, 4096, 1], tf.uint8)).numpy()).decode()


BAD_REQUESTS = [
  # (name, raw body bytes or a JSON value, path suffix, status, part of the error)
  ('malformed JSON', b'{"instances": [', ':predict', 400, 'not valid JSON'),
  ('not UTF-8', b'\xff\xfe\xfa', ':predict', 400, 'not valid JSON'),
  ('deeply nested', b'[' * 50_000 + b']' * 50_000, ':predict', 400, 'must be a JSON object'),
  ('deeply nested NaN', b'[' * 50_000 + b'NaN' + b']' * 50_000, ':predict', 400, 'not valid JSON'),
  ('body not an object', [1, 2], ':predict', 400, 'must be a JSON object'),
  ('missing keys', {'signature_name': 'serving_default'}, ':predict', 400, 'exactly one of'),
  ('both keys', {'instances': [], 'inputs': []}, ':predict', 400, 'exactly one of'),
  ('unknown key', {'instances': [], 'images': []}, ':predict', 400, "Unknown key(s) ['images']"),
  ('empty batch', {'instances': []}, ':predict', 400, 'empty batch'),
  ('empty columnar batch', {'inputs': []}, ':predict', 400, 'empty batch'),
  ('instances not a list', {'instances': 3}, ':predict', 400, 'must be a list'),
  ('wrong rank', {'instances': [[0.5] * 28] * 28}, ':predict', 400, 'has shape [28, 28]'),
  (
    'wrong size',
    {'instances': np.zeros((1, 27, 28, 1)).tolist()},
    ':predict',
    400,
    'has shape [1, 27, 28, 1]',
  ),
  ('ragged', {'instances': [[[[0.5]], [[0.5], [0.5]]]]}, ':predict', 400, 'ragged'),
  ('strings', {'instances': [[[['0.5']] * 28] * 28]}, ':predict', 400, 'holds strings'),
  ('booleans', {'instances': [[[[True]] * 28] * 28]}, ':predict', 400, 'holds booleans'),
  ('nulls', {'instances': [[[[None]] * 28] * 28]}, ':predict', 400, 'nested lists of numbers'),
  (
    'NaN',
    b'{"instances": ['
    + json.dumps(np.zeros((28, 28, 1)).tolist()).replace('0.0', 'NaN', 1).encode()
    + b']}',
    ':predict',
    400,
    '1 NaN or infinite',
  ),
  (
    'infinity',
    b'{"instances": ['
    + json.dumps(np.zeros((28, 28, 1)).tolist()).replace('0.0', '1e999', 1).encode()
    + b']}',
    ':predict',
    400,
    '1 NaN or infinite',
  ),
  (
    'above 1',
    {'instances': np.full((1, 28, 28, 1), 255.0).tolist()},
    ':predict',
    400,
    'outside [0, 1]',
  ),
  (
    'negative',
    {'instances': np.full((1, 28, 28, 1), -0.1).tolist()},
    ':predict',
    400,
    'outside [0, 1]',
  ),
  (
    'uint8 fractions',
    {'signature_name': 'serving_uint8', 'instances': _digit_rows()},
    ':predict',
    400,
    'must be integers',
  ),
  (
    'uint8 above 255',
    {'signature_name': 'serving_uint8', 'instances': np.full((1, 28, 28, 1), 256).tolist()},
    ':predict',
    400,
    'outside [0, 255]',
  ),
  (
    'threshold out of range',
    {'signature_name': 'with_threshold', 'inputs': {'images': _digit_rows(), 'threshold': 2.0}},
    ':predict',
    400,
    "'threshold' has values in [2, 2]",
  ),
  (
    'threshold missing',
    {'signature_name': 'with_threshold', 'inputs': _digit_rows()},
    ':predict',
    400,
    'several inputs',
  ),
  (
    'scalar in row format',
    {'signature_name': 'with_threshold', 'instances': _digit_rows()},
    ':predict',
    400,
    'columnar',
  ),
  (
    'batch over the limit',
    {'instances': np.zeros((MAX_BATCH + 1, 28, 28, 1)).tolist()},
    ':predict',
    400,
    f'exceeds the server limit of {MAX_BATCH}',
  ),
  (
    'unknown signature',
    {'signature_name': 'serving_f16', 'instances': _digit_rows()},
    ':predict',
    400,
    "Unknown signature_name 'serving_f16'",
  ),
  (
    'unknown model',
    {'instances': _digit_rows()},
    'MODEL=cats:predict',
    404,
    "Model 'cats' not found",
  ),
  ('unknown version', {'instances': _digit_rows()}, '/versions/7:predict', 404, 'Version 7'),
  (
    'b64 to a float signature',
    {'instances': [{'b64': 'iVBORw0KGgo='}]},
    ':predict',
    400,
    'nested lists of numbers',
  ),
  (
    'bare string image',
    {'signature_name': 'serving_image_bytes', 'instances': ['abc']},
    ':predict',
    400,
    'instance 0 of \'image_bytes\' must be {"b64"',
  ),
  (
    'not base64',
    {'signature_name': 'serving_image_bytes', 'instances': [{'b64': _png_b64()}, {'b64': '@@@'}]},
    ':predict',
    400,
    "instance 1 of 'image_bytes' is not valid base64",
  ),
  (
    'not an image',
    {
      'signature_name': 'serving_image_bytes',
      'inputs': [{'b64': base64.b64encode(b'GIF8 text').decode()}],
    },
    ':predict',
    400,
    "instance 0 of 'image_bytes' is not a PNG, JPEG, GIF or BMP file",
  ),
  (
    'corrupt PNG',
    {
      'signature_name': 'serving_image_bytes',
      'instances': [{'b64': _png_b64()}, {'b64': _png_b64()}, {'b64': _png_b64(corrupt=True)}],
    },
    ':predict',
    400,
    "instance 2 of 'image_bytes' is not a decodable image",
  ),
  (
    'decompression bomb',
    {
      'signature_name': 'serving_image_bytes',
      'instances': [{'b64': _png_b64()}, {'b64': _big_png_b64()}],
    },
    ':predict',
    400,
    "instance 1 of 'image_bytes' claims 16777216 pixels",
  ),
  (
    'empty image batch',
    {'signature_name': 'serving_image_bytes', 'inputs': []},
    ':predict',
    400,
    'empty batch',
  ),
  (
    'images over the limit',
    {'signature_name': 'serving_image_bytes', 'instances': [{'b64': _png_b64()}] * (MAX_BATCH + 1)},
    ':predict',
    400,
    f'exceeds the server limit of {MAX_BATCH}',
  ),
  ('unknown verb', {'instances': _digit_rows()}, ':classify', 404, 'No endpoint'),
  ('oversize body', b' ' * (MAX_BODY + 1), ':predict', 413, f'limit of {MAX_BODY} bytes'),
]


@pytest.mark.slow
@pytest.mark.parametrize(
  'name,body,suffix,status,error', BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_gets_4xx_with_error_and_server_keeps_serving(
  server, name, body, suffix, status, error
):
  del name
  _, url = server
  if suffix.startswith('MODEL='):
    path = f'{url}/v1/models/{suffix[len("MODEL=") :]}'
  else:
    path = f'{url}/v1/models/{NAME}{suffix}'
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  got_status, reply = http(path, data=data)
  assert got_status == status, reply
  assert set(reply) == {'error'}
  assert error in reply['error']
  assert http(f'{url}/v1/models/{NAME}')[0] == 200


@pytest.mark.slow
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


@pytest.mark.slow
def test_keep_alive_and_a_stalled_client_is_dropped(server):
  proc, url = server
  port = int(url.rsplit(':', 1)[1])
  conn = http_client.HTTPConnection('127.0.0.1', port, timeout=60)
  for _ in range(3):  # One connection, several requests.
    conn.request('POST', f'/v1/models/{NAME}:predict', json.dumps({'instances': _digit_rows()}))
    response = conn.getresponse()
    assert response.status == 200 and len(json.load(response)['predictions']) == 1
    if _ == 0:
      sock = conn.sock
    assert conn.sock is sock  # http.client reconnects (a new socket) if the server closed it.
  conn.close()
  with socket.create_connection(('127.0.0.1', port), timeout=60) as s:
    s.sendall(f'POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\nContent-Len'.encode())
    start = time.monotonic()
    reply = s.recv(4096)  # Blocks until the server gives up on this client.
    waited = time.monotonic() - start
  assert waited >= SOCKET_TIMEOUT - 0.5 and (reply == b'' or reply.startswith(b'HTTP/1.1 408'))
  assert proc.poll() is None and http(f'{url}/v1/models/{NAME}')[0] == 200


@pytest.mark.slow
def test_concurrent_requests_get_their_own_answers(run, server):
  _, url = server
  images, _ = support.digits(24)
  batches = [images[i : i + 3] for i in range(0, 24, 3)]  # 8 different requests.

  def send(batch):
    return http(f'{url}/v1/models/{NAME}:predict', {'instances': batch.tolist()})

  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    replies = list(pool.map(send, batches * 2))
  for batch, (status, reply) in zip(batches * 2, replies):
    assert status == 200
    assert_matches(reply['predictions'], expected(run, batch))


@pytest.mark.slow
def test_client_prints_decisions(run, server):
  _, url = server
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'tools', 'client.py'),
      f'--url={url}',
      f'--model={NAME}',
      f'--request={run["demo"]}',
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
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
    [
      sys.executable,
      os.path.join(ROOT, 'tools', 'client.py'),
      f'--url={url}',
      '--model=cats',
      '--uniform_noise=2',
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 1 and "Model 'cats' not found" in proc.stderr


@pytest.mark.slow
def test_threshold_override_in_process(run):
  app = rest_app.create_app(run['export_dir'], NAME, threshold=0.0)
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
  with pytest.raises(FileNotFoundError, match='Version 3 is not a complete version'):
    served_model.ServedModel(run['export_dir'], version=3)


# ----------------------------------------------------------------------------------------------
# Encoded images, metrics, batching, versions, shutdown.
# ----------------------------------------------------------------------------------------------


def noise_images(n, seed=0):
  """Uniform noise, float32 [n, 28, 28, 1] in multiples of 1/255 (so PNG holds it exactly)."""
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 28, 28, 1)) / 255.0).astype(np.float32)


def columns_to_rows(out):
  return [dict(zip(out, v)) for v in zip(*out.values())]


@pytest.mark.slow
def test_png_digits_and_noise_match_the_float_signature(run, server):
  _, url = server
  images = np.concatenate([support.digits(6)[0], noise_images(6)])
  files = b64(png_files(images))
  want = expected(run, images)
  status, floats = http(f'{url}/v1/models/{NAME}:predict', {'instances': images.tolist()})
  assert status == 200
  status, rows = http(
    f'{url}/v1/models/{NAME}:predict', {'signature_name': 'serving_image_bytes', 'instances': files}
  )
  assert status == 200, rows
  assert_matches(rows['predictions'], want)
  np.testing.assert_allclose(
    [r['confidence'] for r in rows['predictions']],
    [r['confidence'] for r in floats['predictions']],
    atol=1e-6,
  )
  # Columnar, keyed by input name, and row format keyed by input name.
  status, cols = http(
    f'{url}/v1/models/{NAME}:predict',
    {'signature_name': 'serving_image_bytes', 'inputs': {'image_bytes': files}},
  )
  assert status == 200
  assert_matches(columns_to_rows(cols['outputs']), want)
  status, keyed = http(
    f'{url}/v1/models/{NAME}:predict',
    {'signature_name': 'serving_image_bytes', 'instances': [{'image_bytes': f} for f in files]},
  )
  assert status == 200
  assert_matches(keyed['predictions'], want)


def test_image_pixels_reads_the_header_of_each_format():
  for fmt in ('PNG', 'GIF', 'BMP', 'JPEG'):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 70), np.uint8), 'L').save(buf, fmt)
    assert codec.image_pixels(buf.getvalue()) == 2100, fmt
  assert codec.image_pixels(b'\x89PNG\r\n') is None
  assert codec.image_pixels(b'\xff\xd8\xff garbage') is None


def test_decode_images_converts_channels_formats_and_sizes():
  """The graph's decoding against numpy: exact for same-size gray/RGB(A) PNG, BMP, GIF; integer
  shrinking is an exact area average; JPEG is lossy."""

  gray = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
  rgb = np.stack([gray, 255 - gray, gray // 2], -1)

  def encode(array, fmt, mode):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, fmt)
    return buf.getvalue()

  rgba = np.concatenate([rgb, np.full((28, 28, 1), 7, np.uint8)], -1)
  files = [
    encode(gray, 'PNG', 'L'),
    encode(gray, 'BMP', 'L'),
    encode(gray, 'GIF', 'L'),
    encode(np.kron(gray, np.ones((2, 2), np.uint8)), 'PNG', 'L'),
    encode(rgb, 'PNG', 'RGB'),
    encode(rgba, 'PNG', 'RGBA'),
    encode(gray, 'JPEG', 'L'),
  ]
  got = abstaining_classifier.decode_images(tf.constant(files), (28, 28, 1)).numpy()
  assert got.shape == (7, 28, 28, 1) and got.dtype == np.float32
  want = gray[..., None] / 255.0
  for i in range(4):
    np.testing.assert_allclose(got[i], want, atol=1e-6, err_msg=f'file {i}')
  want_gray = (rgb / 255.0) @ np.array([[0.299], [0.587], [0.114]])
  np.testing.assert_allclose(got[4], want_gray, atol=1e-6)
  np.testing.assert_allclose(got[5], want_gray, atol=1e-6)  # Alpha dropped.
  assert np.abs(got[6] - want).mean() < 0.05
  color = abstaining_classifier.decode_images(
    tf.constant(files[:1] + files[4:5]), (14, 14, 3)
  ).numpy()
  assert color.shape == (2, 14, 14, 3)
  small = gray.reshape(14, 2, 14, 2).mean(axis=(1, 3)) / 255.0
  np.testing.assert_allclose(color[0], np.repeat(small[..., None], 3, -1), atol=1e-6)
  np.testing.assert_allclose(
    color[1], rgb.reshape(14, 2, 14, 2, 3).mean(axis=(1, 3)) / 255.0, atol=1e-6
  )
  with pytest.raises(tf.errors.InvalidArgumentError):
    abstaining_classifier.decode_images(tf.constant([files[0][:60]]), (28, 28, 1))


def parse_metrics(text):
  """{(name, frozenset of labels): value} from Prometheus text."""
  values = {}
  for line in text.splitlines():
    match = re.fullmatch(r'([a-z_]+)(?:\{(.*)\})? (\S+)', line)
    if match and not line.startswith('#'):
      labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ''))
      values[(match.group(1), labels)] = float(match.group(3))
  return values


def metric_values(url):
  """parse_metrics of the server's endpoint."""
  with urllib.request.urlopen(f'{url}/monitoring/prometheus/metrics', timeout=60) as r:
    assert r.headers['Content-Type'].startswith('text/plain')
    return parse_metrics(r.read().decode())


@pytest.mark.slow
def test_metrics_count_accepted_and_abstained_per_version(run):
  """In-process, with the threshold at the median confidence of what is sent, so that both counts
  move whatever the tiny test model makes of digits and noise."""
  digits, noise = support.digits(12)[0], noise_images(12)
  conf = expected(run, np.concatenate([digits, noise]))[0]['confidence']
  app = rest_app.create_app(
    run['export_dir'],
    NAME,
    threshold=float(np.median(conf)),
    batching={
      'max_batch_size': 8,
      'batch_timeout_micros': 1000,
      'num_batch_threads': 1,
      'max_enqueued_batches': 4,
    },
  )
  client = werkzeug_test.Client(app)
  get = lambda: parse_metrics(client.get(rest_app.METRICS_PATH).get_data(as_text=True))
  key = lambda name, sig: (name, frozenset({('model_version', '1'), ('signature', sig)}))
  before = get()
  counts = {}
  for sig, images in [('serving_default', digits), ('serving_image_bytes', noise)]:
    body = (
      {'instances': images.tolist()}
      if sig == 'serving_default'
      else {'signature_name': sig, 'instances': b64(png_files(images))}
    )
    reply = client.post(f'/v1/models/{NAME}:predict', json=body)
    assert reply.status_code == 200
    accepted = sum(r['accepted'] for r in reply.get_json()['predictions'])
    counts[sig] = (accepted, len(images) - accepted)
  assert client.post(f'/v1/models/{NAME}:predict', data=b'{').status_code == 400
  after = get()
  rest_app.close_app(app)
  reply = client.post(f'/v1/models/{NAME}:predict', json={'instances': digits[:1].tolist()})
  assert reply.status_code == 503 and 'shutting down' in reply.get_json()['error']

  def delta(k):
    return after.get(k, 0.0) - before.get(k, 0.0)

  assert sum(a for a, _ in counts.values()) > 0 and sum(b for _, b in counts.values()) > 0, counts
  for sig, (accepted, abstained) in counts.items():
    assert delta(key('acet_serving_accepted_examples_total', sig)) == accepted
    assert delta(key('acet_serving_abstained_examples_total', sig)) == abstained
  ok = ('acet_serving_requests_total', frozenset({('endpoint', 'predict'), ('status', '200')}))
  bad = ('acet_serving_requests_total', frozenset({('endpoint', 'predict'), ('status', '400')}))
  assert delta(ok) == 2 and delta(bad) == 1
  latency = ('acet_serving_request_latency_seconds_count', frozenset({('endpoint', 'predict')}))
  assert delta(latency) == 3
  sizes = ('acet_serving_model_batch_size_sum', frozenset({('signature', 'serving_default')}))
  assert delta(sizes) == 12  # 12 > the batcher's 8: one direct call.
  assert after[('acet_serving_model_version_available', frozenset({('model_version', '1')}))] == 1


@pytest.mark.slow
def test_metrics_endpoint_over_http(server):
  _, url = server
  before = metric_values(url)
  assert http(f'{url}/v1/models/{NAME}:predict', {'instances': _digit_rows(3)})[0] == 200
  after = metric_values(url)
  total = lambda m, name: sum(v for (n, _), v in m.items() if n == name)
  assert (
    total(after, 'acet_serving_accepted_examples_total')
    + total(after, 'acet_serving_abstained_examples_total')
    - total(before, 'acet_serving_accepted_examples_total')
    - total(before, 'acet_serving_abstained_examples_total')
    == 3
  )
  assert total(after, 'acet_serving_model_batch_size_count') > total(
    before, 'acet_serving_model_batch_size_count'
  )


def test_batcher_merges_queued_requests_bounds_its_queue_and_isolates_errors():
  release, calls, queued = threading.Event(), [], []

  def fn(inputs):
    calls.append(inputs['x'].tolist())
    if len(calls) == 1:
      release.wait(60)  # Holds the only batch thread so the next requests queue up.
    if -1 in inputs['x']:
      raise ValueError('bad row')
    return {'y': inputs['x'] * 10}

  batcher = dynamic_batching.Batcher(
    max_batch_size=4,
    batch_timeout_micros=0,
    num_batch_threads=1,
    max_enqueued_batches=1,
    on_queue=queued.append,
  )
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    first = pool.submit(batcher.run, 'k', fn, {'x': np.array([0])}, 1)
    while not calls:
      time.sleep(0.01)
    later = [pool.submit(batcher.run, 'k', fn, {'x': np.array([i, i + 100])}, 2) for i in (1, 2)]
    while not queued or queued[-1] < 4:
      time.sleep(0.01)
    with pytest.raises(dynamic_batching.QueueFullError, match='queue is full'):
      batcher.run('k', fn, {'x': np.array([9])}, 1)  # 4 examples queued = the capacity.
    release.set()
    assert first.result(60)['y'].tolist() == [0]
    assert [f.result(60)['y'].tolist() for f in later] == [[10, 1010], [20, 1020]]
    assert calls[1] == [1, 101, 2, 102]  # The two queued requests in one call.
    good = pool.submit(batcher.run, 'k', fn, {'x': np.array([5])}, 1)
    bad = pool.submit(batcher.run, 'k', fn, {'x': np.array([-1])}, 1)
    assert good.result(60)['y'].tolist() == [50]
    with pytest.raises(ValueError, match='bad row'):
      bad.result(60)
  batcher.close()
  with pytest.raises(dynamic_batching.QueueFullError, match='shutting down'):
    batcher.run('k', fn, {'x': np.array([1])}, 1)


@pytest.mark.slow
def test_client_sends_image_files(run, server, tmp_path):
  _, url = server
  images = np.concatenate([support.digits(3)[0], noise_images(2)])
  paths = []
  for i, data in enumerate(png_files(images)):
    paths.append(tmp_path / f'img{i}.png')
    paths[-1].write_bytes(data)
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'tools', 'client.py'),
      f'--url={url}',
      f'--model={NAME}',
      '--image',
      *map(str, paths),
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  rows = [line.split() for line in proc.stdout.splitlines()[2:]]
  want, _ = expected(run, images)
  assert [r[1] for r in rows] == [p.name for p in paths]
  assert [r[-3] for r in rows] == [str(k) for k in want['predicted_class']]
  np.testing.assert_allclose([float(r[-2]) for r in rows], want['confidence'], atol=1e-4)


@pytest.mark.slow
def test_new_version_is_picked_up_without_failed_requests(run, tmp_path):
  export_dir = tmp_path / 'export'
  shutil.copytree(run['path'], export_dir / '1')
  poll = 0.5
  proc, url = start_server(
    export_dir, tmp_path / 'log.txt', f'--file_system_poll_wait_seconds={poll}', '--enable_batching'
  )
  try:
    images = support.digits(2)[0]
    stop, results = threading.Event(), []

    def client():
      while not stop.is_set():
        results.append(http(f'{url}/v1/models/{NAME}:predict', {'instances': images.tolist()})[0])

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
      t.start()
    for rel in support.copy_version_slowly(run['path'], str(export_dir / '2')):
      status = http(f'{url}/v1/models/{NAME}')[1]['model_version_status']
      assert [s['version'] for s in status] == ['1'], (rel, status)  # Never half a version.
    done = time.monotonic()
    ok = {'error_code': 'OK', 'error_message': ''}
    while True:
      status = http(f'{url}/v1/models/{NAME}')[1]['model_version_status']
      # Availability first, as TF Serving: version 1 serves until 2 is AVAILABLE, then ends (on a
      # loaded machine a poll can fall between the two).
      if status[0] == {'version': '2', 'state': 'AVAILABLE', 'status': ok}:
        if status[1]['state'] == 'END':
          break
        assert status[1]['state'] in ('AVAILABLE', 'UNLOADING'), status
      assert time.monotonic() - done < 120, status
      time.sleep(0.05)
    print(
      f'version 2 AVAILABLE {time.monotonic() - done:.2f}s after the copy ended '
      f'(poll interval {poll}s, plus loading)'
    )
    assert status[1] == {
      'version': '1',
      'state': 'END',
      'status': {'error_code': 'OK', 'error_message': ''},
    }
    time.sleep(1.0)  # Requests on version 2.
    stop.set()
    for t in threads:
      t.join()
    assert len(results) > 10 and set(results) == {200}, results
    v2 = f'{url}/v1/models/{NAME}/versions/2:predict'
    assert http(v2, {'instances': images.tolist()})[0] == 200
    status, reply = http(
      f'{url}/v1/models/{NAME}/versions/1:predict', {'instances': images.tolist()}
    )
    assert status == 404 and 'state END' in reply['error']
    metrics = metric_values(url)
    available = lambda v: metrics[
      ('acet_serving_model_version_available', frozenset({('model_version', v)}))
    ]
    assert available('2') == 1 and available('1') == 0
    assert (
      sum(
        v
        for (name, labels), v in metrics.items()
        if name == 'acet_serving_accepted_examples_total' and ('model_version', '2') in labels
      )
      > 0
    )
  finally:
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_shuts_down(server):
  """Last of the tests on `server`: it stops it."""
  proc, url = server
  port = int(url.rsplit(':', 1)[1])
  body = json.dumps({'instances': _digit_rows(2)}).encode()
  conn = http_client.HTTPConnection('127.0.0.1', port, timeout=120)
  conn.putrequest('POST', f'/v1/models/{NAME}:predict')
  conn.putheader('Content-Type', 'application/json')
  conn.putheader('Content-Length', str(len(body)))
  conn.endheaders(body[:100])  # The request is in flight: a worker is reading its body.
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  time.sleep(1.0)
  assert proc.poll() is None  # Still answering this request.
  conn.send(body[100:])
  response = conn.getresponse()
  assert response.status == 200
  assert len(json.load(response)['predictions']) == 2
  conn.close()
  assert proc.wait(timeout=120) == 0
  with pytest.raises(ConnectionRefusedError):
    socket.create_connection(('127.0.0.1', port), timeout=10).close()


def _fake_version(export_dir, version, *, complete=True):
  path = os.path.join(export_dir, str(version))
  os.makedirs(os.path.join(path, 'variables'))
  for rel in ('saved_model.pb', 'variables/variables.index'):
    with open(os.path.join(path, rel), 'w') as f:
      f.write(f'version {version}')
  export_layout.write_manifest(path)
  if not complete:  # As if still being copied: a listed file is shorter than the manifest says.
    with open(os.path.join(path, 'saved_model.pb'), 'w') as f:
      f.write('v')


class _FakeModel:
  def __init__(self, path):
    if os.path.exists(os.path.join(path, 'broken')):
      raise ValueError('cannot load this one')
    self.version = int(os.path.basename(path))


def test_versions_keep_the_newest_complete_ones_and_report_states(tmp_path):
  for v in (1, 2, 3):
    _fake_version(tmp_path, v)
  versions = model_versions.ModelVersions(str(tmp_path), _FakeModel, keep=2)
  assert versions.versions == [2, 3] and versions.get().version == 3
  assert versions.get(2).version == 2
  with pytest.raises(model_versions.VersionNotFoundError, match=r'serves version\(s\) \[2, 3\]'):
    versions.get(1)
  _fake_version(tmp_path, 4, complete=False)
  assert export_layout.incomplete_reason(str(tmp_path / '4')) == ('saved_model.pb has 1 of 9 bytes')
  _fake_version(tmp_path, 5)
  (tmp_path / '5' / 'broken').write_text('')
  versions.poll()
  assert versions.versions == [2, 3]  # 4 is incomplete, 5 failed: 3 and 2 stay.
  states = {s['version']: (s['state'], s['status']['error_message']) for s in versions.status()}
  assert states == {
    '5': ('END', 'ValueError: cannot load this one'),
    '3': ('AVAILABLE', ''),
    '2': ('AVAILABLE', ''),
  }
  _fake_version(tmp_path, 6)
  versions.poll()
  assert versions.versions == [3, 6]
  assert versions.status(2) == [
    {'version': '2', 'state': 'END', 'status': {'error_code': 'OK', 'error_message': ''}}
  ]
  shutil.rmtree(tmp_path / '6')
  shutil.rmtree(tmp_path / '3')
  versions.poll()  # Versions gone from disk are unloaded; the newest two left come back.
  assert versions.versions == [1, 2] and versions.status(1)[0]['state'] == 'AVAILABLE'
  shutil.rmtree(tmp_path / '2')
  shutil.rmtree(tmp_path / '1')
  versions.poll()
  with pytest.raises(model_versions.VersionNotFoundError, match='No version is served'):
    versions.get()
  with pytest.raises(FileNotFoundError, match='No complete version could be loaded'):
    model_versions.ModelVersions(str(tmp_path / 'none'), _FakeModel)
