"""Writes a small labelled image folder (or .npz) to try `folder:PATH` / `npz:PATH` datasets.

  python -m tools.make_image_folder --out=data/shapes --per_class=60 --size=28

Three classes of RGB pictures, one sub-folder each (circle/, square/, triangle/): a bright shape
of random size, place and colour on a dark noisy background, every other image a PNG, the others
JPEGs. --npz=FILE writes the same pictures as x_train/y_train/x_test/y_test (uint8) and
class_names instead (a quarter of each class as test split).
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

CLASSES = ('circle', 'square', 'triangle')


def draw(kind, size, rng):
  """One uint8 [size, size, 3] picture of `kind` (one of CLASSES)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  r = rng.uniform(0.2, 0.35) * size
  cy, cx = rng.uniform(r, size - r, 2)
  if kind == 'circle':
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
  elif kind == 'square':
    mask = (np.abs(yy - cy) <= r * 0.8) & (np.abs(xx - cx) <= r * 0.8)
  else:  # An upward triangle: below the apex, inside two slanted edges.
    top, bottom = cy - r, cy + r
    half = (yy - top) / (2 * r) * r
    mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
  background = rng.uniform(0, 60, (size, size, 3))
  colour = rng.uniform(150, 255, 3)
  image = np.where(mask[..., None], colour, background) + rng.normal(0, 8, (size, size, 3))
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def pictures(per_class, size, seed):
  """{class name: [uint8 [size, size, 3]] * per_class}."""
  rng = np.random.default_rng(seed)
  return {kind: [draw(kind, size, rng) for _ in range(per_class)] for kind in CLASSES}


def write_folder(out, per_class, size, seed=0):
  """out/<class>/<i>.png or .jpg; returns the number of files written."""
  n = 0
  for kind, images in pictures(per_class, size, seed).items():
    os.makedirs(os.path.join(out, kind), exist_ok=True)
    for i, image in enumerate(images):
      ext = 'png' if i % 2 == 0 else 'jpg'
      Image.fromarray(image).save(os.path.join(out, kind, f'{kind}_{i:04d}.{ext}'))
      n += 1
  return n


def write_npz(path, per_class, size, seed=0):
  """x_train, y_train, x_test, y_test (a quarter of each class), class_names; returns counts."""
  split = {'train': ([], []), 'test': ([], [])}
  for k, images in enumerate(pictures(per_class, size, seed).values()):
    n_test = max(1, per_class // 4)
    for i, image in enumerate(images):
      x, y = split['test' if i < n_test else 'train']
      x.append(image)
      y.append(k)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(
    path,
    x_train=np.stack(split['train'][0]),
    y_train=np.array(split['train'][1]),
    x_test=np.stack(split['test'][0]),
    y_test=np.array(split['test'][1]),
    class_names=np.array(CLASSES),
  )
  return len(split['train'][1]), len(split['test'][1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', help='folder to write (one sub-folder per class)')
  parser.add_argument('--npz', help='write an .npz file instead')
  parser.add_argument('--per_class', type=int, default=60)
  parser.add_argument('--size', type=int, default=28, help='height = width in pixels')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if bool(args.out) == bool(args.npz):
    parser.error('give exactly one of --out and --npz')
  if args.per_class < 2 or args.size < 8:
    parser.error('--per_class must be >= 2 and --size >= 8')
  if args.out:
    n = write_folder(args.out, args.per_class, args.size, args.seed)
    print(f'wrote {n} images of {len(CLASSES)} classes ({", ".join(CLASSES)}) to {args.out}')
  else:
    n_train, n_test = write_npz(args.npz, args.per_class, args.size, args.seed)
    print(f'wrote {args.npz}: {n_train} train and {n_test} test images of {len(CLASSES)} classes')
  return 0


if __name__ == '__main__':
  sys.exit(main())
