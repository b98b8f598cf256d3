"""Scripts over acet_tf: benchmark, figures, load test, the authors' graph as an oracle.

`python -m tools.X` runs this file first: importing acet_tf here chooses TensorFlow's CPU kernels
before a tool's own `import tensorflow` (acet_tf/cpu_backend.py).
"""

import acet_tf  # noqa: F401
