"""The paper's building blocks as TensorFlow ops: p_out noise, the CEDA/ACET losses, PGD, seed
streams. May import: acet_tf.cpu_backend only."""
