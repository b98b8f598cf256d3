"""Load test of acet_tf.serve on loopback: requests/s, images/s, p50/p99, beside in-process calls.

  python -m tools.load_test --export_dir=exports/mnist5k_acet --seconds=10 --rounds=3 \
      [--protocols=rest,grpc]

Starts two servers of the export on 127.0.0.1 (batching off and on; nothing else is contacted),
then runs each case for --seconds per round, --rounds times, alternating the servers within each
round so that the two are compared on the same load of the machine:
  b1      batch-1 float requests from --clients_b1 concurrent keep-alive clients
  b64     batch-64 float requests (JSON floats as Python's json writes them)
  b64png  batch-64 PNG files as {"b64": ...} to serving_image_bytes
over REST (JSON) and, with --protocols=rest,grpc, over gRPC with TF Serving's stubs (the same
images as float32 TensorProtos, the PNGs as DT_STRING), and, in this process, the SavedModel's
serving_default at batch 1 and 64 and serving_image_bytes at 64 (the same images). Bounded: each
client stops at the round's deadline or after --max_requests requests in the round. Prints one
JSON line per measurement, then a Markdown table of the medians and spreads over rounds.
"""

import argparse
import base64
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

NAME = 'load'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(export_dir, log_path, flags):
  """acet_tf.serve on 127.0.0.1, ports 0. Returns (process, REST port, gRPC port)."""
  log = open(log_path, 'w')  # Closed with the process.
  proc = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'acet_tf.serve',
      f'--export_dir={export_dir}',
      f'--model_name={NAME}',
      '--host=127.0.0.1',
      '--port=0',  # gRPC, as TF Serving's --port.
      '--rest_api_port=0',
      '--file_system_poll_wait_seconds=0',
      *flags,
    ],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=log,
  )
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None:
    text = open(log_path).read()
    match = re.search(r'at http://127\.0\.0\.1:(\d+)', text)
    if match:
      return proc, int(match.group(1)), int(re.search(r'gRPC at [\d.]+:(\d+)', text).group(1))
    time.sleep(0.2)
  proc.kill()
  raise RuntimeError(f'server did not start; see {log_path}')


def _rest_call(port):
  """A keep-alive REST client: call(body) -> None or an error string."""
  path = f'/v1/models/{NAME}:predict'
  headers = {'Content-Type': 'application/json'}
  conn = [http.client.HTTPConnection('127.0.0.1', port, timeout=60)]

  def call(body):
    try:
      conn[0].request('POST', path, body, headers)
      response = conn[0].getresponse()
      data = response.read()
      return None if response.status == 200 else f'{response.status}: {data[:100]!r}'
    except (OSError, http.client.HTTPException) as e:
      conn[0].close()
      conn[0] = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
      return repr(e)

  return call, lambda: conn[0].close()


def _grpc_call(port):
  """A gRPC client (its own channel) with TF Serving's stub: call(PredictRequest) -> None or an
  error string."""
  import grpc
  from tensorflow_serving.apis import prediction_service_pb2_grpc

  channel = grpc.insecure_channel(
    f'127.0.0.1:{port}', options=[('grpc.max_receive_message_length', 64 << 20)]
  )
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

  def call(request):
    try:
      stub.Predict(request, 60.0)
      return None
    except grpc.RpcError as e:
      return f'{e.code().name}: {e.details()[:100]}'

  return call, channel.close


def run_clients(port, body, clients, seconds, max_requests, protocol='rest'):
  """`clients` threads send `body` (REST: JSON bytes over keep-alive connections; gRPC: a
  PredictRequest) until the deadline.

  Returns {'requests', 'errors', 'seconds', 'latencies' (s, sorted)}.
  """
  connect = _rest_call if protocol == 'rest' else _grpc_call
  lock, latencies, errors = threading.Lock(), [], []
  count = [0]
  start = time.perf_counter()
  deadline = start + seconds

  def client():
    call, close = connect(port)
    mine = []
    while time.perf_counter() < deadline:
      with lock:
        if count[0] >= max_requests:
          break
        count[0] += 1
      t = time.perf_counter()
      error = call(body)
      if error is not None:
        errors.append(error)
        continue
      mine.append(time.perf_counter() - t)
    close()
    with lock:
      latencies.extend(mine)

  threads = [threading.Thread(target=client) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return {
    'requests': len(latencies),
    'errors': errors,
    'seconds': time.perf_counter() - start,
    'latencies': sorted(latencies),
  }


def summary(result, batch):
  lat = result['latencies']
  n = len(lat)
  pct = lambda q: lat[min(n - 1, int(q * n))] * 1e3 if n else float('nan')
  rps = n / result['seconds']
  return {
    'req_s': rps,
    'img_s': rps * batch,
    'p50_ms': pct(0.5),
    'p99_ms': pct(0.99),
    'requests': n,
    'errors': len(result['errors']),
    'first_errors': result['errors'][:3],
  }


def in_process(export_path, floats1, floats64, pngs64, seconds):
  """Calls/s of the loaded SavedModel's signatures, the server's model without HTTP."""
  import tensorflow as tf

  saved = tf.saved_model.load(export_path)
  cases = {
    'b1': ('serving_default', {'images': tf.constant(floats1)}, 1),
    'b64': ('serving_default', {'images': tf.constant(floats64)}, 64),
    'b64png': ('serving_image_bytes', {'image_bytes': tf.constant(pngs64)}, 64),
  }
  out = {}
  for case, (sig, kwargs, batch) in cases.items():
    fn = saved.signatures[sig]
    fn(**kwargs)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      fn(**kwargs)['accepted'].numpy()
      calls += 1
    rate = calls / (time.perf_counter() - start)
    out[case] = {'calls_s': rate, 'img_s': rate * batch}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--export_dir', required=True)
  parser.add_argument('--seconds', type=float, default=10.0, help='Per case and round.')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--max_requests', type=int, default=20000, help='Per case and round.')
  parser.add_argument('--clients_b1', type=int, default=16)
  parser.add_argument('--clients_b64', type=int, default=8)
  parser.add_argument('--cases', default='b1,b64,b64png')
  parser.add_argument('--protocols', default='rest', help='rest, grpc or rest,grpc.')
  parser.add_argument(
    '--batching_flags',
    default='--batching_max_batch_size=64,--batching_timeout_micros=2000,--batching_num_threads=2',
    help='Comma-separated flags of the batching server.',
  )
  args = parser.parse_args(argv)
  if not 0 < args.seconds <= 120 or not 1 <= args.rounds <= 10:
    parser.error('--seconds must be in (0, 120] and --rounds in [1, 10]: the test is bounded.')
  cases = args.cases.split(',')
  protocols = args.protocols.split(',')
  if not protocols or set(protocols) - {'rest', 'grpc'}:
    parser.error('--protocols is a comma-separated list of rest and grpc.')

  sys.path.insert(0, ROOT)
  import tensorflow as tf

  from acet_tf.artifacts import export_layout
  from acet_tf.data import input_pipeline

  images, _ = next(iter(input_pipeline.eval_dataset('mnist5k', 'test', 64, max_examples=64)))
  images = images.numpy()
  pngs = [tf.io.encode_png(np.round(x * 255).astype(np.uint8)).numpy() for x in images]
  bodies = {
    'b1': (json.dumps({'instances': images[:1].tolist()}).encode(), 1),
    'b64': (json.dumps({'instances': images.tolist()}).encode(), 64),
    'b64png': (
      json.dumps(
        {
          'signature_name': 'serving_image_bytes',
          'instances': [{'b64': base64.b64encode(p).decode()} for p in pngs],
        }
      ).encode(),
      64,
    ),
  }
  if 'grpc' in protocols:
    from tensorflow_serving.apis import predict_pb2

    def predict_request(signature, key, value):
      request = predict_pb2.PredictRequest()
      request.model_spec.name = NAME
      request.model_spec.signature_name = signature
      request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
      return request

    grpc_bodies = {
      'b1': predict_request('serving_default', 'images', images[:1]),
      'b64': predict_request('serving_default', 'images', images),
      'b64png': predict_request('serving_image_bytes', 'image_bytes', np.array(pngs, object)),
    }
  version = export_layout.complete_versions(args.export_dir)[-1]

  tmp = tempfile.mkdtemp(prefix='load_test_')
  servers = {}
  try:
    servers['off'] = start_server(args.export_dir, os.path.join(tmp, 'off.log'), [])
    servers['on'] = start_server(
      args.export_dir,
      os.path.join(tmp, 'on.log'),
      ['--enable_batching', *args.batching_flags.split(',')],
    )
    rows = {}
    for r in range(args.rounds):
      for case in cases:
        body, batch = bodies[case]
        clients = args.clients_b1 if case == 'b1' else args.clients_b64
        order = ['off', 'on'] if r % 2 == 0 else ['on', 'off']
        for mode in order:
          for protocol in protocols if r % 2 == 0 else protocols[::-1]:
            port = servers[mode][1] if protocol == 'rest' else servers[mode][2]
            payload = body if protocol == 'rest' else grpc_bodies[case]
            s = summary(
              run_clients(port, payload, clients, args.seconds, args.max_requests, protocol),
              batch,
            )
            s.update(case=case, batching=mode, protocol=protocol, clients=clients, round=r)
            print(json.dumps(s), flush=True)
            rows.setdefault((case, mode, protocol), []).append(s)
      inproc = in_process(
        os.path.join(args.export_dir, str(version)),
        images[:1],
        images,
        pngs,
        min(args.seconds, 5.0),
      )
      for case, s in inproc.items():
        s.update(case=case, batching='in-process', round=r)
        print(json.dumps(s), flush=True)
        rows.setdefault((case, 'in-process', ''), []).append(s)
  finally:
    for proc, *_ in servers.values():
      proc.terminate()
    for proc, *_ in servers.values():
      proc.wait(timeout=120)

  def cell(values, fmt):
    med = statistics.median(values)
    return f'{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})'

  print(f'\nMedian (min-max) over {args.rounds} rounds of {args.seconds:g} s:\n')
  print('| case | server | clients | req/s | img/s | p50 ms | p99 ms | errors |')
  print('|---|---|---|---|---|---|---|---|')
  for (case, mode, protocol), ss in rows.items():
    if mode == 'in-process':
      print(
        f'| {case} | in-process signature | 1 | {cell([s["calls_s"] for s in ss], "{:.0f}")} '
        f'| {cell([s["img_s"] for s in ss], "{:.0f}")} | | | |'
      )
    else:
      print(
        f'| {case} | {"gRPC, " if protocol == "grpc" else ""}batching {mode} | '
        f'{ss[0]["clients"]} | '
        f'{cell([s["req_s"] for s in ss], "{:.0f}")} | '
        f'{cell([s["img_s"] for s in ss], "{:.0f}")} | '
        f'{cell([s["p50_ms"] for s in ss], "{:.1f}")} | '
        f'{cell([s["p99_ms"] for s in ss], "{:.1f}")} | {sum(s["errors"] for s in ss)} |'
      )
  return 0


if __name__ == '__main__':
  sys.exit(main())
