"""Attacks and bounds beyond the paper's PGD: APGD, attack specs, the worst case over attacks, IBP
bounds. May import: acet_tf.ops."""
