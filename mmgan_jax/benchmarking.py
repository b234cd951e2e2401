"""Measurements behind launch/benchmark.py, launch/benchmark_data.py and docs/performance.md.

Everything here measures a config's model with randomly initialised weights (a random codec too, so the
paper-scale configs need no stage-1 checkpoint): timing does not depend on what the weights are.

  build(config, batch, devices)     the model, mesh, sharded state, a random batch and the jitted steps
  compile_steps(bench)              AOT-compiles D, D+R1 and G steps: compile time, XLA cost analysis, memory
  time_train(bench, compiled, ...)  median step times after warm-up, examples/s, FLOP/s, MFU
  sampling_latency(bench, ...)      G only, G + K-step refinement, a 50-step DDIM of the same refiner
  sharding_overhead(...)            the train iteration on 1 vs N (virtual) CPU devices, interleaved
  pipeline_rate(config, ...)        records/s of the config's input pipeline (`measure`)
  breakdown(bench)                  time and FLOPs of each component's forward / backward pass alone
  op_profile(bench, compiled)       a per-op `jax.profiler` trace of the iteration, by op kind and component
  conv_probe(shapes, dtype)         one conv alone at the model's sizes (how XLA runs them)
  peak_flops(device_kind)           dense bf16 peaks of TPUs and NVIDIA GPUs; `MatmulProbe` measures a CPU's
  benchmark(config, ...)            all of the above: what launch/benchmark.py writes as JSON
  format_table(result)              the readable summary it prints

Timings are medians of individually synchronised calls (`jax.block_until_ready`), so a busy shared machine
shifts them less than a mean would.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gzip
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmgan_jax import config_validation
from mmgan_jax.data import registry
from mmgan_jax.models import diffusion, mmgan
from mmgan_jax.models import pretrained as pretrained_lib
from mmgan_jax.train import sharding
from mmgan_jax.train import state as state_lib
from mmgan_jax.train import steps as steps_lib

log = logging.getLogger(__name__)

STEP_NAMES = ('d_step', 'd_step_r1', 'g_step')

# Dense (no structured sparsity) bf16 peak FLOP/s per chip, from the vendors' datasheets / spec pages:
#   TPU v4 275e12    https://cloud.google.com/tpu/docs/v4            ("Peak compute per chip (bf16) 275 TFLOPs")
#   TPU v5e 197e12   https://cloud.google.com/tpu/docs/v5e           ("Peak compute per chip (bf16) 197 TFLOPs")
#   TPU v5p 459e12   https://cloud.google.com/tpu/docs/v5p           ("Peak compute per chip (bf16) 459 TFLOPs")
#   TPU v6e 918e12   https://cloud.google.com/tpu/docs/v6e           ("Peak compute per chip (bf16) 918 TFLOPs")
#   A100 312e12      NVIDIA A100 Tensor Core GPU datasheet           (BF16 Tensor Core 312 TFLOPS; 624 sparse)
#   H100 SXM 989e12  NVIDIA H100 Tensor Core GPU datasheet           (BF16 1,979 TFLOPS with sparsity, halved)
#   H100 PCIe 756e12 same datasheet                                  (1,513 with sparsity, halved)
#   H100 NVL 835e12  same datasheet                                  (1,671 with sparsity, halved)
#   H200 SXM 989e12  NVIDIA H200 Tensor Core GPU datasheet           (BF16 1,979 TFLOPS with sparsity, halved)
#   H200 NVL 835e12  same datasheet                                  (1,671 with sparsity, halved)
PEAK_BF16_FLOPS = {
    'TPU v4': 275e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v6e': 918e12, 'A100': 312e12,
    'H100 SXM': 989e12, 'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H200 SXM': 989e12, 'H200 NVL': 835e12,
}
# `jax.devices()[0].device_kind` -> the row above: (substrings that must all occur, lower case), first match wins;
# a None row is a known kind without a table entry (TPU v4 lite = v4i, an inference chip).
_KIND_RULES = (
    (('v4', 'lite'), None),
    (('v6', 'lite'), 'TPU v6e'), (('v6e',), 'TPU v6e'),
    (('v5', 'lite'), 'TPU v5e'), (('v5e',), 'TPU v5e'), (('v5p',), 'TPU v5p'), (('tpu v5',), 'TPU v5p'),
    (('tpu v4',), 'TPU v4'),
    (('h200', 'nvl'), 'H200 NVL'), (('h200',), 'H200 SXM'),
    (('h100', 'pcie'), 'H100 PCIe'), (('h100', 'nvl'), 'H100 NVL'), (('h100',), 'H100 SXM'),
    (('a100',), 'A100'),
)


def peak_flops(device_kind: str) -> tuple[str, float] | None:
  """(table row, dense bf16 peak FLOP/s) for a device kind such as 'NVIDIA H100 80GB HBM3'; None if unknown."""
  kind = device_kind.lower()
  for needles, row in _KIND_RULES:
    if all(n in kind for n in needles):
      return (row, PEAK_BF16_FLOPS[row]) if row else None
  return None


# ------------------------------------------------------------------------------------------------------------
# Small helpers.


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
  """Median wall seconds of `fn()` (each call synchronised with block_until_ready), after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


class MatmulProbe:
  """A compiled dense (n, n) @ (n, n) matmul on one device; each call times one product and records its rate.

  On a shared CPU the attainable rate moves with the load, so the benchmark calls the probe between train
  iterations and divides by the median of the rates seen over the same period.
  """

  def __init__(self, n: int = 2048, dtype=jnp.float32, device=None):
    device = device or jax.devices()[0]
    self.n, self.dtype = n, jnp.dtype(dtype).name
    self._a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype), device)
    self._b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype), device)
    self._f = jax.jit(jnp.matmul).lower(self._a, self._b).compile()
    jax.block_until_ready(self._f(self._a, self._b))
    self.rates: list[float] = []

  def __call__(self) -> float:
    t = time.perf_counter()
    jax.block_until_ready(self._f(self._a, self._b))
    self.rates.append(2.0 * self.n ** 3 / (time.perf_counter() - t))
    return self.rates[-1]

  def median(self) -> float:
    return statistics.median(self.rates)


def matmul_rate(n: int = 2048, dtype=jnp.float32, repeats: int = 7, device=None) -> float:
  """Measured FLOP/s of a jitted dense (n, n) @ (n, n) matmul on `device` (default: the first), median."""
  probe = MatmulProbe(n, dtype, device)
  for _ in range(repeats):
    probe()
  return probe.median()


def _flops(cost) -> float:
  """The 'flops' entry of an XLA cost analysis (a dict, or a one-element list of dicts in older jax)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def memory(compiled) -> dict[str, int]:
  """Bytes of a compiled executable's arguments, outputs (less those aliased to donated inputs), temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f'{k}_size_in_bytes', 0)) for k in ('argument', 'output', 'alias', 'temp',
                                                                 'generated_code')}
  out['peak_estimate'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def device_memory_peak(device) -> int | None:
  """`peak_bytes_in_use` of the device's allocator since the process started (GPU/TPU; None on CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info(config_name: str, config, batch: int, devices: Sequence[Any]) -> dict[str, Any]:
  """What ran the benchmark: devices, host CPU, versions, config, batch, dtype, load."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  d = devices[0]
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      command=' '.join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else 'python'] + sys.argv[1:]),
      config=config_name, batch=int(batch), dtype=str(config.model.dtype),
      image_size=int(config.data.image_size), latent_shape=None,
      platform=d.platform, device_kind=d.device_kind, devices_used=len(devices),
      device_count=jax.device_count(), local_device_count=jax.local_device_count(),
      process_count=jax.process_count(), cpu_model=cpu_model(), cpu_count=os.cpu_count(),
      cpus_available=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
      load_average=list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
      python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
      xla_flags=os.environ.get('XLA_FLAGS', ''))


# ------------------------------------------------------------------------------------------------------------
# The model, state and steps with random weights.


def text_vocab(data_cfg) -> tuple[int, int]:
  """(vocab size, pad id): the real text codec where it needs no dataset, else config.data.tokenizer.vocab_size."""
  if data_cfg.tokenizer.path or data_cfg.name == 'shapes':
    codec = registry.text_codec(data_cfg)
    return int(codec.vocab_size), int(codec.pad_id)
  return int(data_cfg.tokenizer.vocab_size), 0


def build_model(config) -> mmgan.Model:
  d = config.data
  vocab, pad = text_vocab(d)
  return mmgan.build_model(config.model, image_size=d.image_size, vocab_size=vocab, max_text_len=d.max_text_len,
                           sample_rate=d.sample_rate, pad_id=pad)


def audio_samples(config) -> int:
  return int(round(config.data.audio_seconds * config.data.sample_rate))


def random_batch(model: mmgan.Model, batch: int, n_audio: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of the model's inputs with random values in their ranges (images in [-1, 1])."""
  rng = np.random.default_rng(seed)
  h, w, c = model.image_shape
  out = dict(image=rng.uniform(-1, 1, (batch, h, w, c)).astype(np.float32),
             text_ids=rng.integers(1, model.vocab_size, (batch, model.max_text_len)).astype(np.int32),
             text_mask=np.ones((batch, model.max_text_len), bool))
  if 'audio' in model.modalities:
    out['audio'] = (0.1 * rng.standard_normal((batch, n_audio))).astype(np.float32)
  return out


@dataclasses.dataclass
class Bench:
  """A model with a sharded random state, a device batch and the jitted steps, on one mesh."""
  config: Any
  model: mmgan.Model
  mesh: jax.sharding.Mesh
  devices: list[Any]
  state: state_lib.TrainState
  batch: dict[str, jax.Array]
  jitted: dict[str, Callable]  # d_step, d_step_r1, g_step: jitted with shardings and donated state

  @property
  def batch_size(self) -> int:
    return int(self.batch['image'].shape[0])


def build(config, batch: int, devices: Sequence[Any] | None = None, *, seed: int = 0) -> Bench:
  """The config's model with random weights (codec included) on a mesh over `devices`, and its jitted steps.

  Raises:
    config_validation.ConfigError / ValueError: the config cannot run at this batch on these devices.
  """
  devices = list(devices if devices is not None else jax.devices())
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.global_batch = int(batch)
  config_validation.validate(config, num_devices=len(devices))
  model = build_model(config)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
  rules = config.partition_rules
  sharding.check_batch_divisible(batch, mesh, rules)
  specs = pretrained_lib.train_specs(config.model)
  tx_g, tx_d = state_lib.make_optimizers(config.optim, config.total_steps, specs)
  init_batch = mmgan.dummy_batch(model, 2, audio_samples(config))
  key = jax.random.PRNGKey(seed)
  weights = pretrained_lib.load_weights(config.model, model.modalities)  # {} unless an encoder is pretrained

  def init(k, w):  # the trainer's init, codec random (the trainer loads a stage-1 checkpoint instead)
    return state_lib.init_state(model, config, k, init_batch, tx_g, tx_d, None, 1.0, pretrained=w)

  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init, key, weights)
    shardings = state_lib.state_shardings(model, abstract, key, init_batch, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)(key, weights)
    host = random_batch(model, batch, audio_samples(config), seed)
    device_batch = sharding.global_batch(host, mesh, rules)
  batch_sh = {k: sharding.batch_sharding(mesh, rules, np.ndim(v)) for k, v in host.items()}
  fns = steps_lib.make_steps(model, config, tx_g, tx_d)
  jit = lambda f: jax.jit(f, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                          donate_argnums=0)
  jitted = {name: jit(getattr(fns, name)) for name in STEP_NAMES}
  return Bench(config, model, mesh, devices, state, device_batch, jitted)


def flops_per_example(cfg, batch: int = 8) -> float:
  """FLOP per example of one iteration (D step + G step) of `cfg`'s model at `batch`, from the lowered HLO.

  Nothing is allocated: the state is abstract (`jax.eval_shape`) and nothing is compiled.
  """
  d = cfg.data
  model = mmgan.build_model(cfg.model, image_size=d.image_size, vocab_size=d.tokenizer.vocab_size,
                            max_text_len=d.max_text_len, sample_rate=d.sample_rate)
  n_audio = int(round(d.audio_seconds * d.sample_rate))
  tx_g, tx_d = state_lib.make_optimizers(cfg.optim, cfg.total_steps)
  small = mmgan.dummy_batch(model, 2, n_audio)
  key = jax.random.PRNGKey(0)
  codec = jax.eval_shape(lambda k: mmgan.init_params(model, k, small), key).get('codec')
  state = jax.eval_shape(lambda k: state_lib.init_state(model, cfg, k, small, tx_g, tx_d, codec, 1.0), key)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          mmgan.dummy_batch(model, batch, n_audio))
  fns = steps_lib.make_steps(model, cfg, tx_g, tx_d)
  total = 0.0
  for name in ('d_step', 'g_step'):
    total += _flops(jax.jit(getattr(fns, name)).lower(state, abstract).cost_analysis())
  return total / batch


# ------------------------------------------------------------------------------------------------------------
# Train steps.


def compile_steps(bench: Bench, names: Sequence[str] = STEP_NAMES) -> dict[str, dict[str, Any]]:
  """AOT-lowers and compiles each step: {name: {'compiled', lower_s, compile_s, flops_*, memory}}.

  flops_lowered is XLA's cost analysis of the lowered (pre-optimisation, whole-program) HLO: the model's FLOPs,
  what MFU is computed from. flops_compiled is the analysis of the optimised executable, per device (after SPMD
  partitioning, with what fusion and algebraic simplification changed).
  """
  out = {}
  with sharding.use_mesh(bench.mesh, bench.config.partition_rules):
    for name in names:
      t0 = time.perf_counter()
      lowered = bench.jitted[name].lower(bench.state, bench.batch)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      out[name] = dict(compiled=compiled, lower_s=t1 - t0, compile_s=t2 - t1,
                       flops_lowered=_flops(lowered.cost_analysis()),
                       flops_compiled_per_device=_flops(compiled.cost_analysis()), memory=memory(compiled))
  return out


def _step_loop(bench: Bench, compiled: dict[str, dict[str, Any]], names: Sequence[str], iterations: int,
               warmup: int, probe: Callable[[], Any] | None = None) -> dict[str, list[float]]:
  """Runs `names` in order per iteration (each call synchronised); per-name lists of the timed seconds.

  `probe` (e.g. a MatmulProbe) is called after every timed iteration, outside the timed region.
  """
  times = {n: [] for n in names}
  state = bench.state
  with sharding.use_mesh(bench.mesh, bench.config.partition_rules):
    for i in range(warmup + iterations):
      for n in names:
        t = time.perf_counter()
        state, metrics = compiled[n]['compiled'](state, bench.batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
          times[n].append(time.perf_counter() - t)
      if probe is not None and i >= warmup:
        probe()
  bench.state = state
  return times


def _rate_fields(flops: float, seconds: float, batch: int, peak: float | None, n_devices: int) -> dict[str, Any]:
  achieved = flops / seconds
  return dict(median_s=seconds, examples_per_s=batch / seconds, flops=flops, achieved_flops_per_s=achieved,
              mfu=achieved / (peak * n_devices) if peak else None)


def time_train(bench: Bench, compiled: dict[str, dict[str, Any]], *, steps: int, warmup: int, r1_steps: int,
               peak: float | None = None, probe: MatmulProbe | None = None) -> dict[str, Any]:
  """Median times of the D + G iteration and of the R1 step; examples/s, achieved FLOP/s and MFU of each.

  MFU divides by `peak` (per-device FLOP/s: a datasheet peak) or, when it is None and a `probe` is given, by
  the median rate of the probe's matmuls interleaved with the timed iterations (a CPU). The iteration time is
  the median over iterations of (D step + G step), each call synchronised.
  """
  b, n = bench.batch_size, len(bench.devices)
  t = _step_loop(bench, compiled, ('d_step', 'g_step'), steps, warmup, probe)
  t['iteration'] = [d + g for d, g in zip(t['d_step'], t['g_step'])]
  if 'd_step_r1' in compiled and r1_steps > 0:
    t.update(_step_loop(bench, compiled, ('d_step_r1',), r1_steps, min(warmup, 1), probe))
  if peak is None and probe is not None and probe.rates:
    peak = probe.median()
  flops = {k: c['flops_lowered'] for k, c in compiled.items()}
  flops['iteration'] = flops['d_step'] + flops['g_step']
  out: dict[str, Any] = {'peak_flops_per_s': peak}
  for name, times in t.items():
    out[name] = dict(_rate_fields(flops[name], statistics.median(times), b, peak, n), times_s=times)
    c = compiled.get(name)
    if c:
      out[name].update(lower_s=c['lower_s'], compile_s=c['compile_s'],
                       flops_compiled_per_device=c['flops_compiled_per_device'], memory=c['memory'])
  out['iteration']['compile_s'] = compiled['d_step']['compile_s'] + compiled['g_step']['compile_s']
  lc = bench.config.loss
  every = int(lc.r1_interval) if lc.r1_gamma > 0 and lc.r1_interval > 0 else 0
  if every and 'd_step_r1' in out:  # the mean cost of an iteration with the lazy R1 step every r1_interval
    mean_d = ((every - 1) * out['d_step']['median_s'] + out['d_step_r1']['median_s']) / every
    seconds = mean_d + out['g_step']['median_s']
    out['iteration_with_r1_amortised'] = dict(r1_interval=every, median_s=seconds, examples_per_s=b / seconds)
  return out


# ------------------------------------------------------------------------------------------------------------
# Sampling.


def _sampling_fns(model: mmgan.Model, config):
  """Jitted (encode, G, G + K-step refinement, DDIM from noise, decode) in the evaluator's form."""
  r = config.refine
  prediction = config.model.refiner.prediction
  guidance = float(r.guidance)
  alpha_bar = jnp.asarray(model.alpha_bar_refiner)

  def encode(params, batch):
    return mmgan.encode(model, params, batch, mmgan.all_present(model, batch['image'].shape[0]))['generate']

  def generate(params, z, cond):
    return mmgan.generate(model, params['generator'], z, cond, noise_key=None)

  def refined(k, params, z, cond, key):
    x = generate(params, z, cond)
    return mmgan.refine(model, params['refiner'], x, cond, key, t_start=int(r.t_start), num_steps=k,
                        prediction=prediction, guidance=guidance, num_draws=int(r.num_draws))

  def ddim(num_steps, params, cond, key):
    fn = mmgan.refiner_fn(model, params['refiner'], cond, guidance=guidance)
    shape = (cond['cond'].shape[0],) + tuple(model.latent_shape)
    return diffusion.sample(fn, shape, key, alpha_bar, num_steps=num_steps, prediction=prediction)

  def decode(codec, x):
    return mmgan.to_image(model, codec['params'], codec['scale'], x)

  return jax.jit(encode), jax.jit(generate), refined, ddim, jax.jit(decode)


def sampling_latency(bench: Bench, *, ks: Sequence[int] = (1, 2, 4), ddim_steps: int = 50, repeats: int = 5,
                     warmup: int = 1) -> dict[str, Any]:
  """Median latency of one batch: encoders, G, G + K-step SDEdit refinement, DDIM-`ddim_steps` from noise, decode.

  All with the EMA weights and the config's t_start and guidance, conditions computed once (all modalities
  present). ratio_ddim_over_g_plus_k[K] = DDIM / (G + K) in latent space (the paper's claim: refinement is
  cheap); the `_end_to_end` variant adds the encoders and the codec decoder to both sides.
  """
  model, config = bench.model, bench.config
  if model.refiner is None:
    return dict(skipped='the config has no refiner (config.model.refiner.enabled=False)')
  encode, generate, refined, ddim, decode = _sampling_fns(model, config)
  state = bench.state
  params = dict(state.params, **state.ema)
  b = bench.batch_size
  key = jax.random.PRNGKey(1)
  k_z, k_r = jax.random.split(key)
  with sharding.use_mesh(bench.mesh, bench.config.partition_rules):
    z = jax.device_put(jax.random.normal(k_z, (b, model.generator.z_dim), jnp.float32),
                       sharding.batch_sharding(bench.mesh, config.partition_rules, 2))
    out: dict[str, Any] = dict(batch=b, t_start=int(config.refine.t_start), guidance=float(config.refine.guidance),
                               ddim_steps=int(ddim_steps), ks=list(ks), config_k=int(config.refine.num_steps))
    lat = {}
    lat['encode'], _ = median_time(lambda: encode(params, bench.batch), repeats, warmup)
    cond = jax.block_until_ready(encode(params, bench.batch))
    lat['generator'], _ = median_time(lambda: generate(params, z, cond), repeats, warmup)
    x = generate(params, z, cond)
    for k in ks:
      fn = jax.jit(lambda p, zz, c, kk, k=k: refined(k, p, zz, c, kk))
      lat[f'g_plus_{k}'], _ = median_time(lambda fn=fn: fn(params, z, cond, k_r), repeats, warmup)
    fn = jax.jit(lambda p, c, kk: ddim(ddim_steps, p, c, kk))
    lat[f'ddim_{ddim_steps}'], _ = median_time(lambda: fn(params, cond, k_r), repeats, warmup)
    lat['decode'], _ = median_time(lambda: decode(state.codec, x), repeats, warmup)
  out['latency_s'] = lat
  ddim_s = lat[f'ddim_{ddim_steps}']
  edges = lat['encode'] + lat['decode']
  out['ratio_ddim_over_g_plus_k'] = {str(k): ddim_s / lat[f'g_plus_{k}'] for k in ks}
  out['ratio_ddim_over_g_plus_k_end_to_end'] = {str(k): (ddim_s + edges) / (lat[f'g_plus_{k}'] + edges)
                                                for k in ks}
  out['ms_per_example'] = {k: 1e3 * v / b for k, v in lat.items()}
  return out


# ------------------------------------------------------------------------------------------------------------
# Sharding overhead on CPU.


def largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, max(1, at_most) + 1) if n % d == 0)


def sharding_overhead(config, batch: int, num_devices: int, *, steps: int, warmup: int,
                      baseline: Bench | None = None, baseline_compiled=None) -> dict[str, Any]:
  """The D + G iteration on a 1-CPU-device mesh vs a data-parallel mesh of `num_devices` CPU devices.

  Same global batch, same process; the two are timed alternately (iteration by iteration) so load from other
  jobs hits both alike. Virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count) share the same
  cores, so the ratio is the cost of partitioning itself: smaller per-device ops, collectives, more dispatch.
  `baseline` (with its compiled steps) is reused when it already is the 1-CPU-device mesh.
  """
  cpus = jax.devices('cpu')
  n = largest_divisor(batch, min(num_devices, len(cpus)))
  if n < 2:
    return dict(skipped=f'{len(cpus)} CPU device(s) and batch {batch}: no data-parallel mesh of 2 or more '
                        'devices divides the batch (set --host_devices, e.g. 8, and an even --batch)')
  if baseline is None or baseline.devices != cpus[:1]:
    baseline = build(config, batch, cpus[:1])
    baseline_compiled = compile_steps(baseline, ('d_step', 'g_step'))
  sharded = build(config, batch, cpus[:n])
  sharded_compiled = compile_steps(sharded, ('d_step', 'g_step'))
  names = ('d_step', 'g_step')
  _step_loop(baseline, baseline_compiled, names, 0, warmup)
  _step_loop(sharded, sharded_compiled, names, 0, warmup)
  one, many = [], []
  for _ in range(steps):
    t = _step_loop(baseline, baseline_compiled, names, 1, 0)
    one.append(t['d_step'][0] + t['g_step'][0])
    t = _step_loop(sharded, sharded_compiled, names, 1, 0)
    many.append(t['d_step'][0] + t['g_step'][0])
  m1, mn = statistics.median(one), statistics.median(many)
  per_dev = sum(sharded_compiled[k]['flops_compiled_per_device'] for k in names)
  single = sum(baseline_compiled[k]['flops_compiled_per_device'] for k in names)
  return dict(devices=n, batch=batch, per_device_batch=batch // n, one_device_s=m1, n_devices_s=mn,
              ratio=mn / m1, overhead_ms_per_example=1e3 * (mn - m1) / batch, one_device_times_s=one,
              n_devices_times_s=many, compile_s_n_devices=sum(sharded_compiled[k]['compile_s'] for k in names),
              flops_per_device_ratio=per_dev * n / single if single else None)


# ------------------------------------------------------------------------------------------------------------
# Input pipeline.


def synthetic_data(cfg, n: int, root: str) -> None:
  """Points cfg.data at a freshly built synthetic dataset of n records in the real format (coco, vggsound)."""
  from mmgan_jax.data import testing  # pylint: disable=g-import-not-at-top
  try:  # the TFDS builders import TensorFlow: keep it off the GPUs/TPUs JAX owns
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except Exception:  # pylint: disable=broad-except  # TF absent, or already initialised
    pass
  if cfg.data.name == 'vggsound':
    data_dir, name = testing.make_vggsound(root, num_train=n, num_test=max(4, n // 50), clip_seconds=10.0,
                                           frame_size=256)
    cfg.data.update(data_dir=data_dir, tfds_name=name)
  elif cfg.data.name == 'coco':
    cfg.data.data_dir = testing.make_coco_captions(root, num_train=n, num_restval=1, num_val=1,
                                                   num_test=max(4, n // 50), image_size=(480, 640))
  else:
    raise ValueError(f'--synthetic supports the coco and vggsound configs, not {cfg.data.name!r}.')


def measure(cfg, threads: int, batches: int, warmup: int) -> dict[str, float]:
  """Median records/s (and CPU ms per record) of `cfg`'s training pipeline with `threads` read threads."""
  cfg.data.num_threads = threads
  data = registry.make_data(cfg.data)
  batch = cfg.data.global_batch
  for _ in range(warmup):
    next(data.train)
  times = []
  cpu0, t0 = time.process_time(), time.perf_counter()
  for _ in range(batches):
    t = time.perf_counter()
    next(data.train)
    times.append(time.perf_counter() - t)
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  median = statistics.median(times)
  return dict(threads=threads, global_batch=batch, records_per_s_median=batch / median,
              records_per_s_mean=batch * batches / wall, cpu_ms_per_record=1e3 * cpu / (batch * batches),
              bad_records=data.bad_records.count)


def pipeline_rate(config, *, batch: int, batches: int, warmup: int, synthetic: int) -> dict[str, Any]:
  """records/s of the config's input pipeline at its num_threads (a synthetic fixture for coco/vggsound when
  config.data.data_dir is empty); {'skipped': why} when the dataset is not available here."""
  cfg = copy.deepcopy(config)
  with tempfile.TemporaryDirectory() as tmp, cfg.unlocked():
    cfg.data.global_batch = int(batch)
    built = 0
    if cfg.data.name in ('coco', 'vggsound') and not cfg.data.data_dir:
      t = time.perf_counter()
      synthetic_data(cfg, synthetic, tmp)
      built = synthetic
      log.info('Built %d synthetic %s records in %.0f s.', synthetic, cfg.data.name, time.perf_counter() - t)
    try:
      row = measure(cfg, int(cfg.data.num_threads), batches, warmup)
    except registry.DatasetUnavailableError as e:
      return dict(skipped=str(e).splitlines()[0])
  row['synthetic_records'] = built
  return row


# ------------------------------------------------------------------------------------------------------------
# Profile: the main sub-computations of a train iteration, timed and counted separately.


def _timed(fn, args, repeats: int) -> dict[str, float]:
  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile()
  med, _ = median_time(lambda: compiled(*args), repeats, warmup=1)
  flops = _flops(lowered.cost_analysis())
  return dict(median_s=med, flops=flops, gflops_per_s=flops / med / 1e9)


def breakdown(bench: Bench, *, repeats: int = 3) -> dict[str, dict[str, float]]:
  """Forward and forward+backward cost of each component as the steps use it (FLOPs, median time, GFLOP/s).

  A component's forward + backward is timed as the gradient of the sum of its output w.r.t. its params (and
  input where the step differentiates through it), so the rows show where the iteration's time goes and how
  efficiently each part runs; they overlap the steps' work, they are not a partition of it.
  """
  model, config = bench.model, bench.config
  state, batch = bench.state, bench.batch
  p = state.params
  b = bench.batch_size
  r = config.refine
  k_steps = int(r.num_steps)
  pred = config.model.refiner.prediction
  key = jax.random.PRNGKey(2)
  present = mmgan.all_present(model, b)
  codec = state.codec
  rows = {}
  with sharding.use_mesh(bench.mesh, bench.config.partition_rules):
    enc_p = {k: v for k, v in p.items() if k not in ('generator', 'refiner', 'discriminator', 'text_decoder')}
    enc_fwd = lambda ep, bt: mmgan.encode(model, ep, bt, present)
    rows['encoders+fusion fwd'] = _timed(lambda ep, bt: enc_fwd(ep, bt)['generate']['cond'], (enc_p, batch),
                                         repeats)
    embed_sum = lambda ep, bt: sum(jnp.sum(e.astype(jnp.float32)) for e in enc_fwd(ep, bt)['embed'].values())
    rows['encoders+fusion fwd+bwd'] = _timed(jax.grad(embed_sum), (enc_p, batch), repeats)
    cond = jax.jit(lambda ep, bt: enc_fwd(ep, bt)['generate'])(enc_p, batch)
    rows['codec encode (real images)'] = _timed(
        lambda c, im: mmgan.to_latent(model, c['params'], c['scale'], im), (codec, batch['image']), repeats)
    z = jax.random.normal(key, (b, model.generator.z_dim), jnp.float32)
    gen = lambda gp, zz, c: mmgan.generate(model, gp, zz, c, noise_key=key)
    rows['generator fwd'] = _timed(gen, (p['generator'], z, cond), repeats)
    rows['generator fwd+bwd'] = _timed(jax.grad(lambda gp, zz, c: jnp.sum(gen(gp, zz, c))),
                                       (p['generator'], z, cond), repeats)
    x = jax.jit(gen)(p['generator'], z, cond)
    if model.refiner is not None and k_steps:
      ref = lambda rp, xx, c: mmgan.refine(model, rp, xx, c, key, t_start=int(r.t_start), num_steps=k_steps,
                                           prediction=pred, num_draws=int(r.num_draws))
      rows[f'refiner {k_steps} steps fwd'] = _timed(ref, (p['refiner'], x, cond), repeats)
      rows[f'refiner {k_steps} steps fwd+bwd (x)'] = _timed(
          jax.grad(lambda xx, rp, c: jnp.sum(ref(rp, xx, c))), (x, p['refiner'], cond), repeats)
      t = jnp.full((b,), 100, jnp.int32)
      den = lambda rp, xx, c: model.refiner.apply({'params': rp}, xx, t, c['cond'], None, c['tokens'], c['mask'])
      rows['refiner denoise fwd+bwd (params)'] = _timed(
          jax.grad(lambda rp, xx, c: jnp.sum(jnp.asarray(den(rp, xx, c), jnp.float32))), (p['refiner'], x, cond),
          repeats)
    t0 = jnp.zeros((b,), jnp.int32)
    disc = lambda dp, xx, c: mmgan.discriminate(model, dp, xx, t0, c['cond'])
    rows['discriminator fwd'] = _timed(disc, (p['discriminator'], x, cond), repeats)
    rows['discriminator fwd+bwd'] = _timed(jax.grad(lambda dp, xx, c: jnp.sum(disc(dp, xx, c))),
                                           (p['discriminator'], x, cond), repeats)
    dec = lambda cp, xx: mmgan.to_image(model, cp['params'], cp['scale'], xx)
    rows['codec decode fwd'] = _timed(dec, (codec, x), repeats)
    sem = lambda xx, pp, cp: jnp.sum(mmgan.image_embedding(model, pp, dec(cp, xx)))
    rows['decode + image encoder fwd+bwd (x)'] = _timed(jax.grad(sem), (x, p, codec), repeats)
    if model.text_decoder is not None:
      from mmgan_jax.models import text_decoder  # pylint: disable=g-import-not-at-top
      ids, _, _ = text_decoder.shift_for_teacher_forcing(batch['text_ids'], model.pad_id)
      cap = jax.jit(lambda ep, bt: enc_fwd(ep, bt)['caption'])(enc_p, batch)
      rows['text decoder fwd+bwd'] = _timed(
          jax.grad(lambda dp, c: jnp.sum(jnp.asarray(mmgan.caption_logits(model, dp, ids, c), jnp.float32))),
          (p['text_decoder'], cap), repeats)
  return rows


_RUNTIME_EVENT = re.compile(r'^(end: |\$|PjRt|Pjit|Common|Thunk|Threadpool|Handle |Wait |Allocate|Parse|Python)')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME_ID = re.compile(r'stack_frame_id=(\d+)')
_TABLE_ROW = re.compile(r'^(\d+) (.*)$')
_MOVEMENT = {'transpose', 'copy', 'bitcast', 'reshape', 'broadcast', 'slice', 'concatenate', 'pad',
             'dynamic-slice', 'dynamic-update-slice', 'parameter', 'constant', 'gather', 'scatter', 'reverse',
             'tuple', 'get-tuple-element', 'iota', 'bitcast-convert'}
_NESTING = {'while', 'call', 'conditional', 'async-start', 'async-done'}  # their inner ops are traced themselves
COMPONENTS = ('text_encoder', 'image_encoder', 'audio_encoder', 'fusion', 'generator', 'refiner', 'discriminator',
              'text_decoder', 'codec')
UPDATE, UNNAMED = 'update & losses', 'no name stack (made by XLA)'
_COMPONENT = re.compile(r'(?:^|[/(])(' + '|'.join(COMPONENTS) + r'|KLAutoencoder)(?=[/).]|$)')


def _source_frames(hlo_text: str) -> dict[str, str]:
  """{stack_frame_id: 'file.py:function'} from the source tables at the head of an HLO module's text."""
  tables: dict[str, dict[str, str]] = {}
  table = None
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      table = tables.setdefault(line, {})
      continue
    m = _TABLE_ROW.match(line) if table is not None else None
    if not m:
      if table is not None and tables.get('StackFrames') is table:
        break
      continue
    table[m.group(1)] = m.group(2)
  files, funcs, locs = (tables.get(k, {}) for k in ('FileNames', 'FunctionNames', 'FileLocations'))
  out = {}
  for frame, row in tables.get('StackFrames', {}).items():
    loc = locs.get(re.search(r'file_location_id=(\d+)', row).group(1), '')
    f = re.search(r'file_name_id=(\d+)', loc)
    fn = re.search(r'function_name_id=(\d+)', loc)
    path = files.get(f.group(1), '').strip('"') if f else ''
    out[frame] = f"{os.path.basename(path)}:{funcs.get(fn.group(1), '').strip(chr(34)) if fn else ''}"
  return out


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str, str]]:
  """{instruction name: (category, component, pass, source)} for every instruction of an optimised HLO module.

  category: convolution / matmul (dot) / reduction / data movement / elementwise (a fusion takes the heaviest
  kind inside it) / nested. component and pass come from the op's JAX name stack ('jvp(generator)' = generator
  forward, 'transpose(jvp(...))' = its backward); ops outside every module are the losses, the optimiser update,
  the EMA and the non-finite guard (UPDATE); ops XLA created without a name stack are UNNAMED. source is the
  'file.py:function' that traced the op (e.g. optax's transform.py:update_moment), where the text records it.
  """
  frames = _source_frames(hlo_text)
  opcodes: dict[str, set[str]] = {}
  instructions: list[tuple[str, str, str | None, str, str]] = []
  current = None
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      name, opcode = m.groups()
      opcodes[current].add(opcode)
      calls = _CALLS.search(line)
      op_name = _OP_NAME.search(line)
      frame = _FRAME_ID.search(line)
      instructions.append((name, opcode, calls.group(1) if calls else None, op_name.group(1) if op_name else '',
                           frames.get(frame.group(1), '') if frame else ''))
      continue
    c = _COMPUTATION.match(line)
    if c and ' = ' not in line:
      current = c.group(1)
      opcodes.setdefault(current, set())

  def category(opcode: str, calls: str | None) -> str:
    if opcode in _NESTING:
      return 'nested'
    kinds = opcodes.get(calls or '', set()) if opcode == 'fusion' else {opcode}
    if 'convolution' in kinds:
      return 'convolution'
    if 'dot' in kinds:
      return 'matmul (dot)'
    if kinds & {'reduce', 'reduce-window', 'select-and-scatter'}:
      return 'reduction'
    if kinds <= _MOVEMENT:
      return 'data movement'
    return 'elementwise'

  out = {}
  for name, opcode, calls, op_name, source in instructions:
    comp = _COMPONENT.search(op_name)
    if comp:
      component = 'codec' if comp.group(1) == 'KLAutoencoder' else comp.group(1)
      pass_ = 'backward' if 'transpose(' in op_name else 'forward'
    elif op_name:
      component, pass_ = UPDATE, ''
    else:  # an op XLA made itself (e.g. a weight-gradient conv rewritten from a transpose) carries no name
      component, pass_ = UNNAMED, ''
    out[name] = (category(opcode, calls), component, pass_, source)
  return out


def op_profile(bench: Bench, compiled: dict[str, dict[str, Any]], names: Sequence[str] = ('d_step', 'g_step'),
               iterations: int = 2, top: int = 12) -> dict[str, Any]:
  """Where the compiled iteration's time goes, per XLA op: a `jax.profiler` trace of `iterations` iterations.

  XLA:CPU (and GPU) record one trace event per executed op (thunk / kernel); their durations are summed per op,
  per category (convolution, matmul, reduction, data movement, elementwise; from the optimised HLO) and per
  component and pass (from each op's JAX name stack). Ops can run concurrently, so the summed op time can differ
  from the wall time (`op_time_over_wall`). {'skipped': why} when the backend recorded no per-op events.
  """
  index: dict[str, tuple[str, str, str, str]] = {}
  for n in names:
    index.update(hlo_ops(compiled[n]['compiled'].as_text()))
  with tempfile.TemporaryDirectory() as tmp:
    state = bench.state
    with sharding.use_mesh(bench.mesh, bench.config.partition_rules):
      for n in names:  # untraced warm-up
        state, m = compiled[n]['compiled'](state, bench.batch)
      jax.block_until_ready((state, m))
      jax.profiler.start_trace(tmp, create_perfetto_trace=True)
      t = time.perf_counter()
      try:
        for _ in range(iterations):
          for n in names:
            state, m = compiled[n]['compiled'](state, bench.batch)
            jax.block_until_ready((state, m))
      finally:
        wall = time.perf_counter() - t
        jax.profiler.stop_trace()
    bench.state = state
    paths = [os.path.join(d, f) for d, _, fs in os.walk(tmp) for f in fs if f == 'perfetto_trace.json.gz']
    if not paths:
      return dict(skipped='the profiler wrote no perfetto trace')
    with gzip.open(paths[0], 'rt') as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  per_op: dict[str, float] = {}
  edges = (1e-5, 1e-4, 1e-3, float('inf'))  # op executions by duration: < 10 us, < 100 us, < 1 ms, longer
  labels = ('under 10 us', '10-100 us', '100 us-1 ms', 'over 1 ms')
  buckets = [[0, 0.0] for _ in edges]
  for e in events:
    args = e.get('args') or {}
    name = str(args.get('hlo_op') or e.get('name', ''))  # GPU kernels name their HLO op in args['hlo_op']
    if (e.get('ph') != 'X' or 'dur' not in e or _RUNTIME_EVENT.match(name) or '::' in name  # runtime, not an op
        or index.get(name, ('',))[0] == 'nested'):
      continue
    sec = float(e['dur']) * 1e-6
    per_op[name] = per_op.get(name, 0.0) + sec
    i = next(j for j, edge in enumerate(edges) if sec < edge)
    buckets[i][0] += 1
    buckets[i][1] += sec
  if not per_op:
    return dict(skipped='the backend recorded no per-op trace events')
  total = sum(per_op.values())
  cats: dict[str, float] = {}
  comps: dict[str, float] = {}
  update: dict[str, float] = {}  # the UPDATE component's time by the source function that traced its ops
  sources: dict[str, float] = {}  # all ops' time by the source function (e.g. flax's GroupNorm statistics)
  unknown = ('unattributed', 'unattributed', '', '')
  for name, sec in per_op.items():
    cat, comp, pass_, source = index.get(name, unknown)
    cats[cat] = cats.get(cat, 0.0) + sec
    key = f'{comp} {pass_}'.strip()
    comps[key] = comps.get(key, 0.0) + sec
    sources[source or '?'] = sources.get(source or '?', 0.0) + sec
    if comp == UPDATE:
      update[source or '?'] = update.get(source or '?', 0.0) + sec
  share = lambda d: {k: dict(s_per_iteration=v / iterations, fraction=v / total)
                     for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
  ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
  return dict(iterations=iterations, wall_s_per_iteration=wall / iterations, op_time_over_wall=total / wall,
              num_ops=len(per_op), op_executions_per_iteration=sum(c for c, _ in buckets) / iterations,
              by_duration={k: dict(executions_per_iteration=c / iterations, fraction=sec / total)
                           for k, (c, sec) in zip(labels, buckets)},
              categories=share(cats), components=share(comps),
              update_sources=dict(list(share(update).items())[:8]),
              sources=dict(list(share(sources).items())[:12]),
              top_ops=[dict(name=k, category=index.get(k, unknown)[0],
                            component=' '.join(index.get(k, unknown)[1:3]).strip(),
                            source=index.get(k, unknown)[3],
                            s_per_iteration=v / iterations, fraction=v / total) for k, v in ops])


def conv_probe(shapes: Sequence[tuple[int, int, int, int]], dtype, repeats: int = 5) -> list[dict[str, Any]]:
  """GFLOP/s of one 3x3 'SAME' conv (batch, side, C_in -> C_out) per shape, forward and forward + backward (the
  gradients w.r.t. input and kernel, 3x the forward FLOPs): how fast XLA runs the model's conv sizes alone."""
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  fwd = jax.jit(conv)
  fwd_bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w).astype(jnp.float32)), argnums=(0, 1)))
  out = []
  for b, side, cin, cout in shapes:
    x = jax.random.normal(jax.random.PRNGKey(0), (b, side, side, cin), dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, cin, cout), dtype)
    flops = 2.0 * b * side * side * 9 * cin * cout
    t_f, _ = median_time(lambda: fwd(x, w), repeats, warmup=1)
    t_fb, _ = median_time(lambda: fwd_bwd(x, w), repeats, warmup=1)
    out.append(dict(batch=b, side=side, cin=cin, cout=cout, dtype=jnp.dtype(dtype).name, fwd_s=t_f,
                    fwd_bwd_s=t_fb, gflops_per_s_fwd=flops / t_f / 1e9,
                    gflops_per_s_fwd_bwd=3 * flops / t_fb / 1e9))
  return out


# ------------------------------------------------------------------------------------------------------------
# The whole benchmark.

SECTIONS = ('train', 'pipeline', 'sampling', 'sharding', 'breakdown')
FLOPS_SOURCE = ("XLA cost analysis of the lowered, pre-optimisation HLO of the whole program "
                "(jax.jit(step).lower(...).cost_analysis()['flops']); MFU = that / time / (devices x peak). The "
                "compiled executable's per-device count is kept alongside (flops_compiled_per_device).")


def default_devices(num: int = 0) -> list[Any]:
  """`num` devices of the default backend; 0: all accelerators, or one device on a CPU (virtual CPU devices share
  the same cores, so one device gets all of them)."""
  devices = jax.devices()
  n = num or (1 if devices[0].platform == 'cpu' else len(devices))
  if n > len(devices):
    raise ValueError(f'{n} devices asked for, but this machine has {len(devices)} {devices[0].platform} '
                     'device(s).')
  return devices[:n]


def probe_shapes(bench: Bench) -> list[tuple[int, int, int, int]]:
  """Conv sizes the model runs: G's widest and a middle level on the latent grid, and the codec's first level."""
  m, c, b = bench.model, bench.config.model, bench.batch_size
  side = m.latent_shape[0]
  g = list(c.generator.channels)
  shapes = [(b, side, g[-1], g[-1]), (b, max(4, side // 4), g[1], g[1])]
  if c.codec.type == 'kl':
    shapes.append((b, m.image_shape[0], c.codec.channels[0], c.codec.channels[0]))
  return shapes


def benchmark(config, *, config_name: str, batch: int = 0, devices: Sequence[Any] | None = None, steps: int = 10,
              warmup: int = 2, r1_steps: int = 3, ks: Sequence[int] = (1, 2, 4), ddim_steps: int = 50,
              sample_repeats: int = 5, sections: Sequence[str] = SECTIONS, host_devices: int = 8,
              sharding_steps: int = 0, data_batch: int = 64, data_batches: int = 10, synthetic: int = 128,
              profile_repeats: int = 2,
              say: Callable[[str], Any] = lambda msg: None) -> dict[str, Any]:
  """Every measurement of launch/benchmark.py for `config` (train is always measured); the JSON-able result.

  Raises:
    ValueError (config_validation.ConfigError among them): the config cannot run at this batch here.
  """
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise ValueError(f'unknown sections {sorted(unknown)}; choose from {", ".join(SECTIONS)}.')
  sections = set(sections) | {'train'}
  devices = list(devices) if devices is not None else default_devices()
  platform = devices[0].platform
  batch = int(batch or config.data.global_batch)
  say(f'Building {config_name} at batch {batch} on {len(devices)} {devices[0].device_kind} device(s)...')
  bench = build(config, batch, devices)
  result: dict[str, Any] = {'flops_source': FLOPS_SOURCE}
  probe = None
  if platform == 'cpu':
    probe = MatmulProbe(2048, jnp.float32, devices[0])
    bf16 = matmul_rate(2048, jnp.bfloat16, repeats=5, device=devices[0])
    result['peak'] = dict(source='measured dense f32 2048x2048 matmul on this CPU (median of calls interleaved '
                                 'with the timed train iterations)', flops_per_s=None,
                          cpu_matmul_bf16_flops_per_s=bf16)
  else:
    found = peak_flops(devices[0].device_kind)
    result['peak'] = (dict(source=f'{found[0]} dense bf16 datasheet peak', flops_per_s=found[1]) if found else
                      dict(source=f'unknown device kind {devices[0].device_kind!r}: MFU not computed',
                           flops_per_s=None))

  say('Compiling the train steps...')
  names = ('d_step', 'g_step') + (('d_step_r1',) if r1_steps else ())
  compiled = compile_steps(bench, names)
  say('Timing the train steps...')
  result['train'] = time_train(bench, compiled, steps=steps, warmup=warmup, r1_steps=r1_steps,
                               peak=result['peak']['flops_per_s'], probe=probe)
  if probe is not None:
    result['peak'].update(flops_per_s=probe.median(), cpu_matmul_f32_flops_per_s=probe.median(),
                          cpu_matmul_f32_rates=probe.rates)
  result['memory_peak_estimate_bytes'] = total_memory_peak(result['train'])
  result['device_memory_peak_bytes'] = device_memory_peak(devices[0])
  consumption = result['train']['iteration']['examples_per_s']

  if 'pipeline' in sections:
    say('Timing the input pipeline...')
    result['pipeline'] = pipeline_rate(config, batch=data_batch, batches=data_batches, warmup=2,
                                       synthetic=synthetic)
    if 'records_per_s_mean' in result['pipeline']:  # sustained (total records / total time): prefetching
      result['pipeline_headroom'] = result['pipeline']['records_per_s_mean'] / consumption  # cannot inflate it
  if 'sampling' in sections:
    say('Timing sampling...')
    result['sampling'] = sampling_latency(bench, ks=ks, ddim_steps=ddim_steps, repeats=sample_repeats)
  if 'sharding' in sections:
    say('Timing the sharded iteration...')
    result['sharding'] = sharding_overhead(config, batch, host_devices or len(jax.devices('cpu')),
                                           steps=sharding_steps or steps, warmup=1, baseline=bench,
                                           baseline_compiled=compiled)
  if 'breakdown' in sections:
    say('Profiling the sub-computations...')
    result['breakdown'] = breakdown(bench, repeats=profile_repeats)
    result['op_profile'] = op_profile(bench, compiled, iterations=profile_repeats)
    if platform == 'cpu':
      result['conv_probe'] = conv_probe(probe_shapes(bench), jnp.dtype(config.model.dtype))
  result['machine'] = machine_info(config_name, config, batch, devices)
  result['machine']['latent_shape'] = list(bench.model.latent_shape)
  result['settings'] = dict(steps=steps, warmup=warmup, r1_steps=r1_steps, sample_repeats=sample_repeats,
                            host_devices=host_devices, sections=sorted(sections), profile_repeats=profile_repeats)
  return result


# ------------------------------------------------------------------------------------------------------------
# Readable output.


def _fmt_s(s: float | None) -> str:
  if s is None:
    return '-'
  return f'{s * 1e3:.1f} ms' if s < 1 else f'{s:.2f} s'


def _fmt_b(n: int | None) -> str:
  return '-' if n is None else f'{n / 2 ** 20:.1f} MiB'


def step_rows(train: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
  """(name, timing) of the train programs a result holds, in report order."""
  for name in ('iteration', 'd_step', 'g_step', 'd_step_r1'):
    if train.get(name):
      yield name, train[name]


def format_table(result: dict[str, Any]) -> str:
  """A plain-text summary of a benchmark result (what launch/benchmark.py prints)."""
  m = result['machine']
  lines = [f"{m['config']}  batch {m['batch']}  {m['dtype']}  on {m['devices_used']} x {m['device_kind']} "
           f"({m['platform']}; host {m['cpu_model']}, {m['cpus_available']} cores; jax {m['jax']})"]
  peak = result.get('peak', {})
  lines.append(f"MFU denominator: {peak.get('source', '-')}: {peak.get('flops_per_s', 0) / 1e9:.1f} GFLOP/s "
               'per device')
  tr = result.get('train', {})
  if tr:
    lines.append(f"{'train':<26}{'median':>11}{'ex/s':>10}{'GFLOP':>12}{'GFLOP/s':>11}{'MFU':>8}"
                 f"{'compile':>10}{'peak mem':>12}")
    for name, r in step_rows(tr):
      mfu = '-' if r.get('mfu') is None else f"{100 * r['mfu']:.1f}%"
      mem = _fmt_b(r.get('memory', {}).get('peak_estimate')) if r.get('memory') else '-'
      lines.append(f"  {name:<24}{_fmt_s(r['median_s']):>11}{r['examples_per_s']:>10.2f}"
                   f"{r['flops'] / 1e9:>12.1f}{r['achieved_flops_per_s'] / 1e9:>11.1f}{mfu:>8}"
                   f"{_fmt_s(r.get('compile_s')):>10}{mem:>12}")
    a = tr.get('iteration_with_r1_amortised')
    if a:
      lines.append(f"  with R1 every {a['r1_interval']}: {_fmt_s(a['median_s'])} per iteration, "
                   f"{a['examples_per_s']:.2f} examples/s")
  if result.get('device_memory_peak_bytes') is not None:
    lines.append(f"device allocator peak: {_fmt_b(result['device_memory_peak_bytes'])}")
  p = result.get('pipeline', {})
  if p:
    if 'skipped' in p:
      lines.append(f"input pipeline: not measured ({p['skipped']})")
    else:
      lines.append(f"input pipeline: {p['records_per_s_mean']:.0f} records/s ({p['threads']} threads"
                   f"{', synthetic' if p.get('synthetic_records') else ''}); headroom "
                   f"{result.get('pipeline_headroom', float('nan')):.1f}x the train step's consumption")
  s = result.get('sampling', {})
  if s and 'skipped' not in s:
    lat = s['latency_s']
    lines.append(f"sampling, batch {s['batch']} (t_start {s['t_start']}):  encode {_fmt_s(lat['encode'])}  "
                 f"G {_fmt_s(lat['generator'])}  decode {_fmt_s(lat['decode'])}")
    for k in s['ks']:
      lines.append(f"  G + {k} refinement step(s): {_fmt_s(lat[f'g_plus_{k}'])};  DDIM-{s['ddim_steps']} / "
                   f"(G + {k}) = {s['ratio_ddim_over_g_plus_k'][str(k)]:.1f}x "
                   f"(end to end {s['ratio_ddim_over_g_plus_k_end_to_end'][str(k)]:.1f}x)")
    lines.append(f"  DDIM-{s['ddim_steps']} from noise: {_fmt_s(lat['ddim_' + str(s['ddim_steps'])])}")
  elif s:
    lines.append(f"sampling: not measured ({s['skipped']})")
  sh = result.get('sharding', {})
  if sh and 'skipped' not in sh:
    lines.append(f"sharding on CPU: iteration at batch {sh['batch']} on 1 device {_fmt_s(sh['one_device_s'])}, "
                 f"on {sh['devices']} devices {_fmt_s(sh['n_devices_s'])}: ratio {sh['ratio']:.2f} "
                 f"({sh['overhead_ms_per_example']:+.1f} ms per example)")
  elif sh:
    lines.append(f"sharding on CPU: not measured ({sh['skipped']})")
  op = result.get('op_profile', {})
  if op and 'skipped' not in op:
    cats = ', '.join(f"{k} {100 * v['fraction']:.0f}%" for k, v in op['categories'].items())
    comps = ', '.join(f"{k} {100 * v['fraction']:.0f}%" for k, v in list(op['components'].items())[:6])
    short = op['by_duration']
    lines.append(f"per-op profile: {op['op_executions_per_iteration']:.0f} op executions per iteration, summed op "
                 f"time {100 * op['op_time_over_wall']:.0f}% of the wall time; "
                 f"{100 * (short['under 10 us']['fraction'] + short['10-100 us']['fraction']):.0f}% of op time "
                 'in ops shorter than 100 us')
    lines.append(f'  by kind: {cats}')
    lines.append(f'  by component: {comps}')
  bd = result.get('breakdown', {})
  if bd:
    lines.append(f"{'profile (sub-computations)':<44}{'median':>11}{'GFLOP':>11}{'GFLOP/s':>10}")
    for name, r in bd.items():
      lines.append(f"  {name:<42}{_fmt_s(r['median_s']):>11}{r['flops'] / 1e9:>11.2f}{r['gflops_per_s']:>10.1f}")
  for c in result.get('conv_probe', []):
    lines.append(f"  3x3 conv {c['batch']}x{c['side']}^2x{c['cin']}->{c['cout']} {c['dtype']}: "
                 f"{c['gflops_per_s_fwd']:.1f} GFLOP/s forward, {c['gflops_per_s_fwd_bwd']:.1f} forward+backward")
  return '\n'.join(lines)


def total_memory_peak(train: dict[str, Any]) -> int | None:
  peaks = [r['memory'].get('peak_estimate') for r in train.values() if isinstance(r, dict) and r.get('memory')]
  return max(peaks) if peaks else None
