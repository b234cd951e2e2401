"""Tests for the FID Inception port (`mmgan_jax.evaluation.inception`) and its converter.

The reference is ../shared/fid: the TorchScript FID Inception weights as an npz and the pool3 features that
TorchScript network computes on four 299x299 inputs.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

from mmgan_jax.evaluation import convert_inception, inception

FID_DIR = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'fid'
WEIGHTS = FID_DIR / 'inception_2015_12_05_fid.npz'
REFERENCE = FID_DIR / 'inception_reference_features.npz'


def _need_shared():
  if not (WEIGHTS.is_file() and REFERENCE.is_file()):
    pytest.skip(f'FID reference data not found in {FID_DIR} (it ships with the shared project folder).')


@pytest.fixture(scope='module')
def arrays():
  _need_shared()
  with np.load(WEIGHTS, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope='module')
def reference():
  _need_shared()
  with np.load(REFERENCE, allow_pickle=False) as data:
    return data['inputs_nchw'].transpose(0, 2, 3, 1).copy(), data['features']


@pytest.fixture(scope='module')
def reference_features(arrays, reference):
  """Features of the reference inputs, one batch of 4 (compiled once, reused by the tests below)."""
  extract = inception.FeatureExtractor(inception.params_from_arrays(arrays), batch_size=4)
  return extract(reference[0])


# ---------------------------------------------------------------------------------------------------------------
# (a) The port reproduces the TorchScript network.

def test_matches_torchscript_reference(reference, reference_features):
  _, want = reference
  assert reference_features.shape == (4, 2048) and reference_features.dtype == np.float32
  err = np.abs(reference_features - want).max()
  assert err < 1e-4, f'max abs error vs TorchScript features: {err:.3g}'
  # Not trivially satisfied: the four images give clearly different features.
  assert np.abs(want[0] - want[2]).max() > 0.5


def test_load_params_from_file(reference, reference_features):
  _need_shared()
  extract = inception.FeatureExtractor.from_npz(WEIGHTS, batch_size=4)
  np.testing.assert_array_equal(extract(reference[0]), reference_features)


# ---------------------------------------------------------------------------------------------------------------
# (b) Loader errors.

def test_missing_file_says_where_to_get_weights(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    inception.load_params(tmp_path / 'nope.npz')
  msg = str(e.value)
  assert 'nope.npz' in msg and 'convert_inception' in msg and 'pt_inception-2015-12-05-6726825d.pth' in msg


def test_missing_and_unexpected_keys_are_listed(arrays, tmp_path):
  bad = dict(arrays)
  del bad['net.layers.mixed_9.tower_mixed_conv_1.mean']
  bad['net.layers.extra.weight'] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError) as e:
    inception.params_from_arrays(bad)
  msg = str(e.value)
  assert '1 missing: net.layers.mixed_9.tower_mixed_conv_1.mean' in msg
  assert '1 unexpected: net.layers.extra.weight' in msg
  # A file with almost nothing in it: every missing array is counted.
  path = tmp_path / 'tiny.npz'
  np.savez(path, **{'net.layers.conv.weight': arrays['net.layers.conv.weight']})
  with pytest.raises(ValueError, match=r'375 missing'):
    inception.load_params(path)


def test_wrong_shape_is_listed(arrays):
  bad = dict(arrays)
  name = 'net.layers.mixed_4.tower.conv_1.weight'
  bad[name] = bad[name].transpose(0, 1, 3, 2)
  with pytest.raises(ValueError) as e:
    inception.params_from_arrays(bad)
  assert 'net.layers.mixed_4.tower.conv_1.weight: (128, 128, 7, 1) (expected (128, 128, 1, 7))' in str(e.value)


def test_nan_weights_and_unreadable_files_are_rejected(arrays, tmp_path):
  bad = dict(arrays)
  bad['net.layers.conv_3.var'] = np.full_like(bad['net.layers.conv_3.var'], np.nan)
  with pytest.raises(ValueError, match='NaN/Inf.*conv_3.var'):
    inception.params_from_arrays(bad)
  # Each damaged file is named with what is wrong with it (np.load calls every one of them "pickled data").
  junk = tmp_path / 'junk.npz'
  junk.write_bytes(b'not a zip file')
  with pytest.raises(ValueError, match=r"junk.npz is not an .npz archive \(it starts with b'not a zi'\)"):
    inception.load_params(junk)
  (tmp_path / 'empty.npz').write_bytes(b'')
  with pytest.raises(ValueError, match='empty.npz is empty'):
    inception.load_params(tmp_path / 'empty.npz')
  truncated = tmp_path / 'truncated.npz'
  np.savez(truncated, w=np.ones((64, 64), np.float32))
  truncated.write_bytes(truncated.read_bytes()[:500])
  with pytest.raises(ValueError, match='truncated.npz is truncated or corrupt'):
    inception.load_params(truncated)
  pickled = tmp_path / 'pickled.npz'
  np.savez(pickled, **{'net.layers.conv.weight': np.array([{'a': 1}], dtype=object)})
  with pytest.raises(ValueError, match='holds Python objects'):
    inception.load_params(pickled)


# ---------------------------------------------------------------------------------------------------------------
# (c) Preprocessing.

def _torch_bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
  """The (n_out, n_in) matrix of torch F.interpolate(mode='bilinear', align_corners=False), from its definition."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    m[i, i0] += 1 - lam
    m[i, i1] += lam
  return m


def test_preprocess_shape_range_and_dtypes():
  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, size=(2, 40, 56, 3), dtype=np.uint8)
  x = np.asarray(inception.preprocess(u8))
  assert x.shape == (2, 299, 299, 3) and x.dtype == np.float32
  assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.9 and x.max() > 0.9
  as_float = np.asarray(inception.preprocess(u8.astype(np.float32) / 127.5 - 1.0))
  np.testing.assert_allclose(x, as_float, atol=1e-6)
  const = np.asarray(inception.preprocess(np.full((1, 64, 64, 3), 0.25, np.float32)))
  np.testing.assert_allclose(const, 0.25, atol=1e-6)
  same = rng.uniform(-1, 1, size=(1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(inception.preprocess(same)), same)
  with pytest.raises(ValueError, match=r'\(N, H, W, 3\)'):
    inception.preprocess(np.zeros((1, 32, 32, 1), np.float32))


@pytest.mark.parametrize('size', [(37, 50), (512, 333)])  # up- and down-sampling
def test_preprocess_is_torch_bilinear_without_antialias(size):
  h, w = size
  x = np.random.default_rng(1).uniform(-1, 1, size=(1, h, w, 3)).astype(np.float32)
  rows, cols = _torch_bilinear_1d(h, 299), _torch_bilinear_1d(w, 299)
  want = np.einsum('bw,awc->abc', cols, np.einsum('ah,hwc->awc', rows, x[0].astype(np.float64)))
  got = np.asarray(inception.preprocess(x))[0]
  # Tolerance: both resizers place source coordinates in float32 (|error| <= ~size * 2**-24 per weight);
  # anti-aliasing or align_corners=True would differ by ~0.1 on this noise.
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.abs(got - want).mean() < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# (d) Converter round trip (no torch needed: a pytorch-fid state dict is faked from the npz).

# torchvision / pytorch-fid unit names in TorchScript order, written out independently of the converter.
_TORCH_A = ['branch1x1', 'branch5x5_1', 'branch5x5_2', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3',
            'branch_pool']
_TORCH_B = ['branch3x3', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3']
_TORCH_C = ['branch1x1', 'branch7x7_1', 'branch7x7_2', 'branch7x7_3', 'branch7x7dbl_1', 'branch7x7dbl_2',
            'branch7x7dbl_3', 'branch7x7dbl_4', 'branch7x7dbl_5', 'branch_pool']
_TORCH_D = ['branch3x3_1', 'branch3x3_2', 'branch7x7x3_1', 'branch7x7x3_2', 'branch7x7x3_3', 'branch7x7x3_4']
_TORCH_E = ['branch1x1', 'branch3x3_1', 'branch3x3_2a', 'branch3x3_2b', 'branch3x3dbl_1', 'branch3x3dbl_2',
            'branch3x3dbl_3a', 'branch3x3dbl_3b', 'branch_pool']
_TS_A = ['conv', 'tower.conv', 'tower.conv_1', 'tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2', 'tower_2.conv']
_TS_B = ['conv', 'tower.conv', 'tower.conv_1', 'tower.conv_2']
_TS_C = ['conv', 'tower.conv', 'tower.conv_1', 'tower.conv_2', 'tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2',
         'tower_1.conv_3', 'tower_1.conv_4', 'tower_2.conv']
_TS_D = ['tower.conv', 'tower.conv_1', 'tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2', 'tower_1.conv_3']
_TS_E = ['conv', 'tower_conv', 'tower_mixed_conv', 'tower_mixed_conv_1', 'tower_1_conv', 'tower_1_conv_1',
         'tower_1_mixed_conv', 'tower_1_mixed_conv_1', 'tower_2_conv']


def _inverse_map() -> dict[str, str]:
  """npz unit -> pytorch-fid unit."""
  m = dict(zip(['conv', 'conv_1', 'conv_2', 'conv_3', 'conv_4'],
               ['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3']))
  blocks = [('mixed', 'Mixed_5b', _TS_A, _TORCH_A), ('mixed_1', 'Mixed_5c', _TS_A, _TORCH_A),
            ('mixed_2', 'Mixed_5d', _TS_A, _TORCH_A), ('mixed_3', 'Mixed_6a', _TS_B, _TORCH_B)]
  blocks += [(f'mixed_{4 + i}', f'Mixed_6{c}', _TS_C, _TORCH_C) for i, c in enumerate('bcde')]
  blocks += [('mixed_8', 'Mixed_7a', _TS_D, _TORCH_D), ('mixed_9', 'Mixed_7b', _TS_E, _TORCH_E),
             ('mixed_10', 'Mixed_7c', _TS_E, _TORCH_E)]
  for ts_block, torch_block, ts_units, torch_units in blocks:
    m.update({f'{ts_block}.{a}': f'{torch_block}.{b}' for a, b in zip(ts_units, torch_units)})
  return {'net.layers.' + k: v for k, v in m.items()}


def _fake_pytorch_fid_state_dict(arrays) -> dict[str, np.ndarray]:
  """The state dict pytorch-fid would hold for these weights, with random BN gammas (some negative) unfolded."""
  rng = np.random.default_rng(0)
  sd = {}
  for ts, pt in _inverse_map().items():
    w = arrays[f'{ts}.weight'].astype(np.float64)
    gamma = rng.uniform(0.5, 2.0, size=w.shape[0]) * rng.choice([-1.0, 1.0], size=w.shape[0])
    sd[f'{pt}.conv.weight'] = (w / gamma[:, None, None, None]).astype(np.float32)
    sd[f'{pt}.bn.weight'] = gamma.astype(np.float32)
    sd[f'{pt}.bn.bias'] = arrays[f'{ts}.beta']
    sd[f'{pt}.bn.running_mean'] = (arrays[f'{ts}.mean'] / gamma).astype(np.float32)
    sd[f'{pt}.bn.running_var'] = arrays[f'{ts}.var']
    sd[f'{pt}.bn.num_batches_tracked'] = np.zeros((), np.int64)
  sd['fc.weight'] = rng.normal(size=(1008, 2048)).astype(np.float32)
  sd['fc.bias'] = np.zeros((1008,), np.float32)
  return sd


def test_fake_state_dict_has_torchvision_shapes(arrays):
  sd = _fake_pytorch_fid_state_dict(arrays)
  assert len(_inverse_map()) == 94 and len(sd) == 94 * 6 + 2
  # Kernel shapes as torchvision's Inception3 / pytorch-fid define them (the asymmetric kernels in particular).
  expect = {'Conv2d_1a_3x3': (32, 3, 3, 3), 'Conv2d_4a_3x3': (192, 80, 3, 3),
            'Mixed_5b.branch5x5_2': (64, 48, 5, 5),
            'Mixed_5b.branch_pool': (32, 192, 1, 1), 'Mixed_5d.branch_pool': (64, 288, 1, 1),
            'Mixed_6a.branch3x3': (384, 288, 3, 3), 'Mixed_6b.branch7x7_2': (128, 128, 1, 7),
            'Mixed_6b.branch7x7_3': (192, 128, 7, 1), 'Mixed_6c.branch7x7dbl_2': (160, 160, 7, 1),
            'Mixed_6e.branch7x7dbl_5': (192, 192, 1, 7), 'Mixed_7a.branch3x3_2': (320, 192, 3, 3),
            'Mixed_7a.branch7x7x3_2': (192, 192, 1, 7), 'Mixed_7b.branch3x3_2a': (384, 384, 1, 3),
            'Mixed_7b.branch3x3_2b': (384, 384, 3, 1), 'Mixed_7c.branch3x3dbl_2': (384, 448, 3, 3),
            'Mixed_7c.branch3x3dbl_3b': (384, 384, 3, 1), 'Mixed_7c.branch_pool': (192, 2048, 1, 1)}
  for name, shape in expect.items():
    assert sd[f'{name}.conv.weight'].shape == shape, name


def test_converter_round_trip(arrays, reference, reference_features):
  sd = _fake_pytorch_fid_state_dict(arrays)
  converted = convert_inception.convert_state_dict(sd)
  assert set(converted) == set(arrays)
  for k, v in converted.items():
    np.testing.assert_allclose(v, arrays[k], rtol=1e-5, atol=1e-7, err_msg=k)
  features = inception.FeatureExtractor(inception.params_from_arrays(converted), batch_size=4)(reference[0])
  assert np.abs(features - reference[1]).max() < 1e-4
  np.testing.assert_allclose(features, reference_features, atol=1e-5)


def test_converter_rejects_wrong_state_dicts(arrays):
  sd = _fake_pytorch_fid_state_dict(arrays)
  del sd['Mixed_7b.branch3x3_2a.bn.running_var']
  sd['Mixed_5b.branch9x9.conv.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(ValueError) as e:
    convert_inception.convert_state_dict(sd)
  msg = str(e.value)
  assert 'Mixed_7b.branch3x3_2a.bn.running_var' in msg and 'Mixed_5b.branch9x9.conv.weight' in msg


def test_converter_cli_without_torch(arrays, tmp_path, monkeypatch):
  sd = _fake_pytorch_fid_state_dict(arrays)
  monkeypatch.setattr(convert_inception, 'load_torch_state_dict', lambda path: sd)
  out = tmp_path / 'sub' / 'converted.npz'
  assert convert_inception.main(['--pth', 'pt_inception-2015-12-05-6726825d.pth', '--out', str(out)]) == 0
  params = inception.load_params(out)
  np.testing.assert_allclose(params['mixed_10']['tower_2_conv']['kernel'],
                             arrays['net.layers.mixed_10.tower_2_conv.weight'].transpose(2, 3, 1, 0), rtol=1e-5)


def test_converter_explains_missing_torch(tmp_path, monkeypatch):
  pth = tmp_path / 'w.pth'
  pth.write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` fail
  with pytest.raises(ImportError, match='pip install torch'):
    convert_inception.load_torch_state_dict(pth)
  with pytest.raises(FileNotFoundError, match='pytorch-fid'):
    convert_inception.load_torch_state_dict(tmp_path / 'absent.pth')


# ---------------------------------------------------------------------------------------------------------------
# (e) Batching and streaming.

def test_uneven_batches_match_one_batch(arrays, reference, reference_features):
  params = inception.params_from_arrays(arrays)
  extract = inception.FeatureExtractor(params, batch_size=3)  # 4 images: batches of 3 and 1 (+2 padding)
  np.testing.assert_allclose(extract(reference[0]), reference_features, atol=1e-5)
  x = reference[0]
  # Pipelined small batches, an empty one, one larger than batch_size (goes through __call__), a last small one.
  streamed = list(extract.iter_features(iter([x[:1], x[1:4], x[:0], x, x[3:]])))
  assert [s.shape for s in streamed] == [(1, 2048), (3, 2048), (0, 2048), (4, 2048), (1, 2048)]
  want = np.concatenate([reference_features, reference_features, reference_features[3:]])
  np.testing.assert_allclose(np.concatenate(streamed), want, atol=1e-5)
  assert extract(reference[0][:0]).shape == (0, 2048)


def test_uint8_small_images_and_input_checks(arrays, reference):
  params = inception.params_from_arrays(arrays)
  u8 = np.random.default_rng(2).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  feats = inception.FeatureExtractor(params, batch_size=2)(u8)
  assert feats.shape == (3, 2048) and np.all(np.isfinite(feats)) and np.all(feats >= 0)
  as_float = inception.FeatureExtractor(params, batch_size=2)(u8.astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(feats, as_float, atol=1e-4)
  extract = inception.FeatureExtractor(params, batch_size=2)
  with pytest.raises(ValueError, match=r'in \[-1, 1\]'):
    extract(u8.astype(np.float32))
  with pytest.raises(ValueError, match='NaN'):
    extract(np.full((1, 32, 32, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match=r'\(N, H, W, 3\)'):
    extract(np.zeros((2, 32, 32), np.uint8))
  with pytest.raises(ValueError, match='batch_size'):
    inception.FeatureExtractor(params, batch_size=0)
