"""Writes an evaluation's results: `metrics.json` (every number plus the protocol) and a markdown table.

The protocol travels with the numbers: N (held-out examples), image resolution, refinement steps, seed,
checkpoint step, and which evaluators ran, so a table is never quoted without what it was measured on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def protocol(config, *, step: int, num_examples: int) -> dict[str, Any]:
  """The settings a reader needs to interpret (or reproduce) the numbers."""
  r = config.refine
  steps = int(r.num_steps) if config.model.refiner.enabled else 0
  return {
      'dataset': config.data.name, 'split': 'test', 'num_examples': int(num_examples),
      'resolution': int(config.data.image_size), 'refinement_steps': steps, 'refine_t_start': int(r.t_start),
      'seed': int(config.seed), 'checkpoint_step': int(step), 'weights': 'EMA generator and refiner',
      'evaluators': list(config.eval.evaluators), 'caption_metrics': list(config.eval.metrics),
      'beam_size': int(config.eval.beam_size),
  }


def markdown(metrics: Mapping[str, float], proto: Mapping[str, Any]) -> str:
  """A two-part markdown report: the protocol, then one row per metric (grouped by its prefix)."""
  lines = ['# Evaluation', '', '| setting | value |', '| --- | --- |']
  lines += [f'| {k} | {v if not isinstance(v, list) else ", ".join(map(str, v))} |' for k, v in proto.items()]
  lines += ['', '| metric | value |', '| --- | --- |']
  for k in sorted(metrics):
    v = metrics[k]
    lines.append(f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |')
  return '\n'.join(lines) + '\n'


def write(directory: str, metrics: Mapping[str, float], proto: Mapping[str, Any]) -> tuple[str, str]:
  """Writes directory/metrics.json and directory/metrics.md; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  js, md = os.path.join(directory, 'metrics.json'), os.path.join(directory, 'metrics.md')
  with open(js, 'w') as f:
    json.dump({'protocol': dict(proto), 'metrics': dict(metrics)}, f, indent=2, sort_keys=True)
  with open(md, 'w') as f:
    f.write(markdown(metrics, proto))
  return js, md
