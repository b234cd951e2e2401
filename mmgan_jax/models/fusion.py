"""Shared latent space: per-modality projection, intra-modal self-attention, cross-modal fusion.

Anchors: CLIP (Radford et al. 2021) for the pooled, L2-normalised per-modality embedding that the InfoNCE loss
aligns; the cross-attention fusion of multimodal transformers (e.g. ViLBERT, MBT) for the fused token
sequence T that conditions the generator, the refiner and the text decoder.

Data flow for one batch (B examples, any subset of modalities present per example):

  encoder tokens (B, N_m, W_m) --Dense--> (B, N_m, D) + modality embedding
      --self-attention blocks (per modality)--> tokens_m
      --masked mean, Dense, L2 norm--> s_m (B, E)                   the shared-latent vector of modality m
  fuse(sources):  each source modality's tokens cross-attend to the tokens of the OTHER present sources
      --> T = concat_m tokens_m  (B, sum N_m, D),  mask = token mask AND modality present
      cond = L2norm(mean of s_m over present sources)  (B, E)     the condition vector for G and R

The alignment vectors s_m are taken BEFORE cross-modal fusion, so InfoNCE between modalities cannot be solved
by copying information across the fusion (no leakage). A missing modality (present False) contributes no
tokens and no vector; `TransformerBlock` gives a zero cross-attention update when every memory token is
masked, so an example with a single source is handled exactly like a one-modality model.

With `cross_attention=False` (ablation) the sources are only concatenated; nothing is exchanged across
modalities before the consumer (generator / refiner / decoder) attends to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmgan_jax.models import layers

Array = Any
Dtype = Any

MODALITIES = ('text', 'image', 'audio')


class ModalityFusion(nn.Module):
  """Projects each modality to width D, runs intra-modal self-attention, pools, and fuses across modalities.

  Attributes:
    modalities: the modalities this model handles (a subset of MODALITIES).
    width: shared token width D.
    embed_dim: dimension E of the L2-normalised shared-latent vector s.
    self_depth: intra-modal self-attention blocks per modality.
    cross_depth: cross-attention fusion blocks per modality (0 or cross_attention=False: concatenation only).
    num_heads: attention heads.
    cross_attention: ablation switch for the cross-modal exchange.
    dropout_rate: dropout inside the transformer blocks.
  """

  modalities: tuple[str, ...] = MODALITIES
  width: int = 128
  embed_dim: int = 128
  self_depth: int = 1
  cross_depth: int = 1
  num_heads: int = 4
  cross_attention: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    unknown = set(self.modalities) - set(MODALITIES)
    if unknown:
      raise ValueError(f'unknown modalities {sorted(unknown)}; choose from {MODALITIES}.')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = lambda name, cross: layers.TransformerBlock(
        num_heads=self.num_heads, mlp_dim=4 * self.width, cross_attention=cross,
        dropout_rate=self.dropout_rate, name=name, **kw)
    self.proj = {m: layers.dense(self.width, ('mlp', 'embed'), name=f'{m}_proj', **kw) for m in self.modalities}
    self.type_embed = self.param('type_embed', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, 'embed')), (len(MODALITIES), self.width), self.param_dtype)
    self.self_blocks = {m: [block(f'{m}_self_{i}', False) for i in range(self.self_depth)]
                        for m in self.modalities}
    self.norm = {m: nn.LayerNorm(name=f'{m}_norm', **kw) for m in self.modalities}
    self.head = {m: layers.dense(self.embed_dim, ('embed', 'mlp'), name=f'{m}_head', **kw)
                 for m in self.modalities}
    depth = self.cross_depth if self.cross_attention else 0
    self.cross_blocks = {m: [block(f'{m}_cross_{i}', True) for i in range(depth)] for m in self.modalities}
    # CLIP's learnable temperature, initialised at log(1/0.07).
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(jnp.log(1.0 / 0.07)), (),
                                  jnp.float32)

  def embed(self, modality: str, tokens: Array, mask: Array, deterministic: bool = True) -> tuple[Array, Array]:
    """Intra-modal path: encoder tokens (B, N, W) -> (tokens (B, N, D), s (B, E) L2-normalised)."""
    x = self.proj[modality](tokens.astype(self.dtype))
    x = x + self.type_embed[MODALITIES.index(modality)].astype(self.dtype)
    for blk in self.self_blocks[modality]:
      x = blk(x, mask=mask, deterministic=deterministic)
    x = self.norm[modality](x)
    s = layers.l2_normalize(self.head[modality](layers.masked_mean(x, mask)).astype(jnp.float32))
    return x, s

  def fuse(self, sources: Mapping[str, tuple[Array, Array, Array]], deterministic: bool = True
           ) -> tuple[Array, Array]:
    """Cross-modal fusion of source modalities {m: (tokens (B, N, D), mask (B, N), present (B,))}.

    Returns T (B, sum N, D) and its mask (token valid AND modality present).
    """
    names = [m for m in self.modalities if m in sources]
    if not names:
      raise ValueError('fuse() needs at least one source modality.')
    toks = {m: sources[m][0] for m in names}
    masks = {m: sources[m][1].astype(bool) & sources[m][2].astype(bool)[:, None] for m in names}
    for i in range(max((len(self.cross_blocks[m]) for m in names), default=0)):
      new = {}
      for m in names:
        others = [o for o in names if o != m]
        if not others or i >= len(self.cross_blocks[m]):
          new[m] = toks[m]
          continue
        memory = jnp.concatenate([toks[o] for o in others], axis=1)
        memory_mask = jnp.concatenate([masks[o] for o in others], axis=1)
        new[m] = self.cross_blocks[m][i](toks[m], mask=masks[m], memory=memory, memory_mask=memory_mask,
                                         deterministic=deterministic)
      toks = new
    return (jnp.concatenate([toks[m] for m in names], axis=1),
            jnp.concatenate([masks[m] for m in names], axis=1))

  def __call__(self, features: Mapping[str, tuple[Array, Array]], present: Mapping[str, Mapping[str, Array]],
               tasks: Mapping[str, Sequence[str]], deterministic: bool = True) -> dict[str, Any]:
    """Runs the whole shared-latent stage.

    Args:
      features: {modality: (encoder tokens (B, N, W), token mask (B, N))} for the modalities encoded.
      present: {task: {modality: (B,) bool}}; False marks a source missing (or dropped) for that example in
        that task, so each task can see its own subset of modalities.
      tasks: {task name: source modalities}, e.g. {'generate': ('text', 'audio'), 'caption': ('image', 'audio')};
        sources not in `features` are ignored.

    Returns:
      {'embed': {m: s_m (B, E)}, 'logit_scale': scalar,
       task: {'tokens': T, 'mask': mask, 'cond': (B, E) L2-normalised, 'has_cond': (B,) bool}} per task.
    """
    out: dict[str, Any] = {'embed': {}, 'logit_scale': self.logit_scale}
    tokens = {}
    for m, (x, mask) in features.items():
      tokens[m], out['embed'][m] = self.embed(m, x, mask, deterministic)
    for task, srcs in tasks.items():
      srcs = [m for m in srcs if m in features]
      if not srcs:
        raise ValueError(f'task {task!r} has none of its source modalities among {sorted(features)}.')
      keep = present[task]
      t, mask = self.fuse({m: (tokens[m], features[m][1], keep[m]) for m in srcs}, deterministic)
      weights = jnp.stack([keep[m].astype(jnp.float32) for m in srcs], axis=1)  # (B, S)
      stacked = jnp.stack([out['embed'][m] for m in srcs], axis=1)  # (B, S, E)
      pooled = jnp.sum(stacked * weights[..., None], axis=1) / jnp.maximum(jnp.sum(weights, 1), 1.0)[:, None]
      out[task] = dict(tokens=t, mask=mask, cond=layers.l2_normalize(pooled), has_cond=jnp.sum(weights, 1) > 0)
    return out
