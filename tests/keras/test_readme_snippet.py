"""README's "In your own Keras code" runs as written."""

import os
import re

from tests import support


def readme_snippet():
  """The first python block of the README section "In your own Keras code"."""
  with open(os.path.join(support.ROOT, 'README.md')) as f:
    readme = f.read()
  section = readme.split('## In your own Keras code', 1)[1].split('\n## ', 1)[0]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch):
  code = readme_snippet()
  assert "OutlierAwareModel(my_keras_classifier, method='acet')" in code
  assert "model.compile(optimizer='adam', metrics=['accuracy'])" in code
  monkeypatch.chdir(tmp_path)  # TensorBoard('logs') writes here.
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # noqa: S102 (the README's own code)
  history = scope['model'].history.history
  assert len(history['loss']) == 12 and history['mmc_out'][-1] < history['mmc_out'][0]
  assert os.listdir(tmp_path / 'logs' / 'train')
