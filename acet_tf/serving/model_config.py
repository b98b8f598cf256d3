"""TF Serving's --model_config_file (text-format ModelServerConfig), for one model per server.

  model_config_list {
    config {
      name: "mnist5k_acet"
      base_path: "exports/mnist5k_acet"
      model_platform: "tensorflow"
      model_version_policy { latest { num_versions: 2 } }   # or all {} or specific { versions: 1 }
      version_labels { key: "stable" value: 1 }
      version_labels { key: "canary" value: 2 }
    }
  }

read() parses it with TF Serving's own proto (tensorflow_serving.config.model_server_config_pb2)
and returns a ModelConfig; anything this server does not do (several models, another platform, a
relative base_path's surprises aside) is refused with a message rather than ignored.
"""

import dataclasses
import threading

from absl import logging
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

# "all {}": every complete version on disk, as many as this.
ALL_VERSIONS = 1 << 20


class ConfigError(ValueError):
  """The model config file is not one this server can serve; the message says why."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str
  base_path: str
  keep: int  # The newest `keep` complete versions (among `versions` if given).
  versions: tuple | None  # specific { versions: ... }, or None.
  labels: dict  # {label: version}


def parse(text, where='the model config'):
  """Text-format ModelServerConfig -> ModelConfig; ConfigError if it is not served here."""
  try:
    proto = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
  except text_format.ParseError as e:
    raise ConfigError(f'{where} is not a text-format ModelServerConfig: {e}') from None
  if proto.WhichOneof('config') != 'model_config_list':
    raise ConfigError(f'{where} must hold model_config_list {{ config {{ ... }} }}.')
  configs = proto.model_config_list.config
  if len(configs) != 1:
    raise ConfigError(
      f'{where} lists {len(configs)} models; this server serves one model per process '
      '(run one server per model).'
    )
  config = configs[0]
  if not config.name or not config.base_path:
    raise ConfigError(f'{where}: the model config needs a name and a base_path.')
  if config.model_platform not in ('', 'tensorflow'):
    raise ConfigError(f'{where}: model_platform {config.model_platform!r} is not "tensorflow".')
  policy = config.model_version_policy
  which = policy.WhichOneof('policy_choice')
  versions = None
  if which == 'all':
    keep = ALL_VERSIONS
  elif which == 'specific':
    versions = tuple(sorted(set(policy.specific.versions)))
    if not versions:
      raise ConfigError(f'{where}: specific {{ }} names no version.')
    keep = len(versions)
  else:  # latest, or no policy: TF Serving's default is the newest one.
    keep = policy.latest.num_versions if which == 'latest' else 1
    if keep < 1:
      raise ConfigError(f'{where}: latest {{ num_versions }} must be >= 1.')
  return ModelConfig(config.name, config.base_path, keep, versions, dict(config.version_labels))


def read(path):
  """parse() of the file at `path`."""
  with open(path) as f:
    return parse(f.read(), path)


class Watcher:
  """Re-reads the file every interval_s seconds (TF Serving's
  --model_config_file_poll_wait_seconds) and calls set_labels(labels) when the labels change;
  set_labels raises LookupError for a label on a version not served, and the old labels stay.
  A change of name, base_path or policy is logged as needing a restart, not applied."""

  def __init__(self, path, config, set_labels, interval_s):
    self.path, self.config, self._set_labels = path, config, set_labels
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=self._loop, args=(interval_s,), name='model-config-poll', daemon=True
    )
    self._thread.start()

  def check(self):
    """One look at the file; returns the config now applied."""
    try:
      new = read(self.path)
    except (OSError, ConfigError) as e:
      logging.error('Model config %s not re-read: %s', self.path, e)
      return self.config
    if dataclasses.replace(new, labels={}) != dataclasses.replace(self.config, labels={}):
      logging.error(
        'Model config %s changed the model, its path or version policy; restart the server to '
        'apply that (only version_labels change while serving).',
        self.path,
      )
    if new.labels != self.config.labels:
      try:
        self._set_labels(new.labels)
      except LookupError as e:
        logging.error('Version labels of %s not applied: %s', self.path, e)
        return self.config
      logging.info('Version labels now %s.', new.labels)
      self.config = dataclasses.replace(self.config, labels=new.labels)
    return self.config

  def _loop(self, interval_s):
    while not self._stop.wait(interval_s):
      self.check()

  def close(self):
    self._stop.set()
    self._thread.join()
