"""The datasets: TFDS and the user's own (folder:, npz:) input pipelines, the recorded facts of
known datasets, the out-distribution sets. May import: nothing else of acet_tf."""
