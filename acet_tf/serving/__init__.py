"""TF Serving's REST API over an export, in layers: the loaded model, the set of loaded versions,
the request codec, the WSGI routes, batching, monitoring, the socket runner. May import:
acet_tf.artifacts.export_layout only (it loads and runs an export, nothing of training)."""
