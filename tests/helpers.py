"""Shared test helpers (imported by the test modules; pytest puts this folder on sys.path)."""

from configs import shapes as shapes_config


def override(config, **overrides):
  """Sets dotted-path fields in place ('model.refiner.num_heads': 3) and returns the config."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def smoke_config(**overrides):
  """The demo's smoke variant on a one-device mesh, with dotted-path overrides."""
  c = shapes_config.get_config('smoke')
  c.mesh.shape = (1, 1, 1)
  return override(c, **overrides)
