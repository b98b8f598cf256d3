"""Table 2 for the authors' own TF 1 graph, on the uniform draws and with the search acet_tf uses.

  python -m tools.reference_oracle --checkpoint=../shared/reference_models/cifar10_acet/model-100 \
      --table2_examples=1000 [--seed=0]

Prints one JSON line. The graph and the search are tools/tf1_reference_graph.py.
"""

import json
import time

from absl import app
from absl import flags

from tools import tf1_reference_graph

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, "The authors' checkpoint prefix.")
_EXAMPLES = flags.DEFINE_integer('table2_examples', 1000, 'Uniform draws.')
_SEED = flags.DEFINE_integer('seed', 0, "The run's config.seed (0 for imported runs).")


def main(argv):
  del argv
  start = time.time()
  summary = tf1_reference_graph.oracle_table2(
    _CHECKPOINT.value, num_examples=_EXAMPLES.value, seed=_SEED.value
  )
  print(json.dumps(dict(summary, checkpoint=_CHECKPOINT.value, seconds=time.time() - start)))


if __name__ == '__main__':
  app.run(main)
