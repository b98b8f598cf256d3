"""The versions a server keeps, as TensorFlow Serving's file-system source and version policy do.

ModelVersions polls the export base directory every poll_interval_s seconds, loads each new
complete version (export_layout.incomplete_reason is None: a half-written or half-copied
directory is never loaded) among the newest `keep`, then swaps the served set in one assignment:
a request that already holds a version finishes on it, later ones get the new set. A version is
unloaded only once a newer one is available (availability first), or when it leaves the disk (an
older complete one is then loaded again); a version that fails to load is reported with its error
and not retried.

States as TF Serving's ModelVersionStatus: LOADING, AVAILABLE, UNLOADING, END.
"""

import os
import threading

from absl import logging

from acet_tf.artifacts import export_layout


class VersionNotFoundError(LookupError):
  """The requested version is not served; the message lists those that are."""


class VersionLoadingError(VersionNotFoundError):
  """The requested version is being loaded; it is served once AVAILABLE (retry)."""


class ModelVersions:
  """The served versions of one export: get(version), status(version), a polling thread."""

  def __init__(
    self, export_dir, load, *, keep=1, poll_interval_s=0.0, on_change=None, allowed=None
  ):
    """Loads the newest `keep` complete versions now (FileNotFoundError if none loads).

    allowed: only these versions are served (TF Serving's specific version policy), or None.

    load(version_dir) -> a model object with a `version` attribute. poll_interval_s > 0 starts a
    daemon thread polling for new versions; 0 loads once. on_change(states) after each change.
    """
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f'keep must be an integer >= 1, got {keep!r}.')
    if poll_interval_s < 0:
      raise ValueError(f'poll_interval_s must be >= 0, got {poll_interval_s}.')
    self.export_dir = export_dir
    self.keep = keep
    self.poll_interval_s = poll_interval_s
    self.allowed = None if allowed is None else frozenset(allowed)
    self._load = load
    self._on_change = on_change or (lambda states: None)
    self._models = {}  # version -> model; replaced, never mutated, so readers need no lock.
    self._states = {}  # version -> (state, error message or '').
    self._failed = set()  # Versions that failed to load: not retried.
    self._lock = threading.Lock()  # One poll at a time.
    self._stop = threading.Event()
    self.poll()
    if not self._models:
      reasons = {
        v: export_layout.incomplete_reason(os.path.join(export_dir, str(v)))
        for v in export_layout.list_versions(export_dir)
      }
      errors = {v: msg for v, (_, msg) in self._states.items() if msg}
      raise FileNotFoundError(
        f'No complete version could be loaded from {export_dir}: incomplete {reasons}, '
        f'failed {errors}. acet_tf.export writes complete versions.'
      )
    self._thread = None
    if poll_interval_s > 0:
      self._thread = threading.Thread(target=self._poll_loop, name='version-poll', daemon=True)
      self._thread.start()

  def poll(self):
    """One look at the export directory: load new versions, swap, unload old ones."""
    with self._lock:
      complete = export_layout.complete_versions(self.export_dir)
      if self.allowed is not None:
        complete = [v for v in complete if v in self.allowed]
      wanted = [v for v in complete[::-1] if v not in self._failed][: self.keep]
      changed = False
      loaded = dict(self._models)
      for version in sorted(wanted):
        if version in loaded:
          continue
        self._states[version] = ('LOADING', '')
        try:
          loaded[version] = self._load(os.path.join(self.export_dir, str(version)))
          self._states[version] = ('AVAILABLE', '')
          logging.info('Loaded version %d of %s.', version, self.export_dir)
        except Exception as e:  # Deliberately broad: any failure is reported, not fatal.
          self._states[version] = ('END', f'{type(e).__name__}: {e}')
          self._failed.add(version)
          logging.exception('Version %d of %s failed to load.', version, self.export_dir)
        changed = True
      # Keep the newest `keep` that loaded; a version gone from disk is unloaded.
      served = sorted((v for v in loaded if v in complete), reverse=True)[: self.keep]
      new = {v: loaded[v] for v in served}
      if set(new) != set(self._models):
        changed = True
      gone = [v for v in self._models if v not in new]
      self._models = new  # The atomic switch.
      for version in gone:
        self._states[version] = ('UNLOADING', '')
        self._states[version] = ('END', '')  # Dropped; requests holding it finish on it.
        logging.info('Unloaded version %d of %s.', version, self.export_dir)
      if changed:
        self._on_change(dict(self._states))

  def _poll_loop(self):
    while not self._stop.wait(self.poll_interval_s):
      try:
        self.poll()
      except Exception:  # Deliberately broad: any failure is reported, not fatal.
        logging.exception(
          'Polling %s failed; trying again in %gs.', self.export_dir, self.poll_interval_s
        )

  def close(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  @property
  def versions(self):
    """Served versions, ascending."""
    return sorted(self._models)

  def get(self, version=None):
    """The model of `version`, or of the newest served one; VersionNotFoundError otherwise."""
    models = self._models
    if version is None:
      if not models:
        raise VersionNotFoundError(
          f'No version is served: {self.export_dir} has no complete version any more.'
        )
      return models[max(models)]
    if version not in models:
      state = self._states.get(version, ('',))[0]
      if state == 'LOADING':
        raise VersionLoadingError(
          f'Version {version} is loading; the server serves version(s) {sorted(models)}.'
        )
      why = f' (state {state})' if state else ''
      raise VersionNotFoundError(
        f'Version {version} is not served{why}; the server serves version(s) {sorted(models)}.'
      )
    return models[version]

  def status(self, version=None):
    """TF Serving's model_version_status list: every known version, or only `version`."""
    states = dict(self._states)
    if version is not None:
      if version not in states:
        raise VersionNotFoundError(
          f'Version {version} is unknown; known versions: {sorted(states)}.'
        )
      states = {version: states[version]}
    return [
      {
        'version': str(v),
        'state': state,
        'status': {'error_code': 'UNKNOWN' if msg else 'OK', 'error_message': msg},
      }
      for v, (state, msg) in sorted(states.items(), reverse=True)
    ]


class SingleVersion:
  """ModelVersions' interface over one loaded served_model.ServedModel (no directory watching)."""

  def __init__(self, model):
    self._model = model

  def get(self, version=None):
    if version is not None and version != self._model.version:
      raise VersionNotFoundError(
        f'Version {version} is not served; the server serves version(s) [{self._model.version}].'
      )
    return self._model

  def status(self, version=None):
    self.get(version)
    return [
      {
        'version': str(self._model.version),
        'state': 'AVAILABLE',
        'status': {'error_code': 'OK', 'error_message': ''},
      }
    ]

  def close(self):
    pass
