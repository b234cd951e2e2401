"""The training loop: set-up (mesh, data, model, sharded state, resume), the step loop, summaries, evaluation.

`train_and_evaluate(config, workdir)` is the whole job; `launch/train.py` only parses flags and calls it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from mmgan_jax import config_validation
from mmgan_jax.data import registry
from mmgan_jax.evaluation.evaluator import Evaluator
from mmgan_jax.models import mmgan
from mmgan_jax.models import pretrained as pretrained_lib
from mmgan_jax.train import checkpoint as ckpt_lib
from mmgan_jax.train import sharding, summaries
from mmgan_jax.train import state as state_lib
from mmgan_jax.train.steps import make_steps

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Training produced NaN/Inf losses or gradients for too many consecutive steps."""


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written, or has no room for the checkpoints."""


def check_workdir(workdir: str, need_bytes: int = 0) -> None:
  """Creates `workdir` and checks it takes a file and has `need_bytes` free; WorkdirError otherwise."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'workdir {workdir} cannot be written ({e.strerror or e}); pass another --workdir.') from e
  free = shutil.disk_usage(workdir).free
  if free < need_bytes:
    raise WorkdirError(f'workdir {workdir} has {free / 2**20:.0f} MiB free, but its checkpoints need about '
                       f'{need_bytes / 2**20:.0f} MiB; free some space, lower --config.max_checkpoints, or pass '
                       'another --workdir.')


def checkpoint_bytes(config, state) -> int:
  """Disk space the kept checkpoints need: (max_checkpoints + 1) train states (one being written)."""
  return (int(config.max_checkpoints) + 1) * sum(int(x.nbytes) for x in jax.tree.leaves(state))


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when the job spans several processes (TPU pods, GPU clusters)."""
  env = os.environ
  multi = any(k in env for k in ('JAX_COORDINATOR_ADDRESS', 'MEGASCALE_COORDINATOR_ADDRESS'))
  multi = multi or int(env.get('SLURM_NTASKS', '1')) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
  multi = multi or (env.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0)
  if multi and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def _hide_accelerators_from_tf() -> None:
  try:
    import tensorflow as tf  # clu.metric_writers imports it; keep it off the GPUs/TPUs JAX owns.
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except Exception:  # TF absent or already initialised: nothing to hide.
    pass


def _codec_params(config, model: mmgan.Model) -> tuple[Any, float]:
  """The frozen stage-1 codec params and latent scale (identity codec: none and 1.0)."""
  c = config.model.codec
  if c.type == 'identity':
    return None, 1.0
  from mmgan_jax.train import codec_stage  # pylint: disable=g-import-not-at-top
  return codec_stage.load(c.checkpoint, model.codec, model.image_shape)


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, built once (and rebuilt identically on resume)."""
  config: Any
  model: mmgan.Model
  mesh: jax.sharding.Mesh
  data: registry.Data
  state: state_lib.TrainState
  state_shardings: Any
  batch_shardings: dict[str, NamedSharding]
  steps: Any  # jitted d_step, d_step_r1, g_step
  checkpointer: ckpt_lib.Checkpointer | None
  start_step: int


def setup(config, workdir: str | None, *, devices=None, restore_step: int | None = None) -> Setup:
  """Builds data, model, mesh, sharded state and steps; restores the latest (or `restore_step`) checkpoint."""
  config_validation.validate(config, num_devices=len(devices) if devices is not None else jax.device_count())
  data = registry.make_data(config.data, process_index=jax.process_index(), process_count=jax.process_count())
  model = mmgan.build_model(config.model, image_size=config.data.image_size,
                            vocab_size=data.text_codec.vocab_size, max_text_len=config.data.max_text_len,
                            sample_rate=data.sample_rate, pad_id=data.text_codec.pad_id)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
  rules = config.partition_rules
  sharding.check_batch_divisible(config.data.global_batch, mesh, rules)
  tx_g, tx_d = state_lib.make_optimizers(config.optim, config.total_steps,
                                         pretrained_lib.train_specs(config.model))
  codec_params, latent_scale = _codec_params(config, model)
  init_batch = mmgan.dummy_batch(model, 2, data.audio_samples)
  key = jax.random.PRNGKey(config.seed)
  # Pretrained encoder weights (host arrays): an argument of the jitted init, so they land on their shards.
  weights = pretrained_lib.load_weights(config.model, model.modalities)

  def init(k, w):
    return state_lib.init_state(model, config, k, init_batch, tx_g, tx_d, codec_params, latent_scale,
                                pretrained=w)

  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init, key, weights)
    shardings = state_lib.state_shardings(model, abstract, key, init_batch, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)(key, weights)
  del weights

  checkpointer = None
  start_step = 0
  if workdir:
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.max_checkpoints)
    if restore_step is not None and restore_step not in checkpointer.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {restore_step} in {checkpointer.directory}; '
                              f'saved steps: {checkpointer.all_steps() or "none"}.')
    restored = checkpointer.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), step=restore_step)
    if restored is not None:
      state, data_state = restored
      if data_state:
        data.train.set_state(data_state)
      start_step = int(jax.device_get(state.step))
      log.info('Resumed from %s at step %d.', checkpointer.directory, start_step)

  batch_ndims = {k: np.ndim(v) for k, v in init_batch.items()}  # the model's inputs; labels are not fed
  batch_sh = {k: sharding.batch_sharding(mesh, rules, n) for k, n in batch_ndims.items()}
  fns = make_steps(model, config, tx_g, tx_d)
  jit = lambda f: jax.jit(f, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                          donate_argnums=0)
  steps = dataclasses.replace(fns, d_step=jit(fns.d_step), d_step_r1=jit(fns.d_step_r1), g_step=jit(fns.g_step))
  return Setup(config, model, mesh, data, state, shardings, batch_sh, steps, checkpointer, start_step)


def next_batch(s: Setup) -> dict[str, jax.Array]:
  """The next per-process batch as global arrays (only the keys the steps take)."""
  local = next(s.data.train)
  return sharding.global_batch({k: local[k] for k in s.batch_shardings}, s.mesh, s.config.partition_rules)


def train_step(s: Setup, state, batch, step: int):
  """One iteration: D step (with lazy R1 every r1_interval) then G step."""
  lc = s.config.loss
  use_r1 = lc.r1_gamma > 0 and lc.r1_interval > 0 and step % lc.r1_interval == 0
  state, d_metrics = (s.steps.d_step_r1 if use_r1 else s.steps.d_step)(state, batch)
  state, g_metrics = s.steps.g_step(state, batch)
  return state, {**d_metrics, **g_metrics}


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can checkpoint before exiting."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  host = jax.device_get(history)
  keys = host[-1].keys()
  out = {}
  for k in keys:
    vals = [float(h[k]) for h in host if k in h]
    out[k] = float(np.mean(vals))
  return out


def write_samples(s: Setup, writer, evaluator: Evaluator, state, step: int) -> None:
  n = int(s.config.eval.sample_grid)
  batch = {k: v[:n] for k, v in s.data.eval_batch.items()}
  images = {'real': summaries.image_grid(batch['image'])}
  for name, sources in (('text_to_image', ('text',)), ('audio_to_image', ('audio',))):
    if set(sources) <= set(s.model.modalities):
      pre, post = evaluator.samples(state, batch, sources)
      images[f'{name}/pre_refine'] = summaries.image_grid(pre)
      images[f'{name}/refined'] = summaries.image_grid(post)
  writer.write_images(step, images)
  if s.model.text_decoder is not None:
    preds = evaluator.captions(state, batch, ('image',))
    writer.write_texts(step, {'captions/image_to_text': summaries.caption_table(preds, s.data.eval_references)})
  if 'audio' in s.model.modalities:
    writer.write_audios(step, {'condition_audio': batch['audio'][:4, :, None]},
                        sample_rate=s.data.sample_rate)


def make_evaluator(s: Setup, workdir: str | None, num_examples: int | None = None) -> Evaluator:
  """The configured plug-in evaluator; real-set FID features are cached under workdir/eval/cache."""
  cache = s.config.eval.fid.cache_dir or (os.path.join(workdir, 'eval', 'cache') if workdir else None)
  n = int(s.config.eval.num_examples if num_examples is None else num_examples)
  if n > s.data.num_eval:
    raise ValueError(f'config.eval.num_examples={n} is more than the held-out split holds '
                     f'(config.data.num_eval={s.data.num_eval}).')
  return Evaluator(s.model, s.config, s.data.text_codec, seed=s.config.seed, cache_dir=cache, num_examples=n)


def evaluate(s: Setup, evaluator: Evaluator, state) -> dict[str, float]:
  """Scores `state` on the first evaluator.num_examples held-out examples, streamed in eval batches."""
  return evaluator.evaluate(state, s.data.eval_batches(evaluator.batch_size, evaluator.num_examples))


def evaluate_checkpoint(config, workdir: str, *, step: int | None = None, num_examples: int | None = None,
                        out_dir: str | None = None) -> tuple[dict[str, float], dict[str, Any]]:
  """Evaluates the latest (or `step`) checkpoint in `workdir` with EMA weights; writes metrics.json/.md.

  Returns (metrics, protocol). Files go to `out_dir` (default workdir/eval), written by process 0.
  """
  from mmgan_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  _hide_accelerators_from_tf()
  maybe_initialize_distributed()
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'no checkpoints in {workdir}: train first (launch/train.py --workdir={workdir}).')
  s = setup(config, workdir, restore_step=step)
  if s.checkpointer is None or s.checkpointer.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint to evaluate in {workdir}/checkpoints.')
  evaluator = make_evaluator(s, workdir, num_examples)
  at = int(jax.device_get(s.state.step))
  t0 = time.time()
  with jax.set_mesh(s.mesh):
    metrics = evaluate(s, evaluator, s.state)
  metrics['eval_seconds'] = time.time() - t0
  s.checkpointer.close()
  proto = report.protocol(config, step=at, num_examples=evaluator.num_examples)
  if jax.process_index() == 0:
    report.write(out_dir or os.path.join(workdir, 'eval'), metrics, proto)
  return metrics, proto


def train_and_evaluate(config, workdir: str, *, devices=None) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if a checkpoint is there) and returns the final evaluation.

  `devices` (default: all) is what the mesh is built from.
  """
  _hide_accelerators_from_tf()
  from clu import metric_writers, parameter_overview, periodic_actions  # pylint: disable=g-import-not-at-top

  maybe_initialize_distributed()
  preemption = _Preemption()  # first, so a SIGTERM during set-up is honoured too
  s = None
  try:
    check_workdir(workdir)
    s = setup(config, workdir, devices=devices)
    check_workdir(workdir, checkpoint_bytes(config, s.state))
    if preemption.requested:
      log.warning('SIGTERM during set-up: exiting before the first step (nothing new to save).')
      return {}
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if s.start_step == 0:
      writer.write_hparams({k: str(v) for k, v in config.to_dict().items() if not isinstance(v, dict)})
      log.info('Parameters:\n%s', parameter_overview.get_parameter_overview(s.state.params, include_stats=False))
    evaluator = make_evaluator(s, workdir)
    progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                               every_steps=config.log_every)
    state = s.state
    history: list[dict[str, jax.Array]] = []
    step = s.start_step
    t0 = time.time()
    with jax.set_mesh(s.mesh):
      while step < config.total_steps:
        batch = next_batch(s)
        state, metrics = train_step(s, state, batch, step)
        step += 1
        history.append(metrics)
        progress(step)
        if step % config.log_every == 0 or step == config.total_steps:
          streak = float(jax.device_get(history[-1]['guard/nonfinite_streak']))  # the latest, not the mean
          scalars = _mean_metrics(history)
          history.clear()
          scalars['steps_per_sec_wall'] = (step - s.start_step) / max(time.time() - t0, 1e-9)
          scalars['data/bad_records'] = float(s.data.bad_records.count)  # skipped since this process started
          writer.write_scalars(step, scalars)
          if streak >= config.max_nonfinite_steps:
            raise NonFiniteError(
                f'step {step}: losses or gradients were NaN/Inf for {int(streak)} '
                'consecutive steps (updates were skipped). Lower the learning rates or enable '
                '--config.optim.grad_clip; the last good checkpoint is in the workdir.')
        if config.sample_every and step % config.sample_every == 0:
          write_samples(s, writer, evaluator, state, step)
        saved = bool(s.checkpointer) and (step % config.checkpoint_every == 0 or preemption.requested)
        if saved:
          s.checkpointer.save(step, state, s.data.train.get_state(), force=preemption.requested)
        if (config.eval_every and step % config.eval_every == 0 and step < config.total_steps
            and not preemption.requested):
          writer.write_scalars(step, {f'eval/{k}': v for k, v in evaluate(s, evaluator, state).items()})
        if preemption.requested:  # (it may have arrived during the evaluation)
          if s.checkpointer and not saved:
            s.checkpointer.save(step, state, s.data.train.get_state(), force=True)
          log.warning('SIGTERM: checkpoint written at step %d; exiting.', step)
          return {}
      if s.checkpointer and s.checkpointer.latest_step() != step:
        s.checkpointer.save(step, state, s.data.train.get_state(), force=True)
      write_samples(s, writer, evaluator, state, step)
      results = evaluate(s, evaluator, state)
  finally:
    preemption.restore()
    if s is not None and s.checkpointer:
      s.checkpointer.close()
  train_seconds = time.time() - t0
  results['train_seconds'] = train_seconds
  results['steps'] = step
  writer.write_scalars(step, {f'eval/{k}': v for k, v in results.items()})
  writer.flush()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval_results.json'), 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results
