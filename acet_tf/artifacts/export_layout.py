"""TensorFlow Serving's directory layout: EXPORT/<integer version>/saved_model.pb, and when a
version is complete (MANIFEST)."""

import json
import os
import re

import tensorflow as tf


def list_versions(export_dir, *, complete_only=True):
  """The integer version directories below `export_dir`, ascending.

  With complete_only, only those that hold a saved_model.pb (what can be served or evaluated);
  without, every integer directory (what a new version must not overwrite).
  """
  if not tf.io.gfile.isdir(export_dir):
    return []
  versions = []
  for name in tf.io.gfile.listdir(export_dir):
    name = name.rstrip('/')
    if re.fullmatch(r'\d+', name) and (
      not complete_only or tf.io.gfile.exists(os.path.join(export_dir, name, 'saved_model.pb'))
    ):
      versions.append(int(name))
  return sorted(versions)


# A version is complete when its manifest, written last by the exporter, is there and every file it
# lists has the listed size: a directory being copied in (cp -r, rsync, gsutil, in any order) or
# half-saved is never taken for a version, even if the manifest itself arrives first.
MANIFEST = 'acet_tf_export_complete.json'


def write_manifest(version_dir):
  """Writes MANIFEST into `version_dir`, listing every file below it with its size in bytes."""
  files = {}
  for root, _, names in tf.io.gfile.walk(version_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, version_dir)
      if rel != MANIFEST:
        files[rel] = tf.io.gfile.stat(path).length
  with tf.io.gfile.GFile(os.path.join(version_dir, MANIFEST + '.tmp'), 'w') as f:
    json.dump({'files': files}, f, indent=1, sort_keys=True)
  tf.io.gfile.rename(
    os.path.join(version_dir, MANIFEST + '.tmp'),
    os.path.join(version_dir, MANIFEST),
    overwrite=True,
  )


def incomplete_reason(version_dir):
  """None if `version_dir` is a complete version (see MANIFEST), else what is missing."""
  path = os.path.join(version_dir, MANIFEST)
  if not tf.io.gfile.exists(path):
    return f'no {MANIFEST} (the exporter writes it last)'
  try:
    with tf.io.gfile.GFile(path) as f:
      files = json.load(f)['files']
  except (ValueError, KeyError, TypeError) as e:
    return f'{MANIFEST} is unreadable ({e}), perhaps still being written'
  for required in ('saved_model.pb', 'variables/variables.index'):
    if required not in files:
      return f'{MANIFEST} does not list {required}'
  for rel, size in files.items():
    full = os.path.join(version_dir, rel)
    if not tf.io.gfile.exists(full):
      return f'{rel} is missing'
    if tf.io.gfile.stat(full).length != size:
      return f'{rel} has {tf.io.gfile.stat(full).length} of {size} bytes'
  return None


def complete_versions(export_dir):
  """The integer versions below `export_dir` that are complete (incomplete_reason is None)."""
  return [
    v
    for v in list_versions(export_dir)
    if incomplete_reason(os.path.join(export_dir, str(v))) is None
  ]
