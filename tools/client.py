"""Sends images to acet_tf.serve (or TensorFlow Serving) and prints class, confidence, decision.

Standard library only, so it runs anywhere:

  python -m tools.client --model=mnist5k_acet --request=/tmp/demo.json
  python -m tools.client --model=mnist5k_acet --uniform_noise=5
  python -m tools.client --model=mnist5k_acet --image digit.png photo.jpg

--request is a JSON file holding a :predict body ({"instances": ...} or {"inputs": ...}, optionally
"signature_name") and optionally "descriptions", one string per image, printed beside the results
and not sent (`python -m acet_tf.export ... --demo_request=FILE` writes such a file).
--uniform_noise=N sends N images of uniform noise in [0, 1] of the model's input shape instead.
--image sends image files (PNG, JPEG, GIF, BMP) as they are, base64 in TF Serving's
{"b64": ...} form, to the serving_image_bytes signature, which decodes and resizes them.
Exits with status 1 and the server's error message if the request fails.
"""

import argparse
import base64
import json
import os
import random
import sys
import urllib.error
import urllib.request

SENT_KEYS = ('instances', 'inputs', 'signature_name')


def call(url, body=None, timeout=60.0):
  """GET (body None) or POST JSON to `url`; returns the decoded JSON reply.

  Raises RuntimeError with the server's {"error": ...} message on an HTTP error status.
  """
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, headers={'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return json.load(response)
  except urllib.error.HTTPError as e:
    detail = e.read().decode(errors='replace')
    try:
      detail = json.loads(detail)['error']
    except (ValueError, KeyError, TypeError):
      pass
    raise RuntimeError(f'HTTP {e.code} from {url}: {detail}') from None


def uniform_noise_request(num_images, shape, seed):
  """{"instances": num_images images of `shape` [H, W, C], uniform in [0, 1]} and descriptions."""
  rng = random.Random(seed)
  h, w, c = shape
  images = [
    [[[rng.random() for _ in range(c)] for _ in range(w)] for _ in range(h)]
    for _ in range(num_images)
  ]
  return {'instances': images}, [f'uniform noise {i}' for i in range(num_images)]


def image_request(paths):
  """{"signature_name": "serving_image_bytes", "instances": [{"b64": ...}]} and the file names."""
  instances = []
  for path in paths:
    with open(path, 'rb') as f:
      instances.append({'b64': base64.b64encode(f.read()).decode('ascii')})
  return (
    {'signature_name': 'serving_image_bytes', 'instances': instances},
    [os.path.basename(p) for p in paths],
  )


def rows_of(reply):
  """Per-image dicts from a row-format ("predictions") or columnar ("outputs") reply."""
  if 'predictions' in reply:
    return reply['predictions']
  outputs = reply['outputs']
  return [dict(zip(outputs, values)) for values in zip(*outputs.values())]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--url', default='http://127.0.0.1:8501', help='Server base URL.')
  parser.add_argument('--model', required=True, help='NAME in /v1/models/NAME.')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--request', help='JSON file with the :predict body (see above).')
  source.add_argument('--uniform_noise', type=int, help='Send this many uniform noise images.')
  source.add_argument('--image', nargs='+', metavar='PATH', help='Send these image files.')
  parser.add_argument('--signature', help='Overrides the signature_name of the request.')
  parser.add_argument('--seed', type=int, default=0, help='Seed of --uniform_noise.')
  args = parser.parse_args(argv)

  base = f'{args.url.rstrip("/")}/v1/models/{args.model}'
  try:
    acet = call(f'{base}/metadata')['metadata'].get('acet_tf', {})
    if args.request:
      with open(args.request) as f:
        request = json.load(f)
      descriptions = request.get('descriptions')
      body = {k: v for k, v in request.items() if k in SENT_KEYS}
    elif args.image:
      body, descriptions = image_request(args.image)
    else:
      if args.uniform_noise < 1:
        parser.error('--uniform_noise must be >= 1')
      if 'input' not in acet:
        parser.error('the server gives no input shape in its metadata; use --request')
      body, descriptions = uniform_noise_request(
        args.uniform_noise, acet['input']['shape'], args.seed
      )
    if args.signature:
      body['signature_name'] = args.signature
    rows = rows_of(call(f'{base}:predict', body))
  except (RuntimeError, OSError, ValueError) as e:  # URLError is an OSError.
    print(f'error: {e}', file=sys.stderr)
    return 1

  names = acet.get('class_names')
  threshold = acet.get('threshold', {})
  print(f'threshold {threshold.get("current", threshold.get("value", "?"))}')
  print(f'{"#":>3}  {"image":<28} {"class":>8} {"confidence":>10}  decision')
  for i, row in enumerate(rows):
    k = row['predicted_class']
    label = row.get('class_name') or (names[k] if names and 0 <= k < len(names) else str(k))
    what = descriptions[i] if descriptions and i < len(descriptions) else ''
    decision = 'accepted' if row['accepted'] else 'abstained'
    print(f'{i:>3}  {what:<28} {label:>8} {row["confidence"]:>10.4f}  {decision}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
