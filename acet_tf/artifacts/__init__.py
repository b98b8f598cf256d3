"""What a run leaves on disk, and the one place that knows each layout: the run directory
(config, checkpoints, metrics) and the export directory (versions, completeness). May import:
models, data."""
