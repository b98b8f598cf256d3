"""The trainer: the compiled train step (plain, CEDA, ACET), the tf.distribute strategy, the loop
with checkpoints, summaries and resumption. May import: evaluation and the layers below it."""
