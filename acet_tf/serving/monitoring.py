"""Prometheus metrics of the REST server (prometheus_client), served at TF Serving's path
/monitoring/prometheus/metrics.

  acet_serving_requests_total{endpoint, status}             HTTP requests by endpoint and code
  acet_serving_request_latency_seconds{endpoint}            histogram, from body read to response
  acet_serving_model_batch_size{signature}                  histogram of examples per model call
  acet_serving_accepted_examples_total{model_version, signature}
  acet_serving_abstained_examples_total{model_version, signature}
  acet_serving_batch_queue_examples                         examples waiting for a batch
  acet_serving_model_version_available{model_version}       1 while the version is served

A rising abstained / (accepted + abstained) is the first sign that inputs drift away from the
training data: the model is less confident on them (the paper's point is that it should be).
"""

import prometheus_client

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
  """The server's metrics in their own registry (several servers in one process stay apart)."""

  def __init__(self):
    self.registry = prometheus_client.CollectorRegistry()
    r = self.registry
    self.requests = prometheus_client.Counter(
      'acet_serving_requests',
      'HTTP requests by endpoint and status code.',
      ['endpoint', 'status'],
      registry=r,
    )
    self.latency = prometheus_client.Histogram(
      'acet_serving_request_latency_seconds',
      'Request latency in seconds by endpoint.',
      ['endpoint'],
      buckets=_LATENCY_BUCKETS,
      registry=r,
    )
    self.batch_size = prometheus_client.Histogram(
      'acet_serving_model_batch_size',
      'Examples per model call (after dynamic batching).',
      ['signature'],
      buckets=_BATCH_BUCKETS,
      registry=r,
    )
    self.accepted = prometheus_client.Counter(
      'acet_serving_accepted_examples',
      'Examples answered with confidence >= threshold.',
      ['model_version', 'signature'],
      registry=r,
    )
    self.abstained = prometheus_client.Counter(
      'acet_serving_abstained_examples',
      'Examples abstained on (confidence < threshold).',
      ['model_version', 'signature'],
      registry=r,
    )
    self.queue = prometheus_client.Gauge(
      'acet_serving_batch_queue_examples', 'Examples waiting in the batch queue.', registry=r
    )
    self.available = prometheus_client.Gauge(
      'acet_serving_model_version_available',
      '1 while the model version is served.',
      ['model_version'],
      registry=r,
    )

  def observe_request(self, endpoint, status, seconds):
    self.requests.labels(endpoint, str(status)).inc()
    self.latency.labels(endpoint).observe(seconds)

  def observe_decisions(self, version, signature, accepted):
    """accepted: bool array [n] of one answered request."""
    n_accepted = int(accepted.sum())
    self.accepted.labels(str(version), signature).inc(n_accepted)
    self.abstained.labels(str(version), signature).inc(len(accepted) - n_accepted)

  def observe_versions(self, states):
    """states: {version: (state, message)} from ModelVersions."""
    for version, (state, _) in states.items():
      self.available.labels(str(version)).set(1 if state == 'AVAILABLE' else 0)

  def render(self):
    return prometheus_client.generate_latest(self.registry)
