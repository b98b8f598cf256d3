"""A fit run with BackupAndRestore, run as a subprocess by test_outlier_aware_model: it can kill
itself (SIGKILL, nothing saved at that moment) at a given epoch and batch, and a rerun resumes.

  python -m tests.keras.backup_worker BACKUP_DIR OUT.npz [EPOCH BATCH]
"""

import os
import signal
import sys

import keras
import numpy as np
import tensorflow as tf

import acet_tf  # noqa: F401, I001 (before TensorFlow: the CPU kernels)
from acet_tf import keras as acet_keras
from tests import support


class KillAt(keras.callbacks.Callback):
  def __init__(self, epoch, batch):
    super().__init__()
    self.at, self.epoch = (epoch, batch), None

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if (self.epoch, batch) == self.at:
      os.kill(os.getpid(), signal.SIGKILL)


def main(backup_dir, out, kill_at=None):
  images, labels = support.toy_data(96)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(32)
  keras.utils.set_random_seed(0)
  classifier = keras.Sequential(
    [
      keras.Input((12, 12, 1)),
      keras.layers.Conv2D(8, 3, padding='same', activation='relu'),
      keras.layers.MaxPooling2D(2),
      keras.layers.Flatten(),
      keras.layers.Dense(3),
    ]
  )
  model = acet_keras.OutlierAwareModel(classifier, 'acet', pgd=dict(steps=2, step_size=0.15))
  model.compile(optimizer='adam')
  callbacks = [keras.callbacks.BackupAndRestore(backup_dir)]
  if kill_at:
    callbacks.append(KillAt(*kill_at))
  model.fit(dataset, epochs=3, verbose=0, callbacks=callbacks)
  weights = {f'w{i}': w for i, w in enumerate(classifier.get_weights())}
  np.savez(out, iterations=int(model.optimizer.iterations), **weights)


if __name__ == '__main__':
  args = sys.argv[1:]
  main(args[0], args[1], tuple(int(a) for a in args[2:4]) if len(args) > 2 else None)
