"""TensorFlow Serving's directory layout: EXPORT/<integer version>/saved_model.pb."""
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
    if re.fullmatch(r'\d+', name) and (not complete_only or tf.io.gfile.exists(
        os.path.join(export_dir, name, 'saved_model.pb'))):
      versions.append(int(name))
  return sorted(versions)
