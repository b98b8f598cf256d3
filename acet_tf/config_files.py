"""Where a `--config=configs/<file>.py[:arg]` flag's file is: as given, else the package's copy.

The config files live in the package (acet_tf/configs, installed with it); a clone also has them at
`configs/` (a link to that folder), so the README's commands run as written from a clone and, with
this fallback, from any directory once the package is installed. A path that exists is always read
as given: a user's own `configs/` beside their runs wins over the packaged one.
"""

import os

PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
_PREFIX = 'configs' + os.sep
_FLAG_NAMES = ('config', 'config_file')


def resolve(spec):
  """`spec` ('PATH[:arg]') with PATH replaced by the packaged file if only that one exists."""
  path, sep, arg = spec.partition(':')
  if os.path.exists(path) or not os.path.normpath(path).startswith(_PREFIX):
    return spec
  packaged = os.path.join(PACKAGE_CONFIGS, os.path.normpath(path)[len(_PREFIX) :])
  return packaged + sep + arg if os.path.exists(packaged) else spec


def packaged(name):
  """The path of the package's config file `name` (e.g. 'svhn.py')."""
  return os.path.join(PACKAGE_CONFIGS, name)


def display_name(path):
  """`configs/<file>` for a packaged config file, the path itself for any other."""
  path = os.path.abspath(path)
  if os.path.dirname(path) == PACKAGE_CONFIGS:
    return 'configs/' + os.path.basename(path)
  return path


def resolve_argv(argv):
  """argv with the file of each --config / --config_file flag resolved (both flag spellings)."""
  out = list(argv)
  for i, arg in enumerate(out):
    for name in _FLAG_NAMES:
      if arg.startswith(f'--{name}='):
        out[i] = f'--{name}=' + resolve(arg[len(name) + 3 :])
      elif arg == f'--{name}' and i + 1 < len(out):
        out[i + 1] = resolve(out[i + 1])
  return out
