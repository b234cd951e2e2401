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
import socket
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mmgan_jax import cli, config_io, config_validation
from mmgan_jax.data import registry
from mmgan_jax.evaluation.evaluator import Evaluator, fetch
from mmgan_jax.models import mmgan
from mmgan_jax.models import pretrained as pretrained_lib
from mmgan_jax.train import checkpoint as ckpt_lib
from mmgan_jax.train import sharding, summaries
from mmgan_jax.train import state as state_lib
from mmgan_jax.train.steps import make_steps

log = logging.getLogger(__name__)

# The entries of eval_results.json that are wall-clock measurements: they differ between any two runs.
WALL_CLOCK_RESULTS = ('train_seconds', 'steps_per_sec')


class NonFiniteError(RuntimeError):
  """Training produced NaN/Inf losses or gradients for too many consecutive steps."""


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written, or has no room for the checkpoints."""


def is_url(path: str) -> bool:
  """A cloud-storage path (gs://bucket/dir): written through orbax / TensorBoard / etils.epath, not os."""
  return '://' in str(path)


def check_workdir(workdir: str, need_bytes: int = 0) -> None:
  """Creates `workdir` and checks it takes a file and has `need_bytes` free; WorkdirError otherwise.

  A gs:// workdir is created and probed with one small object (its free space is not knowable).
  """
  if is_url(workdir):
    from etils import epath  # pylint: disable=g-import-not-at-top
    try:
      probe = epath.Path(workdir) / f'.write_test_{jax.process_index()}_{os.getpid()}'
      probe.parent.mkdir(parents=True, exist_ok=True)
      probe.write_text('ok')
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-except  # any storage/permission error of the backend
      raise WorkdirError(f'workdir {workdir} cannot be written ({type(e).__name__}: {str(e)[:200]}); check the '
                         'bucket and its credentials, or pass another --workdir.') from e
    return
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


class DistributedError(RuntimeError):
  """The multi-process job could not be formed (bad flags, unreachable coordinator, missing processes)."""


def _detected_cluster() -> str | None:
  """The multi-process launcher this process runs under, from its environment; None for a single process.

  The same environments `jax.distributed.initialize()` auto-detects: an explicit JAX_COORDINATOR_ADDRESS,
  a SLURM job step (srun) or an Open MPI job (mpirun) with several tasks, and Cloud TPU VMs (single- or
  multi-host: on TPU the call is cheap and gives orbax and the preemption service their coordination client).
  """
  env = os.environ
  if 'JAX_COORDINATOR_ADDRESS' in env or 'MEGASCALE_COORDINATOR_ADDRESS' in env:
    return 'JAX_COORDINATOR_ADDRESS'
  slurm_vars = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(k in env for k in slurm_vars) and int(env.get('SLURM_STEP_NUM_TASKS', env['SLURM_NTASKS'])) > 1:
    return 'SLURM'
  if 'OMPI_MCA_orte_hnp_uri' in env and int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES') or ''
  if hosts.count(',') > 0:
    return 'TPU (GKE)'
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top  # jax's own TPU-VM probe
    if cloud_tpu_init.running_in_cloud_tpu_vm:
      return 'Cloud TPU VM'
  except (ImportError, AttributeError):  # moved in another jax version: TPU pods then need the flags
    pass
  return None


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f'--coordinator_address={address!r} must be HOST:PORT (process 0\'s host name or IP '
                           'and a free TCP port, e.g. 10.0.0.2:8476).')
  return host.strip('[]'), int(port)


def _reachable(host: str, port: int, timeout_s: float = 2.0) -> bool:
  try:
    with socket.create_connection((host, port), timeout=timeout_s):
      return True
  except OSError:
    return False


def _check_coordinator_port(host: str, port: int) -> None:
  """Process 0 serves the coordinator on `port`: it must be free (a clear error instead of jax's abort)."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise DistributedError(f'the coordinator host {host!r} does not resolve ({e.strerror}); pass process 0\'s '
                           'host name or IP in --coordinator_address.') from None
  family = infos[0][0]
  with socket.socket(family, socket.SOCK_STREAM) as probe:
    try:
      probe.bind(('::' if family == socket.AF_INET6 else '0.0.0.0', port))
    except OSError as e:
      raise DistributedError(f'process 0 cannot serve the coordinator on port {port} ({e.strerror}); pick another '
                             'port in --coordinator_address.') from None


def _log_process_line() -> None:
  log.info('JAX process %d of %d: %d local devices, %d global devices (%s).', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, *, timeout_s: int = 300) -> bool:
  """Joins the multi-process JAX job when there is one; call it before anything touches JAX devices.

  With any argument given, `jax.distributed.initialize` gets them (unset ones it detects from SLURM / Open MPI /
  TPU environments). Without arguments it is called only when `_detected_cluster()` finds a launcher (TPU pods,
  srun, mpirun, JAX_COORDINATOR_ADDRESS), so a plain single-process run never waits for peers. CPU processes
  exchange collectives over gloo (jax's default CPU collectives). Once joined, logs one line per process: its
  index, the process count and the local/global device counts. Idempotent.

  Args:
    coordinator_address: HOST:PORT of process 0 (it serves the coordination service there).
    num_processes: processes in the job.
    process_id: this process's index in [0, num_processes).
    timeout_s: how long to wait for the coordinator and all processes; then DistributedError, never a hang.

  Returns:
    Whether `jax.distributed` was initialised (several processes, or a TPU VM); the process line was logged.

  Raises:
    DistributedError: bad arguments, a coordinator port in use, or the job not formed within `timeout_s`.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  cluster = 'flags' if explicit else _detected_cluster()
  if cluster is None:
    return False
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f'--num_processes={num_processes} must be at least 1.')
  if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
    raise DistributedError(f'--process_id={process_id} must lie in [0, --num_processes={num_processes}).')
  if timeout_s <= 0:
    raise DistributedError(f'--distributed_timeout_s={timeout_s} must be positive.')
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  where = None
  if address:
    where = _split_address(address)
    if process_id == 0:
      _check_coordinator_port(*where)
  who = (f'process {process_id if process_id is not None else "?"} of {num_processes or "?"} '
         f'(set-up from {cluster})')

  def give_up() -> None:  # jax aborts the process (a C++ fatal error) at its own timeout: be clearer and first
    if where is None or _reachable(*where):
      reason = 'not every process joined (start all of them with the same --num_processes and coordinator)'
    else:
      reason = f'nothing answers at the coordinator {address} (is process 0 running there? firewall?)'
    print(f'error: {who} could not join the JAX job within --distributed_timeout_s={timeout_s}: {reason}.',
          file=sys.stderr, flush=True)
    os._exit(2)  # pylint: disable=protected-access

  watchdog = threading.Timer(timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=int(timeout_s) + 60)
  except (ValueError, TypeError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(f'{who}: jax.distributed.initialize failed: {first}') from None
  finally:
    watchdog.cancel()
  _log_process_line()
  return True


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
  steps: Any  # jitted d_step, d_step_r1, g_step, rep_step, d_head_step, gan_step, gan_step_lazy
  checkpointer: ckpt_lib.Checkpointer | None
  start_step: int


def setup(config, workdir: str | None, *, devices=None, restore_step: int | None = None,
          resume: bool = False) -> Setup:
  """Builds data, model, mesh, sharded state and steps; restores the latest (or `restore_step`) checkpoint.

  `resume`: a training run continuing in the workdir; damaged newer checkpoints it falls back over are moved to
  WORKDIR/damaged_checkpoints/ so that the retrained steps are saved (read-only tools leave them in place).
  """
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

  state, checkpointer, start_step = None, None, 0
  if workdir:
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.max_checkpoints)
    log.info('Checkpoints: %s (saved steps: %s).', checkpointer.directory, checkpointer.all_steps() or 'none')
    if restore_step is not None and restore_step not in checkpointer.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {restore_step} in {checkpointer.directory}; '
                              f'saved steps: {checkpointer.all_steps() or "none"}.')
    restored = checkpointer.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), step=restore_step,
                                    move_damaged=resume)
    if restored is not None:
      state, data_state = restored
      if data_state:
        data.train.set_state(data_state)
      start_step = int(fetch(state.step))
      log.info('Resumed from %s at step %d.', checkpointer.directory, start_step)
  if state is None:  # a fresh run (a resumed one skips the init program: its compile and a second copy in memory)
    with jax.set_mesh(mesh):
      state = jax.jit(init, out_shardings=shardings)(key, weights)
  del weights

  batch_ndims = {k: np.ndim(v) for k, v in init_batch.items()}  # the model's inputs; labels are not fed
  batch_sh = {k: sharding.batch_sharding(mesh, rules, n) for k, n in batch_ndims.items()}
  fns = make_steps(model, config, tx_g, tx_d)
  jit = lambda f: jax.jit(f, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                          donate_argnums=0)
  # The G steps also take the D step's `guard/d_finite` scalar (replicated), to count a bad iteration once.
  jit_g = lambda f: jax.jit(f, in_shardings=(shardings, batch_sh, NamedSharding(mesh, P())),
                            out_shardings=(shardings, None), donate_argnums=0)
  steps = dataclasses.replace(fns, d_step=jit(fns.d_step), d_step_r1=jit(fns.d_step_r1), g_step=jit_g(fns.g_step),
                              rep_step=jit(fns.rep_step), d_head_step=jit(fns.d_head_step), gan_step=jit_g(fns.gan_step),
                              gan_step_lazy=jit_g(fns.gan_step_lazy))
  return Setup(config, model, mesh, data, state, shardings, batch_sh, steps, checkpointer, start_step)


def next_batch(s: Setup) -> dict[str, jax.Array]:
  """The next per-process batch as global arrays (only the keys the steps take)."""
  local = next(s.data.train)
  return sharding.global_batch({k: local[k] for k in s.batch_shardings}, s.mesh, s.config.partition_rules)


def _check_finite(streak: jax.Array | None, step: int, limit: int) -> None:
  """Stops the run once `limit` consecutive iterations had non-finite losses or gradients (updates skipped)."""
  if streak is None:
    return
  n = int(fetch(streak))
  if n >= limit:
    raise NonFiniteError(
        f'step {step}: losses or gradients were NaN/Inf in {n} consecutive iterations (their updates were '
        'skipped). Lower the learning rates or enable --config.optim.grad_clip; the last good checkpoint is in '
        'the workdir.')


def train_step(s: Setup, state, batch, step: int):
  """One iteration: D step (with lazy R1 every r1_interval) then G step; before `gan_start` the
  representation step alone (and, with `d_head_warmup`, D's condition head on real images); after it, the G step trains the representation side on every `rep_every`-th
  iteration only (G alone on the others)."""
  if step < s.config.gan_start:
    state, metrics = s.steps.rep_step(state, batch)
    if s.config.get('d_head_warmup', False):  # D's features and condition head learn to name real images meanwhile
      state, d_metrics = s.steps.d_head_step(state, batch)
      metrics = {**metrics, 'd/head_warmup': d_metrics['d/head_warmup']}
    return state, metrics
  lc = s.config.loss
  use_r1 = lc.r1_gamma > 0 and lc.r1_interval > 0 and step % lc.r1_interval == 0
  state, d_metrics = (s.steps.d_step_r1 if use_r1 else s.steps.d_step)(state, batch)
  every = s.config.rep_every
  joint = every == 1 or (every > 1 and (step - s.config.gan_start) % every == 0)
  if joint:
    g_step = s.steps.g_step
  else:  # G alone; the semantic terms on every loss.sem_every-th such iteration
    g_step = s.steps.gan_step if (step - s.config.gan_start) % lc.sem_every == 0 else s.steps.gan_step_lazy
  state, g_metrics = g_step(state, batch, d_metrics['guard/d_finite'])
  return state, {**d_metrics, **g_metrics}


class _Preemption:
  """SIGTERM -> a checkpoint at a step boundary, then a clean exit; bounded by GRACE_S in any phase.

  One process: a Python SIGTERM handler sets a flag the loop checks after each step. Several processes: they
  must all stop at the same step (a checkpoint save is collective), even when only some of them got the
  signal; jax's preemption service (installed by `jax.distributed.initialize`, it catches SIGTERM itself)
  propagates the notice and `reached(step)` is true on every process at the same agreed step.

  A Python handler only runs between bytecodes, so a SIGTERM that lands in a long native call (an XLA compile,
  the end-of-run evaluation) would wait for it: preemptible VMs give ~30 s. The signal also wakes a watchdog
  thread (`signal.set_wakeup_fd`); if the main thread has not stopped GRACE_S seconds later, the watchdog lets
  an in-flight checkpoint write finish and exits the process (status 0). What a checkpoint already holds is
  never lost: at worst the steps since the newest checkpoint are retrained.
  """

  GRACE_S = 20.0  # of the ~30 s a preemptible VM gives; the rest covers an in-flight checkpoint write
  SAVE_WAIT_S = 8.0

  def __init__(self):
    self.requested = False
    self.phase = 'set-up'  # what the main thread is doing, for the watchdog's message
    self.checkpointer = None  # set once built: the watchdog waits for its in-flight save
    self._old = None
    self._old_fd = None
    self._done = threading.Event()
    self._sync = jax.distributed.is_initialized() and jax.process_count() > 1
    if self._sync:
      return  # keep jax's SIGTERM notifier: a Python handler would replace it
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
      return
    self._wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    self._wake_w = wake_w
    try:
      self._old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    except ValueError:
      return
    threading.Thread(target=self._watchdog, name='sigterm-watchdog', daemon=True).start()

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def _watchdog(self):
    while not self._done.is_set():
      try:
        data = self._wake_r.recv(64)
      except OSError:
        return
      if not data or self._done.is_set():
        return
      if signal.SIGTERM in data:
        break
    if self._done.wait(self.GRACE_S):
      return
    saver = getattr(self.checkpointer, 'manager', None)
    t0 = time.time()
    while saver is not None and saver.is_saving_in_progress() and time.time() - t0 < self.SAVE_WAIT_S:
      time.sleep(0.1)
    newest = None
    try:
      newest = self.checkpointer.latest_step() if self.checkpointer is not None else None
    except Exception:  # pylint: disable=broad-except
      pass
    msg = (f'SIGTERM: still {self.phase} {self.GRACE_S:.0f} s later; exiting now (newest checkpoint: step '
           f'{newest}). Run the same command to resume.')
    log.warning(msg)
    print(msg, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)  # pylint: disable=protected-access

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; call it once after every step (the same on all processes)."""
    if self._sync and not self.requested:
      try:
        self.requested = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # the preemption service is off (jax_enable_preemption_service=False)
        log.warning('No preemption sync across processes (%s); SIGTERM will not checkpoint.', e)
        self._sync = False
    return self.requested

  def restore(self):
    self._done.set()
    if self._old_fd is not None:
      signal.set_wakeup_fd(self._old_fd)
      self._wake_w.close()
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _write_parameter_table(params, workdir: str, parameter_overview) -> None:
  """The full parameter table goes to WORKDIR/parameters.txt; the console gets one line."""
  table = parameter_overview.get_parameter_overview(params, include_stats=False)
  leaves = jax.tree.leaves(params)
  count = sum(int(np.prod(x.shape)) for x in leaves)
  nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
  from etils import epath  # pylint: disable=g-import-not-at-top  (local paths and gs:// alike)
  where = epath.Path(workdir) / 'parameters.txt'
  where.write_text(table + '\n')
  log.info('Parameters: %s (%.1f MB) in %d arrays; the table per array is in %s.', f'{count:,}', nbytes / 1e6,
           len(leaves), where)


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  host = fetch(history)
  keys = dict.fromkeys(k for h in host for k in h)  # steps of different kinds log different terms
  out = {}
  for k in keys:
    vals = [float(h[k]) for h in host if k in h]
    out[k] = float(np.mean(vals))
  return out


METRICS_FILE = 'metrics.jsonl'


def _append_metrics(workdir: str, step: int, scalars: dict) -> None:
  """One JSON line {"step": N, name: value, ...} per logged step in WORKDIR/metrics.jsonl (process 0, local
  workdirs; TensorBoard has the same numbers everywhere). A resumed run appends from its resume step on."""
  if jax.process_index() != 0 or is_url(workdir):
    return
  row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
  with open(os.path.join(workdir, METRICS_FILE), 'a') as f:
    f.write(json.dumps(row) + '\n')


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
  local_workdir = workdir if workdir and not is_url(workdir) else None  # the FID cache is a local file
  cache = s.config.eval.fid.cache_dir or (os.path.join(local_workdir, 'eval', 'cache') if local_workdir else None)
  n = int(s.config.eval.num_examples if num_examples is None else num_examples)
  if n > s.data.num_eval:
    raise ValueError(f'config.eval.num_examples={n} is more than the held-out split holds '
                     f'(config.data.num_eval={s.data.num_eval}).')
  return Evaluator(s.model, s.config, s.data.text_codec, seed=s.config.seed, cache_dir=cache, num_examples=n)


def evaluate(s: Setup, evaluator: Evaluator, state) -> dict[str, float]:
  """Scores `state` on the first evaluator.num_examples held-out examples, streamed in eval batches."""
  return evaluator.evaluate(state, s.data.eval_batches(evaluator.batch_size, evaluator.num_examples))


def restore_trained(config, workdir: str, *, step: int | None = None, devices=None) -> Setup:
  """`setup` of a finished (or running) training workdir: FileNotFoundError if it holds no checkpoint."""
  if not is_url(workdir) and not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'no checkpoints in {workdir}: train first (launch/train.py --workdir={workdir}).')
  s = setup(config, workdir, devices=devices, restore_step=step)
  if s.checkpointer is None or s.checkpointer.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints.')
  return s


def _restore_for_evaluation(config, workdir: str, step: int | None, out_dir: str | None, files: str) -> Setup:
  """The launcher-side start of an evaluation: TF off the accelerators, the distributed job joined, a local
  output directory checked, the checkpoint restored."""
  _hide_accelerators_from_tf()
  maybe_initialize_distributed()
  if is_url(out_dir or workdir):
    raise ValueError(f'{files} are written with local file calls; pass a local --out_dir (workdir {workdir} is '
                     'in cloud storage).')
  return restore_trained(config, workdir, step=step)


def evaluate_checkpoint(config, workdir: str, *, step: int | None = None, num_examples: int | None = None,
                        out_dir: str | None = None) -> tuple[dict[str, float], dict[str, Any]]:
  """Evaluates the latest (or `step`) checkpoint in `workdir` with EMA weights; writes metrics.json/.md.

  Returns (metrics, protocol). Files go to `out_dir` (default workdir/eval), written by process 0.
  """
  from mmgan_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  s = _restore_for_evaluation(config, workdir, step, out_dir, 'metrics.json/.md')
  evaluator = make_evaluator(s, workdir, num_examples)
  at = int(fetch(s.state.step))
  t0 = time.time()
  with sharding.use_mesh(s.mesh, config.partition_rules):
    metrics = evaluate(s, evaluator, s.state)
  metrics['eval_seconds'] = time.time() - t0
  s.checkpointer.close()
  proto = report.protocol(config, step=at, num_examples=evaluator.num_examples)
  if jax.process_index() == 0:
    report.write(out_dir or os.path.join(workdir, 'eval'), metrics, proto)
  return metrics, proto


def robustness_checkpoint(config, workdir: str, *, step: int | None = None, num_examples: int | None = None,
                          out_dir: str | None = None, curves=None, seed: int = 0) -> dict[str, Any]:
  """Robustness curves (evaluation/robustness.py) of the latest (or `step`) checkpoint in `workdir`, EMA weights;
  process 0 writes them to `out_dir` (default workdir/eval)/robustness.json. Returns the curves."""
  from mmgan_jax.evaluation import robustness  # pylint: disable=g-import-not-at-top
  s = _restore_for_evaluation(config, workdir, step, out_dir, 'robustness.json')
  evaluator = make_evaluator(s, None, num_examples)
  codec = s.data.text_codec
  t0 = time.time()
  with sharding.use_mesh(s.mesh, config.partition_rules):
    curves_out = robustness.evaluate_robustness(
        evaluator, s.state, lambda: s.data.eval_batches(evaluator.batch_size, evaluator.num_examples),
        curves=tuple(curves or robustness.CURVES), seed=seed,
        ids=dict(bos_id=codec.bos_id, eos_id=codec.eos_id, pad_id=codec.pad_id))
  s.checkpointer.close()
  result = dict(curves=curves_out, step=int(fetch(s.state.step)), num_examples=evaluator.num_examples,
                seed=seed, refine_steps=int(config.refine.num_steps), seconds=time.time() - t0)
  if jax.process_index() == 0:
    out = out_dir or os.path.join(workdir, 'eval')
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'robustness.json'), 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True, default=float)
  return result


def hparams(config) -> dict[str, bool | int | float | str]:
  """Every config field as a flat {'loss.adv': 1.0, ...} for TensorBoard's HParams dashboard (runs of a sweep
  are compared on the fields they differ in); sequences become strings."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


def _has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def train_and_evaluate(config, workdir: str, *, devices=None, accept_config_change: bool = False
                       ) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if a checkpoint is there) and returns the final evaluation.

  `devices` (default: all) is what the mesh is built from. A resumed run must have the config it was trained
  with (config_io.check_resume); `accept_config_change` continues with the new values, recorded in the workdir.
  """
  _hide_accelerators_from_tf()
  from clu import metric_writers, parameter_overview  # pylint: disable=g-import-not-at-top

  multi = maybe_initialize_distributed()
  preemption = _Preemption()  # first, so a SIGTERM during set-up is honoured too
  if not multi:
    _log_process_line()
  s = None
  try:
    # The config first: a rejected one leaves no workdir behind.
    config_validation.validate(config, num_devices=len(devices) if devices is not None else jax.device_count())
    created = not is_url(workdir) and not os.path.exists(workdir)
    check_workdir(workdir)
    resuming = not is_url(workdir) and _has_checkpoint(workdir)
    diff = {}
    if not is_url(workdir):  # (config.json is not kept on cloud storage)
      diff = config_io.check_resume(config, workdir, resuming=resuming, accept_changes=accept_config_change)
      if diff:
        log.warning('Resuming with %d changed config field(s), recorded in %s: %s', len(diff),
                    os.path.join(workdir, config_io.HISTORY), ', '.join(diff))
    try:
      s = setup(config, workdir, devices=devices, resume=True)
    except BaseException:
      if created and os.path.isdir(workdir) and not os.listdir(workdir):  # leave nothing behind
        os.rmdir(workdir)
      raise
    check_workdir(workdir, checkpoint_bytes(config, s.state))
    preemption.checkpointer = s.checkpointer
    if preemption.requested:
      log.warning('SIGTERM during set-up: exiting before the first step (nothing new to save).')
      return {}
    if jax.process_index() == 0 and not is_url(workdir):  # what launch/sample.py and evaluate.py read back
      config_io.record(config, workdir, diff, resuming=resuming)
    # Scalars, images and texts go to TensorBoard (process 0); the console gets one progress line per log_every
    # steps and WORKDIR/metrics.jsonl every logged scalar (`_append_metrics`).
    writer = metric_writers.AsyncMultiWriter(
        [metric_writers.SummaryWriter(workdir)] if jax.process_index() == 0 else [])
    if s.start_step == 0:
      writer.write_hparams(hparams(config))
    if s.start_step == 0 and jax.process_index() == 0:
      _write_parameter_table(s.state.params, workdir, parameter_overview)
    evaluator = make_evaluator(s, workdir)
    state = s.state
    nan_steps = frozenset(config.debug.nan_at_steps)
    if nan_steps:
      log.warning('debug.nan_at_steps: the batches of iterations %s are made NaN (a test of the NaN stop).',
                  sorted(nan_steps))
    history: list[dict[str, jax.Array]] = []
    step = s.start_step
    t0 = time.time()
    t_first, first_step = None, step
    sampled = None  # the step whose sample grids were last written
    with sharding.use_mesh(s.mesh, config.partition_rules):
      streak = None  # the previous iteration's count of consecutive bad iterations (read one step late)
      if step < config.total_steps:
        preemption.phase = 'compiling the train steps'
        log.info('Compiling the train steps for iteration %d (the D and G programs; minutes on a CPU)...', step + 1)
      while step < config.total_steps:
        batch = next_batch(s)
        if step + 1 in nan_steps:
          batch = dict(batch, image=batch['image'] * jnp.nan)
        state, metrics = train_step(s, state, batch, step)
        step += 1
        # Read while this step runs: waiting for the step itself would stall the dispatch of the next one.
        _check_finite(streak, step - 1, config.max_nonfinite_steps)
        streak = metrics['guard/nonfinite_streak']
        if t_first is None:  # the first step of this process compiles: the steady speed is measured after it
          jax.block_until_ready(state.step)
          t_first, first_step = time.time(), step
          log.info('Compiled; iteration %d done in %.0f s. Training.', step, t_first - t0)
          preemption.phase = 'training'
        history.append(metrics)
        if step % config.log_every == 0 or step == config.total_steps:
          scalars = _mean_metrics(history)
          history.clear()
          now = time.time()
          scalars['steps_per_sec_wall'] = (step - s.start_step) / max(now - t0, 1e-9)
          scalars['data/bad_records'] = float(s.data.bad_records.count)  # skipped since this process started
          writer.write_scalars(step, scalars)
          _append_metrics(workdir, step, scalars)
          steady = (step - first_step) / (now - t_first) if step > first_step and now > t_first else None
          log.info('%s', cli.progress_line(step, config.total_steps, scalars, steady))
        if config.sample_every and step % config.sample_every == 0:
          write_samples(s, writer, evaluator, state, step)
          sampled = step
        stop = preemption.reached(step)
        saved = bool(s.checkpointer) and (step % config.checkpoint_every == 0 or stop)
        if saved:
          s.checkpointer.save(step, state, s.data.train.get_state(), force=stop)
        if (config.eval_every and step % config.eval_every == 0 and step < config.total_steps
            and not preemption.requested):
          preemption.phase = f'evaluating step {step}'
          mid = evaluate(s, evaluator, state)
          writer.write_scalars(step, {f'eval/{k}': v for k, v in mid.items()})
          log.info('%s', cli.eval_line(step, mid))
          preemption.phase = 'training'
        if preemption.requested:  # (one process: it may have arrived during the evaluation)
          if s.checkpointer and not saved:
            s.checkpointer.save(step, state, s.data.train.get_state(), force=True)
          log.warning('SIGTERM: checkpoint written at step %d; exiting.', step)
          return {}
      _check_finite(streak, step, config.max_nonfinite_steps)
      jax.block_until_ready(state.step)
      t_loop = time.time()
      if s.checkpointer and s.checkpointer.latest_step() != step:
        preemption.phase = 'saving the final checkpoint'
        s.checkpointer.save(step, state, s.data.train.get_state(), force=True)
      preemption.phase = f'evaluating step {step} (the final checkpoint is written)'
      log.info('Evaluating step %d (%s on %d held-out examples)...', step, ', '.join(config.eval.evaluators),
               config.eval.num_examples)
      if sampled != step:  # (once per step: the loop may have written this step's grids)
        write_samples(s, writer, evaluator, state, step)
      results = evaluate(s, evaluator, state)
  finally:
    preemption.restore()
    if s is not None and s.checkpointer:
      s.checkpointer.close()
  train_seconds = time.time() - t0
  results['train_seconds'] = train_seconds
  results['steps'] = step
  if t_first is not None and step > first_step:  # steps/s after the first (compiling) step, checkpoints included
    results['steps_per_sec'] = (step - first_step) / max(t_loop - t_first, 1e-9)
  writer.write_scalars(step, {f'eval/{k}': v for k, v in results.items()})
  writer.flush()
  if jax.process_index() == 0:
    if is_url(workdir):
      from etils import epath  # pylint: disable=g-import-not-at-top
      (epath.Path(workdir) / 'eval_results.json').write_text(json.dumps(results, indent=2, sort_keys=True))
    else:
      with open(os.path.join(workdir, 'eval_results.json'), 'w') as f:
        json.dump(results, f, indent=2, sort_keys=True)
  return results
