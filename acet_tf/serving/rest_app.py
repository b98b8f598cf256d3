"""TF Serving's REST API (a subset) as a WSGI app over the loaded versions; no flags, no sockets.

  GET  /v1/models/NAME[/versions/N]            status of every (or that) version, with its state
  GET  /v1/models/NAME[/versions/N]/metadata   signature defs, plus the export's metadata
  POST /v1/models/NAME[/versions/N]:predict    {"instances": [...]} -> {"predictions": [...]}
                                               {"inputs": ...} -> {"outputs": {...}}
  GET  /monitoring/prometheus/metrics          Prometheus text (monitoring)

with an optional "signature_name" (serving_default, serving_uint8, with_threshold or
serving_image_bytes) in the body. The routes are the only layer that knows HTTP: the body is
decoded and checked by codec, run by a served_model.ServedModel from model_versions (through
dynamic_batching's Batcher with batching on; a full queue gets 503) and encoded by codec; a bad
request gets a 4xx with {"error": "..."} naming the problem and the server goes on.
create_app builds the whole stack from an export directory; runner.serve puts it on a socket.
Needs nothing of the training code: it reads only the SavedModel and its metadata asset.
"""

from collections.abc import Mapping
import functools
import gc
import time
from typing import Any

from absl import logging
import orjson
from werkzeug import exceptions
from werkzeug import routing
from werkzeug import wrappers

from acet_tf.serving import codec
from acet_tf.serving import dynamic_batching
from acet_tf.serving import model_versions
from acet_tf.serving import monitoring
from acet_tf.serving import served_model


class _ModelNameConverter(routing.BaseConverter):
  regex = '[^/:]+'  # Stops before ':predict'.


METRICS_PATH = '/monitoring/prometheus/metrics'


class RestApp:
  """The REST API as a WSGI app around the served versions (werkzeug Request/Response).

  Args:
    versions: a model_versions.ModelVersions (or a single served_model.ServedModel, served alone).
    model_name: NAME in /v1/models/NAME.
    max_body_bytes, max_batch_size: larger bodies get 413, larger batches 400.
    batcher: a dynamic_batching.Batcher for dynamic batching, or None (one model call a request).
    metrics: a monitoring.ServingMetrics (a new one by default).
    labels: {label: version}, TF Serving's version labels (/v1/models/NAME/labels/LABEL, gRPC
      version_label); a label resolves only to a served version.
    request_timeout_s: a :predict whose model call has not started this long after the request
      arrived is answered 504 and not run (None: no deadline).
  """

  def __init__(
    self,
    versions,
    model_name,
    *,
    max_body_bytes=16 << 20,
    max_batch_size=1024,
    batcher=None,
    metrics=None,
    request_timeout_s=None,
    labels=None,
  ):
    if not model_name or '/' in model_name or ':' in model_name:
      raise ValueError(f'model_name must be non-empty without "/" or ":", got {model_name!r}.')
    if max_body_bytes < 1 or max_batch_size < 1:
      raise ValueError(
        f'max_body_bytes and max_batch_size must be >= 1, got {max_body_bytes}, {max_batch_size}.'
      )
    if isinstance(versions, served_model.ServedModel):
      versions = model_versions.SingleVersion(versions)
    self.versions = versions
    self.model_name = model_name
    self.max_body_bytes = max_body_bytes
    self.max_batch_size = max_batch_size
    self.batcher = batcher
    self.metrics = metrics or monitoring.ServingMetrics()
    self.request_timeout_s = request_timeout_s
    self.labels = dict(labels or {})
    base, version = '/v1/models/<name:name>', '/v1/models/<name:name>/versions/<int:version>'
    label = '/v1/models/<name:name>/labels/<label:label>'
    rules = [routing.Rule(METRICS_PATH, endpoint='metrics', methods=['GET'])]
    for prefix in (base, version, label):
      rules += [
        routing.Rule(prefix, endpoint='status', methods=['GET']),
        routing.Rule(prefix + '/metadata', endpoint='metadata', methods=['GET']),
        routing.Rule(prefix + ':predict', endpoint='predict', methods=['POST']),
      ]
    self.url_map = routing.Map(
      rules, converters={'name': _ModelNameConverter, 'label': _ModelNameConverter}
    )

  @property
  def model(self):
    """The newest served version."""
    return self.versions.get()

  def __call__(self, environ, start_response):
    started = time.perf_counter()
    request = wrappers.Request(environ)
    request.max_content_length = self.max_body_bytes
    endpoint, mimetype = 'unknown', 'application/json'
    try:
      endpoint, args = self.url_map.bind_to_environ(environ).match()
      if endpoint == 'metrics':
        status, body, mimetype = 200, self.metrics.render(), monitoring.CONTENT_TYPE
      else:
        self._check_name(args['name'])
        if 'label' in args:
          args['version'] = self.version_for_label(args['label'])
        deadline = (
          None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
        )
        status, body = getattr(self, '_' + endpoint)(request, args.get('version'), deadline)
    except served_model.RequestError as e:
      status, body = e.code, {'error': str(e)}
    except model_versions.VersionLoadingError as e:
      status, body = 503, {'error': str(e)}
    except model_versions.VersionNotFoundError as e:
      status, body = 404, {'error': str(e)}
    except dynamic_batching.QueueFullError as e:
      status, body = 503, {'error': str(e)}
    except exceptions.RequestEntityTooLarge:
      status, body = (
        413,
        {
          'error': f'The request body exceeds the limit of '
          f'{self.max_body_bytes} bytes; send smaller batches.'
        },
      )
    except exceptions.MethodNotAllowed as e:
      status, body = (
        405,
        {
          'error': f'{request.method} is not allowed on {request.path}; use '
          f'{", ".join(sorted(e.valid_methods or []))}.'
        },
      )
    except exceptions.NotFound:
      status, body = (
        404,
        {
          'error': f'No endpoint {request.path}; the API is /v1/models/'
          f'{self.model_name}[/versions/N][/metadata|:predict] and '
          f'{METRICS_PATH}.'
        },
      )
    except exceptions.HTTPException as e:
      status, body = e.code, {'error': e.description}
    except Exception as e:  # Deliberately broad: any failure is reported, not fatal.
      logging.exception('Internal error on %s %s', request.method, request.path)
      status, body = 500, {'error': f'Internal error: {type(e).__name__}: {e}'}
    if not isinstance(body, bytes):
      body = orjson.dumps(body)
    response = wrappers.Response(body, status=status, mimetype=mimetype)
    result = response(environ, start_response)
    self.metrics.observe_request(endpoint, status, time.perf_counter() - started)
    return result

  def _check_name(self, name):
    if name != self.model_name:
      raise served_model.RequestError(
        f'Model {name!r} not found; this server serves {self.model_name!r}.', 404
      )

  def version_for_label(self, label):
    """The version a label points at; VersionNotFoundError if none, or if it is not served."""
    if label not in self.labels:
      raise model_versions.VersionNotFoundError(
        f'Label {label!r} is not defined; labels: {self.labels or "none"}.'
      )
    version = self.labels[label]
    self.versions.get(version)  # A label points only at a served version, as in TF Serving.
    return version

  def set_labels(self, labels):
    """Replaces the labels in one step; LookupError (and no change) if one names a version not
    served."""
    for label, version in labels.items():
      try:
        self.versions.get(version)
      except model_versions.VersionNotFoundError as e:
        raise LookupError(f'label {label!r} -> version {version}: {e}') from None
    self.labels = dict(labels)

  def _status(self, request, version, deadline):
    del request, deadline
    return 200, {'model_version_status': self.versions.status(version)}

  def _metadata(self, request, version, deadline):
    del request, deadline
    model = self.versions.get(version)
    acet = dict(model.metadata)
    acet['threshold'] = dict(acet['threshold'], current=model.threshold)
    return 200, {
      'model_spec': {'name': self.model_name, 'signature_name': '', 'version': str(model.version)},
      'metadata': {'signature_def': {'signature_def': model.signature_defs}, 'acet_tf': acet},
    }

  def _predict(self, request, version, deadline):
    data = request.get_data(cache=False)  # Raises RequestEntityTooLarge past the cap.
    body = codec.decode_json(data)
    model = self.versions.get(version)  # Held to the end: a version switch cannot cut it off.
    name, arrays, row_format = codec.parse_predict_request(body, model.specs, self.max_batch_size)
    outputs = self.run(model, name, arrays, deadline)
    if 'accepted' in outputs:
      self.metrics.observe_decisions(model.version, name, outputs['accepted'])
    return 200, codec.format_response(outputs, row_format)

  def run(self, model, name, arrays, deadline=None):
    """One validated predict on `model` (through the batcher when on), as REST and gRPC run it.

    deadline: a time.monotonic() time; past it the model is not called and
    served_model.DeadlineExceededError is raised.
    """
    specs = model.specs[name]
    # The batch size from a batched input (with_threshold's threshold is a scalar).
    size = next((len(arrays[k]) for k, s in sorted(specs.items()) if s.batched), 1)
    batchable = all(s.batched for s in specs.values())
    if deadline is not None and time.monotonic() >= deadline:
      raise served_model.DeadlineExceededError()
    if self.batcher is None or not batchable or size > self.batcher.max_batch_size:
      self.metrics.batch_size.labels(name).observe(size)
      return model.predict(name, arrays)
    fn = functools.partial(model.predict, name)
    return self.batcher.run((id(model), name), fn, arrays, size, deadline)

  def on_batch(self, key, size):
    """Batcher callback: one merged model call of `size` examples."""
    self.metrics.batch_size.labels(key[1]).observe(size)


def freeze_gc():
  """Moves every object alive now (TensorFlow's and the loaded model's, about a million) out of
  the garbage collector's sight. Decoding a float batch makes ~50,000 lists, enough to set off
  full collections, and each scanned all of them: 300 ms instead of 13 ms per 64 images here.
  A larger first-generation threshold (20,000 allocations, not 700) takes a further third off.
  Called again after each version change: unfreezing first lets a full collection free the cycles
  of an unloaded version (a pause of a fraction of a second, once per change)."""
  gc.unfreeze()
  gc.collect()
  gc.freeze()
  gc.set_threshold(20_000, 20, 10)


def create_app(
  export_dir: str,
  model_name: str,
  *,
  version: int | None = None,
  threshold: float | None = None,
  max_body_bytes: int = 16 << 20,
  max_batch_size: int = 1024,
  keep_versions: int = 1,
  poll_interval_s: float = 0.0,
  batching: Mapping[str, Any] | None = None,
  tune_gc: bool = False,
  request_timeout_s: float | None = None,
  labels: Mapping[str, int] | None = None,
  allowed_versions: tuple | None = None,
) -> 'RestApp':
  """Loads the export and returns its RestApp (a WSGI callable).

  version: serve only this version (no watching); otherwise the newest `keep_versions`, polled
  every `poll_interval_s` seconds (0: loaded once). batching: None, or a dict of
  dynamic_batching.Batcher's arguments (max_batch_size, batch_timeout_micros, num_batch_threads,
  max_enqueued_batches). allowed_versions: serve only these (None: any). tune_gc: freeze_gc()
  after each load (process-wide, so for the server binary, not for a library caller).
  """
  after_load = freeze_gc if tune_gc else (lambda: None)
  metrics = monitoring.ServingMetrics()
  if version is not None:
    versions = model_versions.SingleVersion(
      served_model.ServedModel(export_dir, version=version, threshold=threshold)
    )
    metrics.observe_versions({version: ('AVAILABLE', '')})
    after_load()
  else:
    versions = model_versions.ModelVersions(
      export_dir,
      functools.partial(served_model.ServedModel.from_version_dir, threshold=threshold),
      keep=keep_versions,
      poll_interval_s=poll_interval_s,
      allowed=allowed_versions,
      on_change=lambda states: (metrics.observe_versions(states), after_load()),
    )
  rest = RestApp(
    versions,
    model_name,
    max_body_bytes=max_body_bytes,
    max_batch_size=max_batch_size,
    metrics=metrics,
    request_timeout_s=request_timeout_s,
    labels=labels,
  )
  if batching is not None:
    rest.batcher = dynamic_batching.Batcher(
      on_batch=rest.on_batch, on_queue=metrics.queue.set, **batching
    )
  return rest


def close_app(rest):
  """Stops the app's threads: the batcher after running what is queued, the version polling."""
  if rest.batcher is not None:
    rest.batcher.close()
  rest.versions.close()
