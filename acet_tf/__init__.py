"""acet_tf: image classifiers that know when they don't know (Hein et al., CVPR 2019)."""

from acet_tf import cpu_backend

# Before any acet_tf module imports TensorFlow: oneDNN's CPU kernels where TensorFlow would
# otherwise leave them off (cpu_backend's docstring).
cpu_backend.configure()
