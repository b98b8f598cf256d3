"""The authors' own TF 1 graph (model-100.meta) as an oracle for imported models.

The binary tools/reference_oracle.py prints Table 2 with it;
tests/reference/test_authors_checkpoints.py compares logits.

oracle_table2 computes Table 2 for the authors' graph with acet_tf's own search
(alpha_search.table2, the graph run through tf.py_function) on the uniform draws acet_tf.evaluate
uses (seed = the run's config.seed, 0 for every imported run): the two numbers can differ only by
float rounding in the logits. The graph is run as the reference models' README
(shared/reference_models) describes: the `.meta` without its `_output_shapes` attributes, imported
with `input_map` on the network's input `tower_0/cond_2/Merge:0` (the output of the graph's own
noise/PGD switch), restored with its saver.
Test and tool code only: the library never needs TF 1 graphs.
"""

import numpy as np
import tensorflow as tf

NETWORK_INPUT = 'tower_0/cond_2/Merge:0'
LOGITS = 'tower_0/logit/fc/xw_plus_b:0'


class ReferenceGraph:
  """The authors' network from `<checkpoint>.meta` with the weights of `<checkpoint>`.

  `logits(images)`: float32 [B, H, W, C] in [0, 1] (any B; values outside [0, 1] are fine too)
  -> float32 [B, K], batch norm in inference mode.
  """

  def __init__(self, checkpoint):
    meta = tf.compat.v1.MetaGraphDef()
    with tf.io.gfile.GFile(checkpoint + '.meta', 'rb') as f:
      meta.ParseFromString(f.read())
    for node in meta.graph_def.node:
      # TF 2 rejects the TF 1.10 shapes recorded here ("inconsistent with the GraphDef").
      if '_output_shapes' in node.attr:
        del node.attr['_output_shapes']
    self.graph = tf.Graph()
    with self.graph.as_default():
      self.images = tf.compat.v1.placeholder(tf.float32, [None, None, None, None], 'oracle_images')
      saver = tf.compat.v1.train.import_meta_graph(
        meta, clear_devices=True, input_map={NETWORK_INPUT: self.images}
      )
      self.session = tf.compat.v1.Session(graph=self.graph)
      saver.restore(self.session, checkpoint)
      self.logits_tensor = self.graph.get_tensor_by_name(LOGITS)
      shape = self.graph.get_tensor_by_name('Placeholder:0').shape
    # The graph still wants its own inputs fed, though the network no longer reads them.
    self._dummy = {
      'Placeholder:0': np.zeros([1, *[int(d) for d in shape[1:]]], np.float32),
      'Placeholder_1:0': np.zeros([1], np.int32),
      'is_training:0': False,
    }
    for name, value in (
      ('at_flag:0', False),
      ('rub_flag:0', False),
      ('adv_flag:0', False),
      ('max_conf_flag:0', False),
      ('at_frac:0', 0.0),
    ):
      try:
        self.graph.get_tensor_by_name(name)
        self._dummy[name] = value
      except KeyError:
        pass
    self.image_shape = tuple(int(d) for d in shape[1:])

  def logits(self, images):
    feed = dict(self._dummy)
    feed[self.images] = np.asarray(images, np.float32)
    return self.session.run(self.logits_tensor, feed)

  def predict_fn(self):
    """images float32 [B, H, W, C] -> softmax float32 [B, K], usable inside a tf.function (the
    session runs through tf.py_function), so alpha_search's own search can drive the graph."""
    k = int(self.logits_tensor.shape[-1])

    def predict(images):
      logits = tf.py_function(lambda x: self.logits(x.numpy()), [images], tf.float32)
      return tf.nn.softmax(tf.ensure_shape(logits, [None, k]))

    return predict

  def close(self):
    self.session.close()


def oracle_table2(checkpoint, *, num_examples, seed=0, batch_size=500):
  """alpha_search.table2's summary for the authors' graph on acet_tf.evaluate's draws and search."""
  from acet_tf.evaluation import alpha_search
  from acet_tf.evaluation import predictions as predictions_lib

  graph = ReferenceGraph(checkpoint)
  try:
    summary, _, _ = alpha_search.table2(
      graph.predict_fn(),
      graph.image_shape,
      seed=predictions_lib.eval_seed(seed, alpha_search.TABLE2_STREAM),
      num_examples=num_examples,
      batch_size=batch_size,
    )
  finally:
    graph.close()
  return summary
