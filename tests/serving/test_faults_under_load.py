"""acet_tf.serve under load (16 clients) while a fault happens: a new version, a corrupt version,
a removed version, SIGTERM (issue 24). One server process per scenario, batching on."""

import dataclasses
import glob
from http import client as http_client
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.request

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from acet_tf.artifacts import export_layout
from tests import support

NAME = 'digits'
CLIENTS = 16
GRPC_CLIENTS = 4  # Of the CLIENTS; the others send REST.
POLL_S = 0.5  # --file_system_poll_wait_seconds.
LOAD_MAX_S = 60  # No load runs longer, whatever happens to the test.
REQUEST_TIMEOUT_S = 30
OK_STATUS = {'error_code': 'OK', 'error_message': ''}


@dataclasses.dataclass
class Answer:
  sent: float  # time.monotonic() once the request was written (gRPC: when the call was made).
  done: float
  protocol: str  # 'rest' or 'grpc'.
  status: object  # HTTP status (int), a gRPC code name ('OK'), or 'connection' (no answer).
  version: int | None  # gRPC: the response's model_spec.version (REST's :predict names none).
  error: str = ''

  @property
  def ok(self):
    return self.status in (200, 'OK')


class Load:
  """CLIENTS threads sending :predict of 2 digits, each request after the previous answer, until
  stop() or LOAD_MAX_S. REST clients keep one kept-alive connection (reconnecting after a close);
  GRPC_CLIENTS of them call Predict through TF Serving's PredictionServiceStub."""

  def __init__(self, url, grpc_target):
    images = support.digits(2)[0]
    self.port = int(url.rsplit(':', 1)[1])
    self.body = json.dumps({'instances': images.tolist()}).encode()
    self.request = predict_pb2.PredictRequest()
    self.request.model_spec.name = NAME
    self.request.inputs['images'].CopyFrom(tf.make_tensor_proto(images))
    self.grpc_target = grpc_target
    self.answers = []  # list.append is atomic: the clients share it without a lock.
    self._stop = threading.Event()
    self._deadline = time.monotonic() + LOAD_MAX_S
    self._threads = [
      threading.Thread(target=self._grpc if i < GRPC_CLIENTS else self._rest, daemon=True)
      for i in range(CLIENTS)
    ]
    for t in self._threads:
      t.start()

  def _running(self):
    return not self._stop.is_set() and time.monotonic() < self._deadline

  def _rest(self):
    conn = None
    while self._running():
      sent = time.monotonic()
      try:
        if conn is None:
          conn = http_client.HTTPConnection('127.0.0.1', self.port, timeout=REQUEST_TIMEOUT_S)
          conn.connect()
        conn.putrequest('POST', f'/v1/models/{NAME}:predict')
        conn.putheader('Content-Type', 'application/json')
        conn.putheader('Content-Length', str(len(self.body)))
        conn.endheaders(self.body)
        sent = time.monotonic()
        response = conn.getresponse()
        data = response.read()
        error = '' if response.status == 200 else data.decode(errors='replace')[:300]
        self.answers.append(Answer(sent, time.monotonic(), 'rest', response.status, None, error))
        if response.will_close:
          conn.close()
          conn = None
      except (OSError, http_client.HTTPException) as e:
        self.answers.append(Answer(sent, time.monotonic(), 'rest', 'connection', None, repr(e)))
        if conn is not None:
          conn.close()
        conn = None
        time.sleep(0.05)  # The server is going away: no busy loop of refused connections.
    if conn is not None:
      conn.close()

  def _grpc(self):
    with grpc.insecure_channel(self.grpc_target) as channel:
      stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
      while self._running():
        sent = time.monotonic()
        try:
          response = stub.Predict(self.request, REQUEST_TIMEOUT_S)
          answer = Answer(sent, time.monotonic(), 'grpc', 'OK', response.model_spec.version.value)
        except grpc.RpcError as e:
          answer = Answer(sent, time.monotonic(), 'grpc', e.code().name, None, e.details())
          time.sleep(0.05)
        self.answers.append(answer)

  def stop(self):
    self._stop.set()
    for t in self._threads:
      t.join(timeout=REQUEST_TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in self._threads)
    return list(self.answers)


def assert_all_ok(answers, min_count=50):
  failed = [a for a in answers if not a.ok]
  assert not failed, f'{len(failed)} of {len(answers)} requests failed, e.g. {failed[:5]}'
  assert len(answers) >= min_count, len(answers)  # The load was real.
  assert {a.protocol for a in answers} == {'rest', 'grpc'}


def status_of(url):
  """{version: (state, status)} of GET /v1/models/NAME."""
  with urllib.request.urlopen(f'{url}/v1/models/{NAME}', timeout=REQUEST_TIMEOUT_S) as response:
    entries = json.load(response)['model_version_status']
  return {int(e['version']): (e['state'], e['status']) for e in entries}


def wait_for(url, condition, timeout_s=30):
  """Polls the status until condition(status) holds; returns [(time, status)] of every look."""
  looks, deadline = [], time.monotonic() + timeout_s
  while True:
    looks.append((time.monotonic(), status_of(url)))
    if condition(looks[-1][1]):
      return looks
    assert time.monotonic() < deadline, f'status after {timeout_s}s: {looks[-1][1]}'
    time.sleep(0.05)


@pytest.fixture
def export_dir(exported_run, tmp_path):
  """A copy of the export with version 1 only (each test changes its own)."""
  path = tmp_path / 'export'
  shutil.copytree(exported_run['path'], path / '1')
  return path


@pytest.fixture
def serve(tmp_path):
  """serve(export_dir, *flags) -> (process, url, gRPC target); killed at the end if still up."""
  procs = []

  def start(export_dir, *flags):
    log = tmp_path / 'log.txt'
    proc, url = support.start_server(
      export_dir,
      NAME,
      log,
      '--enable_batching',
      '--batching_max_batch_size=8',
      f'--file_system_poll_wait_seconds={POLL_S}',
      *flags,
    )
    procs.append(proc)
    return proc, url, support.grpc_address(log)

  yield start
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.slow
def test_new_version_under_load(exported_run, export_dir, serve):
  _, url, target = serve(export_dir)
  load = Load(url, target)
  try:
    time.sleep(0.5)
    looks = [(time.monotonic(), status_of(url))]
    for _ in support.copy_version_slowly(exported_run['path'], str(export_dir / '2')):
      looks.append((time.monotonic(), status_of(url)))
    looks += wait_for(url, lambda s: s.get(1, ('',))[0] == 'END')
    time.sleep(1.0)  # Requests on version 2.
  finally:
    answers = load.stop()
  assert_all_ok(answers)
  # Availability first, as TF Serving: version 1 is AVAILABLE until 2 is, then it ends.
  states = [(s.get(2, (None,))[0], s[1][0]) for _, s in looks]
  order = [
    (None, 'AVAILABLE'),
    ('LOADING', 'AVAILABLE'),
    ('AVAILABLE', 'AVAILABLE'),
    ('AVAILABLE', 'UNLOADING'),
    ('AVAILABLE', 'END'),
  ]
  assert all(s in order for s in states), states
  assert [order.index(s) for s in states] == sorted(order.index(s) for s in states), states
  assert looks[-1][1] == {2: ('AVAILABLE', OK_STATUS), 1: ('END', OK_STATUS)}
  last_without_2 = max(t for t, s in looks if s.get(2, (None,))[0] != 'AVAILABLE')
  first_end_of_1 = min(t for t, s in looks if s[1][0] == 'END')
  served = [a for a in answers if a.protocol == 'grpc']
  assert {a.version for a in served} == {1, 2}
  # Answered before version 2 was seen AVAILABLE: version 1; asked after 1 ended: version 2.
  assert {a.version for a in served if a.done < last_without_2} == {1}
  assert {a.version for a in served if a.sent > first_end_of_1} == {2}


@pytest.mark.slow
def test_corrupt_version_is_reported_and_the_old_one_keeps_serving(
  exported_run, export_dir, serve, tmp_path
):
  _, url, target = serve(export_dir)
  corrupt = tmp_path / 'corrupt'
  shutil.copytree(exported_run['path'], corrupt)
  (data,) = glob.glob(str(corrupt / 'variables' / 'variables.data-*'))
  os.truncate(data, os.path.getsize(data) // 2)
  load = Load(url, target)
  try:
    time.sleep(0.5)
    os.rename(corrupt, export_dir / '2')  # Appears at once, truncated.
    time.sleep(4 * POLL_S)
    # Its manifest lists the full size: to the server it is still being copied, not failed.
    assert status_of(url) == {1: ('AVAILABLE', OK_STATUS)}
    # As an exporter that wrote a bad file would: the manifest now agrees with the disk.
    export_layout.write_manifest(str(export_dir / '2'))
    looks = wait_for(url, lambda s: 2 in s and s[2][0] != 'LOADING')
    time.sleep(1.0)  # More requests after the failure.
    final = status_of(url)
  finally:
    answers = load.stop()
  assert_all_ok(answers)
  assert {a.version for a in answers if a.protocol == 'grpc'} == {1}
  # TF Serving's report of a version that failed to load: END with the error, not retried.
  assert final == looks[-1][1]
  assert final[1] == ('AVAILABLE', OK_STATUS)
  state, status = final[2]
  assert state == 'END' and status['error_code'] == 'UNKNOWN', final
  assert status['error_message'], final
  print(f'version 2: {status["error_message"][:200]}')


@pytest.mark.slow
def test_removed_version_moves_requests_to_the_remaining_one(exported_run, export_dir, serve):
  shutil.copytree(exported_run['path'], export_dir / '2')
  _, url, target = serve(export_dir, '--keep_versions=2')
  assert status_of(url) == {2: ('AVAILABLE', OK_STATUS), 1: ('AVAILABLE', OK_STATUS)}
  load = Load(url, target)
  try:
    time.sleep(1.5)
    removed = time.monotonic()
    shutil.rmtree(export_dir / '2')
    looks = wait_for(url, lambda s: s[2][0] == 'END')
    time.sleep(1.5)  # Requests on version 1.
  finally:
    answers = load.stop()
  assert_all_ok(answers)
  assert looks[-1][1] == {2: ('END', OK_STATUS), 1: ('AVAILABLE', OK_STATUS)}
  served = [a for a in answers if a.protocol == 'grpc']
  assert {a.version for a in served if a.done < removed} == {2}
  assert {a.version for a in served if a.sent > looks[-1][0]} == {1}


@pytest.mark.slow
def test_sigterm_under_load_answers_every_request_in_flight(export_dir, serve):
  proc, url, target = serve(export_dir)
  load = Load(url, target)
  try:
    time.sleep(2.0)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=90)
    exited = time.monotonic()
  finally:
    answers = load.stop()
  assert code == 0
  assert exited - signalled < 30  # Drained: the requests in flight take a fraction of this.
  before = [a for a in answers if a.sent < signalled]
  in_flight = [a for a in before if a.done > signalled]
  failed = [a for a in before if not a.ok]
  assert not failed, (
    f'{len(failed)} of {len(before)} requests sent before SIGTERM failed: '
    f'{[(a, round(a.sent - signalled, 4)) for a in failed]}'
  )
  assert len(before) >= 50 and {a.protocol for a in in_flight} == {'rest', 'grpc'}, in_flight
  # After the signal: answered, or refused as a stopping server refuses (never a 5xx): REST's
  # connection refused or closed, gRPC's UNAVAILABLE, or CANCELLED for a call still queued in
  # gRPC core when it stopped (see acet_tf.serve's on_stop).
  after = [a for a in answers if a.sent >= signalled and not a.ok]
  assert {a.status for a in after} <= {'connection', 'UNAVAILABLE', 'CANCELLED'}, after
  print(f'{len(in_flight)} requests in flight at SIGTERM, exit {exited - signalled:.2f}s later')
  for port in (load.port, int(target.rsplit(':', 1)[1])):
    with pytest.raises(ConnectionRefusedError):
      socket.create_connection(('127.0.0.1', port), timeout=10).close()
