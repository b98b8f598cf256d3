"""Table 1 and 2 and the evaluation beyond the paper, as units over predict functions: metrics,
scores, the alpha search, attacked sets, reports. May import: robustness, artifacts, models, data,
ops; never training, exporting or serving."""
