"""Train state, steps, sharding, checkpoint/resume, determinism and ablation switches on the smoke config."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import smoke_config
from mmgan_jax.models import mmgan
from mmgan_jax.train import checkpoint as ckpt_lib
from mmgan_jax.train import trainer
from mmgan_jax.train.steps import make_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device_setup(config, workdir=None):
  return trainer.setup(config, workdir, devices=jax.devices()[:1])


def run(setup, state, steps, start=0):
  state = jax.tree.map(jnp.copy, state)  # the steps donate their input; keep the caller's state alive
  metrics, batches = [], []
  with jax.set_mesh(setup.mesh):
    for i in range(start, start + steps):
      batch = trainer.next_batch(setup)
      batches.append(np.asarray(batch['image']))
      state, m = trainer.train_step(setup, state, batch, i)
      metrics.append(jax.device_get(m))
  return state, metrics, batches


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope='module')
def smoke():
  return one_device_setup(smoke_config())


def test_state_has_every_component_and_ema(smoke):
  params = smoke.state.params
  expected = {'text_encoder', 'image_encoder', 'audio_encoder', 'fusion', 'generator', 'refiner',
              'discriminator', 'text_decoder'}
  assert set(params) == expected
  assert set(smoke.state.ema) == {'generator', 'refiner'}
  np.testing.assert_array_equal(jax.tree.leaves(smoke.state.ema['generator'])[0],
                                jax.tree.leaves(params['generator'])[0])
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32


def test_condition_whitening_statistics_and_transform(smoke):
  """The running statistics converge to the data's mean and covariance; whitened conditions have identity
  covariance; gan_condition changes only the vector, and only when model.whiten_condition is on."""
  rng = np.random.default_rng(0)
  e = 6
  basis = np.linalg.qr(rng.normal(size=(e, e)))[0]
  s = (rng.normal(size=(4096, e)) * np.array([1.0, 0.5, 0.2, 0.1, 0.05, 0.02])) @ basis.T + 0.3
  stats = mmgan.condition_stats_init(e)
  np.testing.assert_allclose(stats['cond_cov'], np.eye(e) / e)
  update = jax.jit(mmgan.update_condition_stats)
  for _ in range(1500):
    stats = update(stats, s[rng.integers(0, len(s), 64)])
  np.testing.assert_allclose(stats['cond_mean'], s.mean(0), atol=0.02)
  np.testing.assert_allclose(stats['cond_cov'], np.cov(s, rowvar=False), atol=0.03, rtol=0.1)
  exact = mmgan.whiten(s, s.mean(0), np.cov(s, rowvar=False), eps=0.0)
  np.testing.assert_allclose(np.cov(np.asarray(exact), rowvar=False), np.eye(e), atol=1e-3)
  cond = {'cond': s[:4], 'tokens': np.ones((4, 3, 2)), 'mask': np.ones((4, 3), bool)}
  model = dataclasses.replace(smoke.model, whiten_condition=True)
  out = mmgan.gan_condition(model, stats, cond)
  assert out['tokens'] is cond['tokens'] and not np.allclose(out['cond'], cond['cond'])
  assert mmgan.gan_condition(dataclasses.replace(model, whiten_condition=False), stats, cond)['cond'] is cond['cond']
  # model.whiten_eps floors the eigenvalues: a direction with variance far below eps * the largest keeps a
  # variance of about its own over (eps * the largest), so weak directions are amplified less.
  cov = np.cov(s, rowvar=False)
  floored = mmgan.gan_condition(dataclasses.replace(model, whiten_eps=0.1), {'cond_mean': s.mean(0),
                                                                            'cond_cov': cov}, {'cond': s})['cond']
  weakest = np.asarray(floored) @ basis[:, -1]  # the 0.02-scale direction: variance 4e-4 / (0.1 * ~1) ~ 4e-3
  assert np.var(weakest) < 0.01 < np.var(np.asarray(exact) @ basis[:, -1])

def test_gradients_reach_every_component(smoke):
  """Every trainable leaf gets a nonzero gradient from the losses meant to reach it."""
  state = smoke.state
  # The refiner's output conv starts at zero (ADM/LDM), which blocks gradients to its inner layers on the very
  # first step only; give it small weights so the check covers every refiner leaf.
  ref = dict(state.params['refiner'])
  ref['conv_out'] = jax.tree.map(lambda x: x + 0.01, ref['conv_out'])
  state = state.replace(params=dict(state.params, refiner=ref))
  config = smoke_config(**{'model.refiner.cond_dropout': 0.5})  # the learned null condition is used too
  s = one_device_setup(config)
  with jax.set_mesh(s.mesh):
    batch = trainer.next_batch(s)
    g = host(jax.jit(s.steps.g_grads)(state, batch))
    d = host(jax.jit(s.steps.d_grads)(state, batch))
  grads = dict(g, discriminator=d)
  dead = []
  for name, tree in grads.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      assert np.all(np.isfinite(leaf)), (name, path)
      if not np.any(leaf != 0):
        dead.append(f'{name}{jax.tree_util.keystr(path)}')
  assert not dead, f'leaves without gradient: {dead}'
  assert set(grads) == set(state.params)


def test_caption_consistency_alone_trains_g_and_an_image_only_captioner(smoke):
  """loss.sem_caption with every other G loss and the usual captioning off: G's gradient is that term's alone,
  and the captioner still learns (from real images read alone, the judge of G's samples)."""
  config = smoke_config(**{'loss.sem_caption': 1.0, 'loss.adv': 0.0, 'loss.sem': 0.0, 'loss.div': 0.0,
                           'loss.caption': 0.0})
  fns = make_steps(smoke.model, config, tx_g=None, tx_d=None)  # gradients only: no optimiser is used
  with jax.set_mesh(smoke.mesh):
    grads = host(jax.jit(fns.g_grads)(smoke.state, trainer.next_batch(smoke)))
  for name in ('generator', 'text_decoder', 'image_encoder'):
    leaves = jax.tree.leaves(grads[name])
    assert all(np.all(np.isfinite(x)) for x in leaves), name
    assert sum(float(np.abs(x).sum()) for x in leaves) > 0, name


def test_condition_terms_alone_train_exactly_the_condition_path(smoke):
  """loss.cond_caption and loss.source_consistency with every other loss off: their gradients reach the text and
  audio encoders, the fusion and the captioner, and nothing else (the image encoder and G get none); with
  loss.source_anchor='text' the consistency term leaves the text encoder alone."""
  off = {f'loss.{w}': 0.0 for w in ('adv', 'sem', 'div', 'align', 'caption', 'denoise')}

  def grads_with(**terms):
    fns = make_steps(smoke.model, smoke_config(**off, **terms), tx_g=None, tx_d=None)
    with jax.set_mesh(smoke.mesh):
      return host(jax.jit(fns.g_grads)(smoke.state, trainer.next_batch(smoke)))

  grads = grads_with(**{'loss.cond_caption': 1.0, 'loss.source_consistency': 1.0})
  size = lambda name: sum(float(np.abs(x).sum()) for x in jax.tree.leaves(grads[name]))
  for name in ('text_encoder', 'audio_encoder', 'fusion', 'text_decoder'):
    assert size(name) > 0 and np.isfinite(size(name)), name
  for name in ('image_encoder', 'generator', 'refiner'):
    assert size(name) == 0, name
  # loss.source_anchor='text' holds the text's embedding: the consistency term alone moves the audio side only.
  grads = grads_with(**{'loss.source_consistency': 1.0, 'loss.source_anchor': 'text'})
  assert size('audio_encoder') > 0 and size('text_encoder') == 0


def test_train_steps_run_and_report(smoke):
  state, metrics, _ = run(smoke, smoke.state, 2)
  m = metrics[-1]
  for key in ('d/loss', 'd/r1', 'g/adv_loss', 'g/sem_loss', 'g/div_loss', 'g/lambda_adv', 'align/loss',
              'caption/loss', 'refiner/denoise_loss', 'diffusion_gan/t_max', 'grad_norm/generator'):
    assert key in metrics[0] or key in m, key
  assert all(np.isfinite(v) for v in m.values())
  assert int(state.step) == 2
  assert float(m['g/lambda_adv']) > 0
  # EMA moved toward the params but is not equal to them.
  e = jax.tree.leaves(state.ema['generator'])
  p = jax.tree.leaves(state.params['generator'])
  assert any(not np.array_equal(a, b) for a, b in zip(e, p))


def test_gan_start_trains_only_the_representation(smoke):
  """Before config.gan_start the iteration is the representation step: encoders, fusion, captioner and refiner
  move; G (and its EMA) and D do not."""
  s = dataclasses.replace(smoke, config=smoke_config(gan_start=2))
  state, metrics, _ = run(s, smoke.state, 2)  # two: the representation's warm-up schedule starts at lr 0
  assert int(state.step) == 2 and 'align/loss' in metrics[1] and 'd/loss' not in metrics[1]
  before, after = host(smoke.state.params), host(state.params)
  for name in before:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
    assert same == (name in ('generator', 'discriminator')), name
  for a, b in zip(jax.tree.leaves(smoke.state.ema['generator']), jax.tree.leaves(state.ema['generator'])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # (the EMA's lerp toward an equal value)
  # G's Adam moments and step count too: G's first real update is scaled as if it were its first.
  gan_before, gan_after = (host(o.inner_states['gan']) for o in (smoke.state.opt_g, state.opt_g))
  for a, b in zip(jax.tree.leaves(gan_before), jax.tree.leaves(gan_after)):
    np.testing.assert_array_equal(a, b)


def test_rep_every_trains_g_alone_between_representation_updates(smoke):
  """With rep_every=2 the second iteration is the G-only step: the representation side's params and optimiser
  state stand still, its terms are not logged, and G's update is the joint step's from the same state."""
  s = dataclasses.replace(smoke, config=smoke_config(rep_every=2))
  state, metrics, _ = run(s, smoke.state, 2)
  assert 'align/loss' in metrics[0] and 'align/loss' not in metrics[1] and 'g/adv_loss' in metrics[1]
  assert set(k for k in metrics[1] if k.startswith('grad_norm/')) == {'grad_norm/generator'}
  batch, one = trainer.next_batch(s), jnp.ones(())
  with jax.set_mesh(s.mesh):
    joint, _ = s.steps.g_step(jax.tree.map(jnp.copy, state), batch, one)
    alone, _ = s.steps.gan_step(jax.tree.map(jnp.copy, state), batch, one)
  before, after = host(state.params), host(alone.params)
  for name in before:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
    assert same == (name != 'generator'), name
  # The same gradient for G: Adam's moments agree (its first update, ~lr * sign(g), would magnify rounding).
  flat = lambda o: np.concatenate([np.ravel(x) for x in jax.tree.leaves(host(o.inner_states['gan']))])
  a, b = flat(alone.opt_g), flat(joint.opt_g)
  np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(b))))
  rep_before, rep_after = ({k: v for k, v in host(o.inner_states).items() if k != 'gan'}
                           for o in (state.opt_g, alone.opt_g))
  for a, b in zip(jax.tree.leaves(rep_before), jax.tree.leaves(rep_after)):
    np.testing.assert_array_equal(a, b)


def test_lazy_semantic_term_skips_it_and_weights_it_when_it_runs(smoke):
  """loss.sem_every=N: the G-only iterations without the semantic terms log none of them and keep the last
  adaptive weight; the ones with it apply the semantic gradient N times (G's update is linear in it)."""
  from mmgan_jax.models import pretrained as pretrained_lib
  from mmgan_jax.train import state as state_lib
  batch, one = trainer.next_batch(smoke), jnp.ones(())

  def g_moment(config, which, lam=None):
    tx_g, tx_d = state_lib.make_optimizers(config.optim, config.total_steps,
                                           pretrained_lib.train_specs(config.model))
    state = jax.tree.map(jnp.copy, smoke.state)
    if lam is not None:
      state = state.replace(adaptive={**state.adaptive, 'lambda_adv': lam})
    with jax.set_mesh(smoke.mesh):
      new, metrics = jax.jit(getattr(make_steps(smoke.model, config, tx_g, tx_d), which))(state, batch, one)
    leaves = jax.tree_util.tree_flatten_with_path(host(new.opt_g.inner_states['gan']))[0]
    mu = np.concatenate([np.ravel(x) for path, x in leaves if 'mu' in jax.tree_util.keystr(path)])
    return mu, host(metrics)

  every1, every3 = smoke_config(rep_every=0), smoke_config(rep_every=0, **{'loss.sem_every': 3})
  mu1, m1 = g_moment(every1, 'gan_step')
  lam = m1['g/lambda_adv']  # the lazy step reuses the state's weight: give it the one the others measure
  mu0, m0 = g_moment(every3, 'gan_step_lazy', lam=jnp.asarray(lam))
  mu3, m3 = g_moment(every3, 'gan_step')
  assert 'g/sem_loss' in m1 and 'g/sem_loss' not in m0 and 'g/adv_loss' in m0
  assert m0['g/lambda_adv'] == lam and m3['g/lambda_adv'] == lam
  sem = mu1 - mu0  # Adam's first moment from zero: (1 - beta1) times the semantic gradient
  assert np.max(np.abs(sem)) > 1e-3 * np.max(np.abs(mu1))
  np.testing.assert_allclose(mu3 - mu0, 3 * sem, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(mu3))))


def test_same_seed_same_losses_different_seed_different():
  s0 = one_device_setup(smoke_config())
  a = run(s0, s0.state, 1)[1][0]
  s = one_device_setup(smoke_config())
  b = run(s, s.state, 1)[1][0]
  s3 = one_device_setup(smoke_config(seed=1))
  c = run(s3, s3.state, 1)[1][0]
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert any(not np.allclose(a[k], c[k]) for k in ('d/loss', 'g/adv_loss', 'align/loss'))


def test_sharded_step_equals_single_device(tmp_path):
  """A step on a 2 x 2 x 2 data x fsdp x tensor mesh matches the 1-device step (in a child process, see its doc).

  Every axis is > 1, so the batch, the FSDP-split parameters and the tensor-parallel kernels are all exercised;
  this is also the mesh on which XLA mixed batch shards before the activation constraints
  (models/partitioning.py). docs/training.md has the table for the other 2-, 4- and 8-device meshes."""
  out = tmp_path / 'sharded.npz'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'sharded_equality.py'), str(out), '2x2x2'],
                        capture_output=True, text=True, env=env, timeout=1500, check=False)
  assert proc.returncode == 0, f'child exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}'
  r = dict(np.load(out))
  assert {'fsdp', 'tensor'} <= set(r['sharded_axes_2x2x2'])  # the state is really split over fsdp and tensor
  lr = float(r['lr'])
  params = [k.split('/', 1)[1] for k in r if k.startswith('param_1/')]
  metrics = [k.split('/', 1)[1] for k in r if k.startswith('metric_1/')]
  assert params and metrics
  for n in ('2x2x2',):
    np.testing.assert_array_equal(r['batch_1'], r[f'batch_{n}'])
    for k in metrics:
      np.testing.assert_allclose(r[f'metric_1/{k}'], r[f'metric_{n}/{k}'], rtol=2e-4, atol=2e-5,
                                 err_msg=f'{n} devices: {k}')
    # Adam turns a gradient into an update of about +-lr whatever its size, so a gradient within round-off of
    # zero may flip sign between reduction orders: allow that on a tiny fraction of elements, nothing more.
    assert len(params) == sum(k.startswith(f'param_{n}/') for k in r)
    off, total = 0, 0
    for k in params:
      a, b = r[f'param_1/{k}'], r[f'param_{n}/{k}']
      diff = np.abs(a - b)
      assert diff.max() <= 2.5 * lr, (n, k)
      off += int(np.sum(diff > 1e-4 + 1e-4 * np.abs(a)))
      total += a.size
    assert off <= 1e-3 * total, f'{n} devices: {off} of {total} parameters differ'


def test_save_stop_resume_is_exact(tmp_path):
  """Stop after 2 steps, resume for 2 more: same params and same batches as 4 uninterrupted steps."""
  config = smoke_config()
  ref = one_device_setup(config)
  ref_state, _, ref_batches = run(ref, ref.state, 4)

  first = one_device_setup(config, str(tmp_path))
  state, _, _ = run(first, first.state, 2)
  first.checkpointer.save(2, state, first.data.train.get_state(), force=True)
  first.checkpointer.close()

  resumed = one_device_setup(config, str(tmp_path))
  assert resumed.start_step == 2
  state, _, batches = run(resumed, resumed.state, 2, start=2)
  resumed.checkpointer.close()
  for a, b in zip(ref_batches[2:], batches):
    np.testing.assert_array_equal(a, b)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(host(ref_state))[0],
                          jax.tree.leaves(host(state))):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_nonfinite_update_is_skipped_and_counted(smoke):
  state = smoke.state
  bad = dict(state.params['generator'])
  bad_synth = jax.tree.map(lambda x: x * jnp.nan, bad['synthesis_network'])
  bad['synthesis_network'] = bad_synth
  poisoned = state.replace(params=dict(state.params, generator=bad))
  with jax.set_mesh(smoke.mesh):
    batch = trainer.next_batch(smoke)
    new, m = smoke.steps.g_step(jax.tree.map(jnp.copy, poisoned), batch, jnp.float32(1.0))
    # An iteration whose D step failed (d_finite 0) is bad once, whichever step failed; G's own update stands.
    d_bad, _ = smoke.steps.g_step(jax.tree.map(jnp.copy, state), batch, jnp.float32(0.0))
  assert float(m['guard/g_finite']) == 0.0
  assert float(new.adaptive['nonfinite']) == 1.0
  assert float(d_bad.adaptive['nonfinite']) == 1.0
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host(d_bad.params['generator'])),
                                                      jax.tree.leaves(host(state.params['generator']))))
  # Nothing was trained through the NaNs: the text encoder (finite before) is unchanged.
  np.testing.assert_array_equal(host(new.params['text_encoder'])['pos_embed'],
                                host(poisoned.params['text_encoder'])['pos_embed'])
  assert int(new.step) == int(poisoned.step) + 1


@pytest.mark.parametrize('overrides, check', [
    ({'model.refiner.enabled': False}, lambda p: 'refiner' not in p),
    ({'model.fusion.cross_attention': False}, lambda p: not any('cross' in k for k in p['fusion'])),
    ({'model.generator.cross_attention_max_res': 0},
     lambda p: not any('attn' in k for k in p['generator']['synthesis_network'])),
    ({'model.discriminator.noise_aware': False}, lambda p: not any('temb' in k for k in p['discriminator'])),
    ({'model.discriminator.projection': False}, lambda p: 'embed_s' not in p['discriminator']),
    ({'model.discriminator.cond_head': True}, lambda p: 'cond_head' in p['discriminator']),
    ({'model.modalities': ('text', 'image')}, lambda p: 'audio_encoder' not in p),
    ({'model.modalities': ('image', 'audio')}, lambda p: 'text_encoder' not in p and 'text_decoder' not in p),
])
def test_component_switches_change_the_model(overrides, check):
  config = smoke_config(**overrides)
  from mmgan_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  model = mmgan.build_model(config.model, image_size=32, vocab_size=tokenizer.shapes_text_codec().vocab_size,
                            max_text_len=config.data.max_text_len, sample_rate=16_000)
  params = jax.eval_shape(lambda k: mmgan.init_params(model, k, mmgan.dummy_batch(model, 2, 8000)),
                          jax.random.PRNGKey(0))
  assert check(params)
  base = smoke_config()
  base_model = mmgan.build_model(base.model, image_size=32, vocab_size=tokenizer.shapes_text_codec().vocab_size,
                                 max_text_len=base.data.max_text_len, sample_rate=16_000)
  base_params = jax.eval_shape(lambda k: mmgan.init_params(base_model, k, mmgan.dummy_batch(base_model, 2, 8000)),
                               jax.random.PRNGKey(0))
  assert not check(base_params)


def test_loss_switches_change_the_step():
  """Adaptive weighting off -> lambda 1; plain D -> no instance noise (T_max stays 0); sem/align off -> no terms;
  D's condition head naming the caption's words (the demo's) -> one logit per vocabulary word, D fits it and G's
  gradient carries the term (loss.cond_reg); its warm-up step (config.d_head_warmup) trains D alone."""
  switches = {'loss.adaptive': False, 'model.discriminator.noise_aware': False, 'loss.sem': 0.0, 'loss.align': 0.0,
              'diffusion_gan.t_max_init': 10.0, 'refine.num_steps': 0, 'model.discriminator.cond_head': True,
              'model.discriminator.cond_head_target': 'words'}
  config = smoke_config(**switches)
  s = one_device_setup(config)
  state, metrics, _ = run(s, s.state, 2)
  for m in metrics:
    assert float(m['g/lambda_adv']) == 1.0
    assert float(m['g/sem_loss']) == 0.0
    assert 'align/loss' not in m
    assert float(m['d/cond_reg']) > 0 and float(m['g/cond_reg']) > 0
  assert float(state.adaptive['t_max']) == 10.0  # not adapted when D is not noise-aware
  head = lambda st: host(st.params['discriminator']['cond_head'])
  assert head(state)['kernel'].shape[-1] == s.data.text_codec.vocab_size
  assert not np.allclose(head(state)['kernel'], head(s.state)['kernel'])  # only the regression trains it
  batch = trainer.next_batch(s)
  # config.d_head_warmup's step (before gan_start): D's features and head fit real images' words, nothing else moves.
  with jax.set_mesh(s.mesh):
    warm, m1 = s.steps.d_head_step(jax.tree.map(jnp.copy, state), batch)
    _, m2 = s.steps.d_head_step(jax.tree.map(jnp.copy, warm), batch)
  assert 0 < float(m2['d/head_warmup']) < float(m1['d/head_warmup'])
  before, after = host(state.params), host(warm.params)
  for name in before:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
    assert same == (name != 'discriminator'), name
  assert int(warm.step) == int(state.step)
  g_grads = lambda c: host(jax.jit(make_steps(s.model, c, None, None).g_grads)(state, batch)['generator'])
  with_term, without = g_grads(config), g_grads(smoke_config(**switches, **{'loss.cond_reg': 0.0}))
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(with_term), jax.tree.leaves(without)))
  # Adaptive on (the default) gives a data-dependent lambda.
  smoke = one_device_setup(smoke_config())
  _, m2, _ = run(smoke, smoke.state, 1)
  assert float(m2[0]['g/lambda_adv']) != 1.0


def test_refinement_switch_changes_samples(smoke):
  from mmgan_jax.evaluation.evaluator import Evaluator  # pylint: disable=g-import-not-at-top
  batch = {k: v[:4] for k, v in smoke.data.eval_batch.items()}
  state = smoke.state
  ref = dict(state.ema['refiner'])
  ref['conv_out'] = jax.tree.map(lambda x: x + 0.05, ref['conv_out'])  # a non-trivial refiner
  state = state.replace(ema=dict(state.ema, refiner=ref))
  on = Evaluator(smoke.model, smoke.config, smoke.data.text_codec)
  pre, post = on.samples(state, batch, ('text',))
  assert not np.allclose(pre, post)
  off_config = smoke_config(**{'refine.num_steps': 0})
  off = Evaluator(smoke.model, off_config, smoke.data.text_codec)
  pre, post = off.samples(state, batch, ('text',))
  np.testing.assert_array_equal(pre, post)
  # refine.in_training=False: evaluation still refines, G trains on its unrefined samples (as with no refinement).
  at_sampling = smoke_config(**{'refine.in_training': False})
  pre, post = Evaluator(smoke.model, at_sampling, smoke.data.text_codec).samples(state, batch, ('text',))
  assert not np.allclose(pre, post)
  state = state.replace(params=dict(state.params, refiner=ref))
  train_batch = trainer.next_batch(smoke)
  g_grads = lambda c: host(jax.jit(make_steps(smoke.model, c, None, None).g_grads)(state, train_batch)['generator'])
  for a, b in zip(jax.tree.leaves(g_grads(at_sampling)), jax.tree.leaves(g_grads(off_config))):
    np.testing.assert_array_equal(a, b)


def test_checkpointer_roundtrip(tmp_path, smoke):
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(7, smoke.state, {'next_index': 3}, force=True)
  ck.wait()
  abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: smoke.state), smoke.state_shardings)
  state, data = ck.restore(abstract)
  ck.close()
  assert data == {'next_index': 3}
  for a, b in zip(jax.tree.leaves(host(state)), jax.tree.leaves(host(smoke.state))):
    np.testing.assert_array_equal(a, b)


def test_launcher_smoke_end_to_end(tmp_path):
  """`launch/train.py --config=configs/shapes.py:smoke` trains, checkpoints, writes events and results."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device, as a user's laptop
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir or ''
  workdir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, 'launch/train.py', '--config=configs/shapes.py:smoke',
                         f'--workdir={workdir}', '--config.seed=3', '--config.eval_every=3'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / 'checkpoints' / '6').is_dir()
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert events
  # The plug-in evaluators ran mid-training (eval_every=3) and at the end, logged for TensorBoard.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logged = {(e.step, v.tag) for f in events for e in tf.compat.v1.train.summary_iterator(str(workdir / f))
            for v in e.summary.value}
  for step in (3, 6):
    assert (step, 'eval/retrieval/text_to_image/R@1') in logged, sorted(t for t in logged if t[0] == step)
    assert (step, 'eval/text_to_image/refined/mean') in logged
  assert (6, 'data/bad_records') in logged  # the skipped-record count is a summary
  import json  # pylint: disable=g-import-not-at-top
  results = json.loads((workdir / 'eval_results.json').read_text())
  assert 'text_to_image/refined/mean' in results and 'image_to_text/BLEU-4' in results
  assert 0.0 <= results['text_to_image/refined/mean'] <= 1.0
  # launch/evaluate.py scores a chosen checkpoint and writes the numbers with their protocol.
  proc = subprocess.run([sys.executable, 'launch/evaluate.py', '--config=configs/shapes.py:smoke',
                         f'--workdir={workdir}', '--config.seed=3', '--step=3', '--num_examples=12'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / 'eval' / 'metrics.json').read_text())
  assert report['protocol']['checkpoint_step'] == 3 and report['protocol']['num_examples'] == 12
  assert report['metrics']['num_examples'] == 12 and 'retrieval/image_to_text/R@1' in report['metrics']
  assert 'checkpoint_step | 3' in (workdir / 'eval' / 'metrics.md').read_text()
  assert 'checkpoint_step | 3' in proc.stdout
  # A step that was not saved, and a workdir without checkpoints, stop with one line.
  for args in (['--step=4', f'--workdir={workdir}'], [f'--workdir={tmp_path / "empty"}']):
    proc = subprocess.run([sys.executable, 'launch/evaluate.py', '--config=configs/shapes.py:smoke', *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert 'checkpoint' in proc.stderr


def test_launcher_reports_missing_dataset_cleanly(tmp_path):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, 'launch/train.py', '--config=configs/vggsound.py',
                         f'--workdir={tmp_path}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert 'VGGSound' in proc.stderr and 'Traceback' not in proc.stderr
