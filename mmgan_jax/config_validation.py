"""Checks every user-facing config field before anything is built or compiled, and reports all problems at once.

Anchor: the rules the code itself enforces, read from the modules that enforce them (no rule is invented here):
  * resolution: G synthesises from a 4x4 constant and doubles once per entry of `generator.channels` after the
    first (`generator.num_resolutions`: latent side = 4 * 2 ** (len(channels) - 1), a power of two >= 4), D
    mirrors it; the latent side is `image_size / f` with f the codec's `downsample_factor` (1 for 'identity',
    2 ** (len(codec.channels) - 1) for 'kl', `codec.latent_shape`); the ViT patchifies the pixel image; the
    refiner's U-Net needs latent % (patch_size * 2 ** (len(channels) - 1)) == 0 (`diffusion.Denoiser`);
  * attention: flax `MultiHeadDotProductAttention` needs width % num_heads == 0 in every transformer (text /
    image / audio encoders, fusion, text decoder) and at the refiner's lowest level; the generator's
    cross-attention uses gcd(num_heads, C) heads, so only num_heads >= 1 is asked of it; the ViT's sin-cos 2-D
    position embedding needs width % 4 == 0;
  * mesh: `sharding.make_mesh` (one -1 at most, product == device count) and `sharding.check_batch_divisible`
    (global batch divisible by the devices of the mesh axes that the 'batch' logical axis maps to);
  * refinement: `diffusion.refine` takes t_start in [0, T_refiner], num_steps >= 0 (more steps than t_start are
    silently cut to t_start, so that is rejected when t_start > 0);
  * names: datasets (`data.registry`), modalities (`models.mmgan._check_modalities`), dtypes (`mmgan.DTYPES`),
    frozen components (`train.state.make_optimizers`), evaluator plug-ins and their settings
    (`evaluation.evaluator.make_plugins`), caption metrics (`text_metrics.ALL_METRICS`);
  * the embedded 'shapes' dataset's own limits (`data.shapes.ShapesSpec`, called as is).

Checks that need a file or the environment are left to load time, where they still fail before compilation with
their own messages: the stage-1 codec checkpoint of codec.type='kl' (an empty path included:
`codec_stage.load` says to run launch/train_codec.py), FID weights, Java for METEOR, the real datasets on disk.

`validate(config, num_devices=...)` is pure Python (no device work, a few milliseconds) and raises `ConfigError`,
a ValueError whose message has one line per problem: the full field path, the bad value, the allowed values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from mmgan_jax.data import registry
from mmgan_jax.models import codec as codec_lib
from mmgan_jax.models import diffusion, fusion, generator, mmgan
from mmgan_jax.train import sharding
from mmgan_jax.train import state as state_lib

_MISSING = object()
_DEFAULT_BATCH_AXES = ('data', 'fsdp')  # sharding.batch_sharding's default for a missing 'batch' rule

DATASETS = registry.DATASETS
CODECS = ('identity', 'kl')
FREEZABLE = tuple(n for n in state_lib.TRAINABLE if n not in ('generator', 'discriminator'))


class ConfigError(ValueError):
  """A config that cannot run; `problems` holds one line per bad field (full path, value, allowed values)."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    n = len(self.problems)
    head = f'{n} problem{"s" if n != 1 else ""} in the config (found before anything was compiled):'
    super().__init__('\n'.join([head] + [f'  - {p}' for p in self.problems]))


# ------------------------------------------------------------------------------------------------------------
# Small helpers.


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
  left = '(' if lo_open or lo is None else '['
  right = ')' if hi_open or hi is None else ']'
  return f'{left}{"-inf" if lo is None else lo}, {"inf" if hi is None else hi}{right}'


class _Checker:
  """Collects problems; every method takes a path relative to `config` (e.g. 'data.image_size')."""

  def __init__(self, config):
    self.config = config
    self.problems: list[str] = []

  def get(self, path: str, default=_MISSING):
    node = self.config
    for part in path.split('.'):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        try:
          node = getattr(node, part)
        except AttributeError:
          if default is _MISSING:
            self.problems.append(f'config.{path} is missing (configs/common.py defines every field).')
          return default if default is not _MISSING else _MISSING
    return node

  def add(self, path: str, value, message: str) -> None:
    self.problems.append(f'config.{path}={value!r}: {message}')

  def integer(self, path: str, lo: int | None = None, hi: int | None = None, why: str = '') -> int | None:
    """The int at `path` if it lies in [lo, hi], else None (and a problem)."""
    v = self.get(path)
    if v is _MISSING:
      return None
    ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
      rng = f'an integer >= {lo}' if hi is None else f'an integer in [{lo}, {hi}]'
      if lo is None and hi is None:
        rng = 'an integer'
      self.add(path, v, f'{why + "; " if why else ""}allowed: {rng}.')
      return None
    return int(v)

  def real(self, path: str, lo=None, hi=None, *, lo_open=False, hi_open=False, why: str = '') -> float | None:
    """The finite number at `path` if it lies in the interval, else None (and a problem)."""
    v = self.get(path)
    if v is _MISSING:
      return None
    ok = _is_real(v)
    if ok:
      x = float(v)
      ok = (lo is None or (x > lo if lo_open else x >= lo)) and (hi is None or (x < hi if hi_open else x <= hi))
    if not ok:
      self.add(path, v, f'{why + "; " if why else ""}allowed: a finite number in '
               f'{_interval(lo, hi, lo_open, hi_open)}.')
      return None
    return float(v)

  def choice(self, path: str, choices: Sequence[Any], why: str = '') -> Any:
    v = self.get(path)
    if v is _MISSING:
      return None
    if v not in tuple(choices):
      self.add(path, v, f'{why + "; " if why else ""}allowed: one of {tuple(choices)}.')
      return None
    return v

  def subset(self, path: str, choices: Sequence[str], why: str = '', unique: bool = True) -> tuple | None:
    v = self.get(path)
    if v is _MISSING:
      return None
    if isinstance(v, str) or not isinstance(v, (tuple, list)):
      self.add(path, v, f'must be a tuple of names; allowed entries: {tuple(choices)}.')
      return None
    unknown = [x for x in v if x not in tuple(choices)]
    if unknown:
      self.add(path, tuple(v), f'unknown {unknown}{"; " + why if why else ""}; allowed entries: {tuple(choices)}.')
      return None
    if unique and len(set(v)) != len(v):
      self.add(path, tuple(v), f'names an entry twice; allowed: each of {tuple(choices)} at most once.')
      return None
    return tuple(v)

  def widths(self, path: str) -> tuple[int, ...] | None:
    """A non-empty tuple of positive ints (channel lists)."""
    v = self.get(path)
    if v is _MISSING:
      return None
    if isinstance(v, (tuple, list)) and v and all(_is_int(x) and x >= 1 for x in v):
      return tuple(int(x) for x in v)
    self.add(path, v, 'allowed: a non-empty tuple of positive integers (one width per level).')
    return None

  def flag(self, path: str) -> bool | None:
    v = self.get(path)
    if v is _MISSING:
      return None
    if not isinstance(v, bool):
      self.add(path, v, 'allowed: True or False.')
      return None
    return v


# ------------------------------------------------------------------------------------------------------------
# Sections.


def _modalities(p: _Checker) -> tuple[str, ...] | None:
  v = p.get('model.modalities')
  if v is _MISSING:
    return None
  allowed = f'allowed: a subset of {fusion.MODALITIES} with "image" and at least one of {mmgan.GENERATE_SOURCES}'
  if isinstance(v, str) or not isinstance(v, (tuple, list)):
    p.add('model.modalities', v, f'must be a tuple of names; {allowed}.')
    return None
  try:
    return mmgan._check_modalities(v)  # pylint: disable=protected-access  (the one definition of the rule)
  except ValueError as e:
    p.add('model.modalities', tuple(v), f'{str(e).removeprefix("config.model.modalities ")} {allowed}.')
    return None


def _transformer(p: _Checker, prefix: str, *, shared_width: str | None = None, depths: Sequence[str] = ('depth',),
                 sincos2d: bool = False) -> None:
  """Width, depths and num_heads of one transformer stack (flax MHA: width % num_heads == 0).

  `shared_width` names a width field owned (and checked) elsewhere, e.g. the fusion's config.model.width.
  """
  width_path = shared_width or f'{prefix}.width'
  width = p.get(width_path, None) if shared_width else p.integer(width_path, 1)
  width = width if _is_int(width) and width >= 1 else None
  heads = p.integer(f'{prefix}.num_heads', 1)
  for depth in depths:
    p.integer(f'{prefix}.{depth}', 0)
  if width is not None and heads is not None and width % heads:
    p.add(f'{prefix}.num_heads', heads, f'attention heads must divide config.{width_path}={width}; '
          f'allowed: one of {_divisors(width)}.')
  if sincos2d and width is not None and width % 4:
    p.add(width_path, width, 'the image encoder\'s sin-cos 2-D position embedding needs a multiple of 4; '
          f'allowed: e.g. {4 * (width // 4) or 4} or {4 * (width // 4 + 1)}.')


def _codec_module(codec_type: str, channels: tuple[int, ...] | None):
  """The codec build_model would build, for its downsample factor (constructing a Linen module is pure Python)."""
  if codec_type == 'identity':
    return codec_lib.IdentityCodec(image_channels=3)
  return codec_lib.KLAutoencoder(channels=channels)


def _resolution(p: _Checker, dataset: str | None) -> int | None:
  """image_size vs codec factor vs generator / discriminator channels; returns the latent side if consistent."""
  size = p.integer('data.image_size', 1)
  if dataset == 'shapes' and size is not None:
    try:  # the dataset's own limits (image size, sample rate, clip length); each message opens with the field
      registry.shapes_spec(p.config.data)
    except (ValueError, TypeError) as e:
      field = str(e).split(' ', 1)[0]
      value = p.get(f'data.{field}', _MISSING)
      if value is _MISSING:
        p.problems.append(f"config.data: the 'shapes' dataset refuses it: {e}")
      else:
        p.add(f'data.{field}', value, f"the 'shapes' dataset allows only this: {e}")
  codec_type = p.choice('model.codec.type', CODECS)
  channels = None
  if codec_type == 'kl':
    channels = p.widths('model.codec.channels')
    p.integer('model.codec.latent_channels', 1)
    p.integer('model.codec.num_res_blocks', 0)
    p.integer('model.codec.num_groups', 1)
    if channels is None:
      return None
  if size is None or codec_type is None:
    return None
  codec = _codec_module(codec_type, channels)
  f = codec.downsample_factor
  what = 'identity codec' if codec_type == 'identity' else (
      f'kl codec with {len(channels)} levels, f = 2 ** (len(config.model.codec.channels) - 1)')
  if size % f:
    p.add('data.image_size', size, f'must be divisible by the codec downsampling factor {f} ({what}); '
          f'allowed: a multiple of {f}.')
    return None
  latent = codec_lib.latent_shape(codec, (size, size, 3))[0]
  if not (latent >= 4 and _is_pow2(latent)):
    p.add('data.image_size', size, f'gives {latent}x{latent} latents (factor {f}, {what}), but the generator '
          'synthesises from 4x4 and doubles per level, so the latent side must be a power of two >= 4; allowed: '
          f'{", ".join(str(4 * f * 2 ** k) for k in range(4))}, ... (= 4 * {f} * 2**k).')
    return None
  ok = True
  for who, path in (('Generator', 'model.generator.channels'), ('Discriminator', 'model.discriminator.channels')):
    ch = p.widths(path)
    if ch is None:
      ok = False
      continue
    try:
      generator.num_resolutions(latent, ch, who)
    except ValueError:
      ok = False
      levels = int(math.log2(latent)) - 1
      fits = 4 * 2 ** (len(ch) - 1) * f
      p.add(path, ch, f'{who} has one entry per resolution 4..{latent} of the {latent}x{latent} latents '
            f'(config.data.image_size={size} / codec factor {f}); allowed: {levels} entries, or '
            f'config.data.image_size={fits} for these {len(ch)}.')
  return latent if ok else None


def _model(p: _Checker, modalities: tuple[str, ...] | None, latent: int | None) -> None:
  p.choice('model.dtype', tuple(mmgan.DTYPES))
  p.choice('model.remat', mmgan.REMAT, why="'blocks' keeps residual-block outputs, 'full' only component inputs")
  p.integer('model.width', 1)
  p.integer('model.embed_dim', 1)
  p.flag('model.whiten_condition')
  p.real('model.whiten_eps', 0.0, 1.0, lo_open=True, why='relative to the largest eigenvalue')
  mods = modalities or ()
  cond_caption = p.get('loss.cond_caption', 0)
  if _is_real(cond_caption) and cond_caption > 0:
    if modalities is not None and 'text' not in mods:
      p.add('loss.cond_caption', cond_caption, "captioning from the condition needs the captioner, which exists "
            "only with 'text' in config.model.modalities; allowed here: 0.")
    elif p.get('model.width', None) != p.get('model.embed_dim', None):
      p.add('loss.cond_caption', cond_caption, 'the captioner reads s (model.embed_dim wide) as a memory token '
            '(model.width wide): needs model.width == model.embed_dim; allowed here: 0.')
  if 'text' in mods:
    _transformer(p, 'model.text_encoder')
    _transformer(p, 'model.text_decoder')
  elif modalities is not None and _is_real(p.get('loss.sem_caption', 0)) and p.get('loss.sem_caption', 0) > 0:
    p.add('loss.sem_caption', p.get('loss.sem_caption'), "the caption-consistency loss needs the captioner, "
          "which exists only with 'text' in config.model.modalities; allowed here: 0.")
  if 'audio' in mods:
    _transformer(p, 'model.audio_encoder')
    p.integer('model.audio_encoder.n_mels', 1)
    p.integer('model.audio_encoder.downsample', 1)
  _transformer(p, 'model.image_encoder', sincos2d=True)
  patch = p.integer('model.image_encoder.patch_size', 1)
  if p.choice('model.image_encoder.stem', ('patch', 'conv')) == 'conv' and patch is not None and not _is_pow2(patch):
    p.add('model.image_encoder.stem', 'conv', f"a conv stem halves the image log2(patch_size) times; patch_size "
          f"{patch} is not a power of 2 (use stem='patch', or patch_size 1, 2, 4, 8, 16, ...).")
  size = p.get('data.image_size', None)
  if patch is not None and _is_int(size) and size >= 1 and size % patch:
    p.add('model.image_encoder.patch_size', patch, f'the ViT patchifies the {size}x{size} pixel image '
          f'(config.data.image_size); allowed: a divisor of {size}: {_divisors(size)}.')
  _transformer(p, 'model.fusion', shared_width='model.width', depths=('self_depth', 'cross_depth'))
  p.flag('model.fusion.cross_attention')

  g = 'model.generator'
  p.integer(f'{g}.z_dim', 0)
  p.integer(f'{g}.w_dim', 1)
  p.integer(f'{g}.mapping_layers', 0)
  p.real(f'{g}.mapping_lr_mul', 0, lo_open=True)
  p.integer(f'{g}.cross_attention_max_res', 0, why='0 switches cross-attention off')
  p.integer(f'{g}.num_heads', 1, why='reduced to gcd(num_heads, channels) per level')
  p.choice(f'{g}.architecture', generator.ARCHITECTURES)
  p.flag(f'{g}.noise_injection')

  d = 'model.discriminator'
  p.integer(f'{d}.mbstd_group_size', 0, why='0 switches minibatch-stddev off')
  p.integer(f'{d}.num_timesteps', 1)
  p.flag(f'{d}.noise_aware')
  p.flag(f'{d}.projection')
  p.choice(f'{d}.downsample', generator.DOWNSAMPLE_MODES)
  words = p.choice(f'{d}.cond_head_target', ('condition', 'words'),
                   why="what D's condition head predicts from its features: the condition vector, or which words "
                   'the caption has') == 'words'
  if words and 'text' not in tuple(p.get('model.modalities', ())):
    p.add(f'{d}.cond_head_target', 'words', "predicts caption words: needs 'text' in model.modalities.")
  if p.flag(f'{d}.cond_head') and p.get('loss.cond_reg', 0) == 0:
    p.add(f'{d}.cond_head', True, 'the condition head trains on nothing with loss.cond_reg=0: set loss.cond_reg > 0, '
          'or cond_head=False.')

  r = 'model.refiner'
  if p.flag(f'{r}.enabled'):
    ch = p.widths(f'{r}.channels')
    p.integer(f'{r}.num_res_blocks', 0)
    p.integer(f'{r}.num_groups', 1)
    p.integer(f'{r}.num_timesteps', 1)
    p.choice(f'{r}.prediction', diffusion.PREDICTIONS)
    p.real(f'{r}.cond_dropout', 0, 1)
    patch = p.integer(f'{r}.patch_size', 1)
    heads = p.integer(f'{r}.num_heads', 1)
    if ch is not None and p.flag(f'{r}.attention') and heads is not None and ch[-1] % heads:
      p.add(f'{r}.num_heads', heads, f'attention at the lowest level must divide config.{r}.channels[-1]='
            f'{ch[-1]}; allowed: one of {_divisors(ch[-1])}.')
    if ch is not None and patch is not None and latent is not None:
      need = patch * 2 ** (len(ch) - 1)
      if latent % need:
        p.add(f'{r}.patch_size', patch, f'the refiner U-Net works on {latent}x{latent} latents, which must be '
              f'divisible by patch_size * 2 ** (len(config.{r}.channels) - 1) = {need}; allowed: patch_size in '
              f'{[q for q in _divisors(latent) if latent % (q * 2 ** (len(ch) - 1)) == 0] or "none"} '
              f'with these {len(ch)} levels, or fewer levels.')


def _encoders(p: _Checker, modalities: tuple[str, ...] | None) -> None:
  """type / pretrained / hf_config / train of each encoder (`models.pretrained`; absent fields = defaults).

  Whether `pretrained` loads (a directory, or a hub name with internet) is checked at load time, before any
  compilation, by `pretrained.build_encoder` (FileNotFoundError naming what to install or pass).
  """
  import re  # pylint: disable=g-import-not-at-top
  from mmgan_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  for m in modalities or ():
    e = f'model.{pretrained.ENCODER_COMPONENTS[m]}'
    kind = p.get(f'{e}.type', 'own')
    if kind not in pretrained.MODALITY_TYPES[m]:
      p.add(f'{e}.type', kind, f"'own' or a transformers family for the {m} encoder; "
            f'allowed: one of {pretrained.MODALITY_TYPES[m]}.')
    source = p.get(f'{e}.pretrained', '')
    if not isinstance(source, str):
      p.add(f'{e}.pretrained', source, "allowed: a model directory, a hub name, or '' (random init).")
    elif kind == 'own' and source:
      p.add(f'{e}.pretrained', source, f"our own encoder has no pretrained weights; allowed: '' with type='own', "
            f'or a type in {pretrained.MODALITY_TYPES[m][1:]}.')
    hf = p.get(f'{e}.hf_config', {})
    if not hasattr(hf, 'keys'):
      p.add(f'{e}.hf_config', hf, 'allowed: a dict of transformers config fields (e.g. dict(hidden_size=32)).')
    mode = p.get(f'{e}.train.mode', 'finetune')
    if mode not in pretrained.TRAIN_MODES:
      p.add(f'{e}.train.mode', mode, f'allowed: one of {pretrained.TRAIN_MODES}.')
    if p.get(f'{e}.train.lr_mul', None) is not None:
      p.real(f'{e}.train.lr_mul', 0, lo_open=True, why='multiplies the learning rate of this encoder')
    after = p.get(f'{e}.train.unfreeze_after', 0)
    if not (_is_int(after) and after >= 0):
      p.add(f'{e}.train.unfreeze_after', after, 'optimiser steps before the encoder is updated; allowed: an '
            'integer >= 0 (0 = from the start).')
    elif after > 0 and mode == 'frozen':
      p.add(f'{e}.train.unfreeze_after', after, "is ignored with train.mode='frozen' (frozen for good); allowed: "
            "0, or train.mode='finetune' to unfreeze after that many steps.")
    freeze = p.get(f'{e}.train.freeze', ())
    if isinstance(freeze, str) or not isinstance(freeze, (tuple, list)) or \
        not all(isinstance(f, str) for f in freeze):
      p.add(f'{e}.train.freeze', freeze, "allowed: a tuple of regular expressions of parameter paths, e.g. "
            "('embeddings', 'layer/[01]/').")
    else:
      for f in freeze:
        try:
          re.compile(f)
        except re.error as err:
          p.add(f'{e}.train.freeze', tuple(freeze), f'{f!r} is not a regular expression ({err}); allowed: a '
                'tuple of regular expressions of parameter paths.')


def _refine(p: _Checker) -> None:
  if not p.get('model.refiner.enabled', False):
    return  # refinement is the identity without a refiner; its settings are unused
  num_t = p.get('model.refiner.num_timesteps', None)
  hi = int(num_t) if _is_int(num_t) and num_t >= 1 else None
  t_start = p.integer('refine.t_start', 0, hi, why=f'noise level to refine from, at most config.model.refiner.'
                      f'num_timesteps={num_t}' if hi is not None else '')
  steps = p.integer('refine.num_steps', 0, why='0 switches refinement off')
  if t_start is not None and steps is not None and t_start > 0 and steps > t_start:
    p.add('refine.num_steps', steps, f'more DDIM steps than timesteps (config.refine.t_start={t_start}): only '
          f'{t_start} distinct steps would run; allowed: an integer in [0, {t_start}].')
  p.integer('refine.num_draws', 1, why='refinements averaged, in antithetic noise pairs')
  p.real('refine.guidance', 0, why='classifier-free guidance scale, 1 = conditional only')
  p.flag('refine.in_training')
  p.real('refine.train_fraction', 0, 1, lo_open=True, why="the share of each batch the refiner's loss trains on")


def _mesh(p: _Checker, num_devices: int) -> dict[str, int] | None:
  """Mesh shape/axes vs the device count; returns {axis: size} when it resolves."""
  shape, axes = p.get('mesh.shape'), p.get('mesh.axes')
  if shape is _MISSING or axes is _MISSING:
    return None
  if isinstance(axes, str) or not isinstance(axes, (tuple, list)) or not all(isinstance(a, str) for a in axes) \
      or len(set(axes)) != len(axes):
    p.add('mesh.axes', axes, "allowed: a tuple of distinct axis names, e.g. ('data', 'fsdp', 'tensor').")
    return None
  if not isinstance(shape, (tuple, list)) or not all(_is_int(s) and (s >= 1 or s == -1) for s in shape):
    p.add('mesh.shape', shape, 'allowed: a tuple of positive integers, one of which may be -1 (the rest of the '
          'devices).')
    return None
  shape, axes = tuple(int(s) for s in shape), tuple(axes)
  try:
    resolved = sharding.resolve_mesh_shape(shape, axes, num_devices)
  except ValueError as e:
    p.add('mesh.shape', shape, str(e))
    # A fully specified shape with the wrong device count still says which batch axes the config means.
    return dict(zip(axes, shape)) if len(shape) == len(axes) and -1 not in shape else None
  return dict(zip(axes, resolved))


def _partitioning(p: _Checker) -> tuple[str, ...] | None:
  """partition_rules name only mesh axes; returns the mesh axes of the 'batch' logical axis."""
  rules = p.get('partition_rules')
  axes = p.get('mesh.axes', None)
  if rules is _MISSING:
    return None
  out = {}
  bad = []
  for rule in rules if isinstance(rules, (tuple, list)) else [None]:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      p.add('partition_rules', rule, "each rule must be (logical name, mesh axis or tuple of mesh axes or None), "
            "e.g. ('batch', ('data', 'fsdp')).")
      return None
    name, axis = rule
    flat = () if axis is None else (tuple(axis) if isinstance(axis, (tuple, list)) else (axis,))
    if isinstance(axes, (tuple, list)):
      bad += [a for a in flat if a not in axes]
    out[name] = flat
  if bad:
    p.add('partition_rules', tuple(tuple(r) for r in rules), f'names mesh axes {sorted(set(bad))} that '
          f'config.mesh.axes={tuple(axes)} lacks; allowed mesh axes: {tuple(axes)} or None.')
    return None
  return out.get('batch', _DEFAULT_BATCH_AXES)


def _data(p: _Checker, sizes: dict[str, int] | None, batch_axes) -> str | None:
  name = p.choice('data.name', DATASETS, why='a dataset with a pipeline in mmgan_jax/data/registry.py')
  batch = p.integer('data.global_batch', 1)
  p.integer('data.num_train', 1 if name == 'shapes' else 0,
            why='examples per epoch' if name == 'shapes' else 'a cap on the training split; 0 uses all of it')
  p.integer('data.num_eval', 1)
  p.integer('data.num_threads', 0)
  p.integer('data.max_text_len', 2, why='room for BOS and EOS')
  if name != 'shapes':  # shapes has tighter limits of its own (ShapesSpec, checked with the resolution)
    p.integer('data.sample_rate', 1)
    p.real('data.audio_seconds', 0, lo_open=True)
  for field in ('data_dir', 'tfds_name', 'train_split', 'eval_split', 'tokenizer.path', 'tokenizer.pad',
                'tokenizer.bos', 'tokenizer.eos'):
    v = p.get(f'data.{field}')
    if v is not _MISSING and not isinstance(v, str):
      p.add(f'data.{field}', v, 'allowed: a string.')
  p.integer('data.tokenizer.vocab_size', 16, why='the size of the WordPiece vocabulary learned for a real dataset')
  p.integer('data.tokenizer.min_frequency', 1)
  accum = p.integer('optim.grad_accum', 1, why='micro-batches per step; 1 switches accumulation off')
  if batch is not None and accum is not None and batch % accum == 0 and batch // accum < 2:
    p.add('optim.grad_accum', accum, f'leaves micro-batches of {batch // accum} example; allowed: a divisor of '
          f'config.data.global_batch={batch} that leaves at least 2 examples per micro-batch.')
  if batch is not None and accum is not None and batch % accum:
    p.add('optim.grad_accum', accum, f'does not divide config.data.global_batch={batch}; allowed: a divisor of '
          'the global batch.')
  elif batch is not None and sizes is not None and batch_axes is not None:
    n = math.prod(sizes.get(a, 1) for a in batch_axes)
    if accum and accum > 1 and (batch // accum) % n:
      p.add('optim.grad_accum', accum, f'leaves micro-batches of {batch // accum} examples, which the {n} devices '
            f'of the batch mesh axes {tuple(batch_axes)} cannot share evenly; allowed: config.data.global_batch '
            f'a multiple of {n} * grad_accum.')
    elif batch % n:
      p.add('data.global_batch', batch, f'must be divisible by the {n} devices of the batch mesh axes '
            f'{tuple(batch_axes)} (config.mesh.shape resolves to {tuple(sizes.values())}); allowed: a multiple '
            f'of {n}, e.g. {n * max(1, batch // n)} or {n * (batch // n + 1)}.')
  return name


def _training(p: _Checker) -> None:
  p.integer('seed', None)
  total = p.integer('total_steps', 1)
  p.integer('gan_start', 0, None if total is None else total - 1,
            why='iterations of representation training before G and D start; 0 starts them at once')
  if p.flag('d_head_warmup') and not (p.get('model.discriminator.cond_head', False) and p.get('loss.cond_reg', 0) > 0
                                      and p.get('gan_start', 0) > 0):
    p.add('d_head_warmup', True, "trains D's condition head before gan_start: needs model.discriminator.cond_head=True, "
          'loss.cond_reg > 0 and gan_start > 0.')
  p.integer('rep_every', 0, why='the representation side updates every N-th iteration once the GAN runs; 1 every '
            'iteration, 0 never (frozen from gan_start on)')
  p.integer('optim.condition_frozen_after', 0, total,
            why='iteration from which the text and audio encoders and the fusion stop training; 0 never freezes them')
  p.integer('log_every', 1)
  p.integer('checkpoint_every', 1)
  p.integer('sample_every', 0, why='0 switches sample grids off')
  p.integer('eval_every', 0, why='0 evaluates only at the end')
  p.integer('max_checkpoints', 1)
  p.integer('max_nonfinite_steps', 1)
  nan_steps = p.get('debug.nan_at_steps', ())
  if not isinstance(nan_steps, (tuple, list)) or not all(_is_int(n) and n >= 1 for n in nan_steps):
    p.add('debug.nan_at_steps', nan_steps, 'allowed: a tuple of iteration numbers >= 1 whose batches are made '
          'NaN (to test the NaN stop); () is off.')
  p.real('modality_dropout', 0, 1, why='probability that one of two condition sources is dropped')

  for w in ('adv', 'sem', 'sem_caption', 'cond_caption', 'div', 'align', 'source_consistency', 'caption', 'denoise',
            'mismatch', 'r1_gamma', 'cond_reg'):
    p.real(f'loss.{w}', 0, why='a loss weight; 0 switches the term off')
  p.choice('loss.source_anchor', ('',) + tuple(mmgan.GENERATE_SOURCES),
           why="'' pulls the sources toward their mean, a source's name pulls the others to that one")
  p.flag('loss.adaptive')
  p.real('loss.adaptive_max', 0, lo_open=True)
  p.real('loss.label_smoothing', 0, 1, hi_open=True)
  p.integer('loss.r1_interval', 0, why='lazy R1 every r1_interval D steps; 0 switches R1 off')
  sem_every = p.integer('loss.sem_every', 1, why='the semantic terms on every N-th G-only iteration (weighted N)')
  rep_every = p.get('rep_every', 1)
  if sem_every is not None and sem_every > 1 and _is_int(rep_every) and rep_every != 0:
    p.add('loss.sem_every', sem_every, 'a lazy semantic term is for G-only iterations: it needs rep_every=0 '
          f'(the representation frozen once the GAN starts), not rep_every={rep_every}.')

  if p.get('model.discriminator.noise_aware', False):
    num_t = p.get('model.discriminator.num_timesteps', None)
    hi = int(num_t) if _is_int(num_t) and num_t >= 1 else None
    dg = 'diffusion_gan'
    p.flag(f'{dg}.adaptive')
    lo_v = p.real(f'{dg}.t_lo', 0, hi)
    hi_v = p.real(f'{dg}.t_hi', 0, hi, why=f'at most config.model.discriminator.num_timesteps={num_t}')
    if lo_v is not None and hi_v is not None:
      if lo_v > hi_v:
        p.add(f'{dg}.t_lo', lo_v, f'above config.{dg}.t_hi={hi_v}; allowed: t_lo <= t_hi.')
      else:
        p.real(f'{dg}.t_max_init', lo_v, hi_v, why=f'the starting T_max, kept in [config.{dg}.t_lo, t_hi]')
    p.real(f'{dg}.target', -1, 1, lo_open=True, hi_open=True,
           why='the target of r_d = E[sign D(real)], which lies in [-1, 1]')
    p.real(f'{dg}.step_size', 0)
    p.real(f'{dg}.sigma', 0)

  for lr in ('g_lr', 'd_lr', 'rep_lr'):
    p.real(f'optim.{lr}', 0, lo_open=True, why='a learning rate')
  for b in ('gan_b1', 'gan_b2', 'rep_b1', 'rep_b2'):
    p.real(f'optim.{b}', 0, 1, hi_open=True, why='an Adam decay rate')
  p.real('optim.rep_weight_decay', 0)
  p.integer('optim.warmup_steps', 0)
  p.real('optim.grad_clip', 0, why='global-norm clip; 0 switches it off')
  p.subset('optim.frozen', FREEZABLE, why='the generator and discriminator cannot be frozen')

  p.real('ema.half_life_images', 0, lo_open=True)
  if p.get('ema.rampup', None) is not None:
    p.real('ema.rampup', 0, why='None or 0 switches the ramp-up off')


def _evaluation(p: _Checker, modalities, dataset: str | None) -> None:
  # Imported here: the evaluator pulls in the metric code, and only its tables are needed.
  from mmgan_jax.evaluation import evaluator as ev  # pylint: disable=g-import-not-at-top
  from mmgan_jax.evaluation import text_metrics  # pylint: disable=g-import-not-at-top
  num_eval = p.get('data.num_eval', None)
  hi = int(num_eval) if _is_int(num_eval) and num_eval >= 1 else None
  p.integer('eval.num_examples', 1, hi, why=f'held-out examples scored, at most config.data.num_eval={num_eval}'
            if hi is not None else '')
  p.integer('eval.batch_size', 1)
  p.integer('eval.beam_size', 1, why='1 = greedy decoding')
  p.integer('eval.sample_grid', 1)
  names = p.subset('eval.evaluators', tuple(ev.EVALUATORS)) or ()
  p.subset('eval.generate', tuple(ev.GENERATE_SETTINGS))
  p.subset('eval.captions', tuple(ev.CAPTION_SETTINGS))
  if 'semantic' in names and dataset is not None and dataset != 'shapes':
    p.add('eval.evaluators', tuple(names), f"'semantic' scores samples with the oracle of the synthetic 'shapes' "
          f"set and config.data.name={dataset!r} has no such labels; allowed here: "
          f"{tuple(n for n in ev.EVALUATORS if n != 'semantic')}.")
  if 'captions' in names:  # (a model without text has no decoder: the evaluator then skips itself)
    p.subset('eval.metrics', text_metrics.ALL_METRICS)
  if 'retrieval' in names:
    ks = p.get('eval.retrieval_ks')
    good = isinstance(ks, (tuple, list)) and ks and all(_is_int(k) and k >= 1 for k in ks)
    if ks is not _MISSING and not good:
      p.add('eval.retrieval_ks', ks, 'allowed: a non-empty tuple of integers >= 1, e.g. (1, 5, 10).')
  if 'fid' in names:  # the weights file is checked when the plug-in loads it (FileNotFoundError / ValueError)
    p.subset('eval.fid.settings', tuple(ev.GENERATE_SETTINGS))
    p.subset('eval.fid.stages', ev.STAGES)
    p.integer('eval.fid.k', 1)
    p.integer('eval.fid.batch_size', 1)
    p.flag('eval.fid.precision_recall')


# ------------------------------------------------------------------------------------------------------------
# Entry point.

def problems(config, *, num_devices: int) -> list[str]:
  """Every problem found in `config` for a run on `num_devices` devices (empty if it can run)."""
  if not _is_int(num_devices) or num_devices < 1:
    raise TypeError(f'num_devices must be a positive int, got {num_devices!r}.')
  p = _Checker(config)
  modalities = _modalities(p)
  sizes = _mesh(p, int(num_devices))
  batch_axes = _partitioning(p)
  dataset = _data(p, sizes, batch_axes)
  latent = _resolution(p, dataset)
  _model(p, modalities, latent)
  _encoders(p, modalities)
  _refine(p)
  _training(p)
  _evaluation(p, modalities, dataset)
  return p.problems


def validate(config, *, num_devices: int) -> None:
  """Raises ConfigError listing every bad field of `config` (for `num_devices` devices); pure Python, fast.

  Args:
    config: the full training config (an ml_collections.ConfigDict as configs/*.py return).
    num_devices: devices the mesh is built over (`len(devices)` or `jax.device_count()`).

  Raises:
    ConfigError: one line per problem: `config.<path>=<value>: <why>; allowed: <values>`.
  """
  found = problems(config, num_devices=num_devices)
  if found:
    raise ConfigError(found)
