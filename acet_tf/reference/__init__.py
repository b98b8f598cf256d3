"""The authors' released TF 1 checkpoints read into acet_tf runs. May import: artifacts, models,
data."""
