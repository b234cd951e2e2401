"""The VGGSound TFDS builder on a fixture made here: tiny clips with known tones and colours, plus bad ones.

Properties checked: exactly the good clips are written, each in its split with its label; the audio is int16 of
exactly sample_rate * clip_seconds samples whose dominant frequency is the encoded tone (so resampling from
44.1/22.05/48/8 kHz, stereo or mono, is right), zero-padded only where the clip was short; the frame is the one
nearest the middle of the window (a per-frame grey ramp tells which), short side = frame_size (never upscaled),
colour as encoded; every bad clip is reported with its reason; the prepare CLI builds the same records (with
threads) and stops with exit status 2 and one line on a missing manual dir or index.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmgan_jax.data.vggsound import vggsound_dataset_builder as vgg

SR, CLIP_S, MIN_S, FRAME = 16000, 2.0, 1.5, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(REPO, 'launch', 'prepare_vggsound.py')

# clip -> (split, label); GOOD clips carry what the test expects to read back.
GOOD = {
    # clip: (split, label, tone Hz, audio seconds in the file, expected (w, h), expected grey level or RGB)
    'aaaaaaaaaaa_000010': ('train', 'dog barking', 440.0, 2.4, (43, 32), 100),  # mp4 aac 44.1k stereo, 10 fps ramp
    'bbbbbbbbbbb_000000': ('train', 'people, crowd', 1000.0, 1.75, (43, 32), 90),  # mkv pcm 22.05k mono, short
    'ccccccccccc_000030': ('train', 'rain', 300.0, 2.0, (40, 30), (0, 0, 255)),  # extracted, 8k stereo, small jpg
    'ddddddddddd_000100': ('test', 'engine', 660.0, 2.0, (32, 43), (255, 0, 0)),  # webm vp8+opus 48k, portrait
    'eeeeeeeeeee_000000': ('test', 'bird, chirping', 523.0, 2.0, (43, 32), (255, 255, 0)),  # extracted 48k mono
}
BAD = {
    'missing0000_000000': ('train', 'missing', vgg.MISSING),
    'shortaudio0_000005': ('train', 'short', vgg.AUDIO_TOO_SHORT),
    'noaudio0000_000000': ('train', 'silent film', vgg.NO_AUDIO_STREAM),
    'truncmp4000_000000': ('train', 'cut download', vgg.UNDECODABLE),
    'garbage0000_000000': ('test', 'garbage', vgg.UNDECODABLE),
    'audioonly00_000000': ('test', 'radio', vgg.NO_VIDEO_FRAME),
    'badjpg00000_000000': ('test', 'broken jpg', vgg.BAD_IMAGE),
    'badwav00000_000000': ('test', 'broken wav', vgg.UNDECODABLE),
    'wavonly0000_000000': ('test', 'no frame', vgg.MISSING),
}


def _tone(freq: float, seconds: float, sr: int) -> np.ndarray:
  t = np.arange(int(round(seconds * sr))) / sr
  return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_video(path, *, size=(64, 48), fps=10, video_seconds=2.0, colour=None, audio=None, vcodec='mpeg4',
                 acodec='aac', sr=44100, layout='stereo'):
  """A tiny clip; frame i is grey level 10*i unless `colour`; `audio` (mono float) is copied to every channel."""
  with av.open(str(path), 'w') as c:
    vs = None
    if video_seconds:
      vs = c.add_stream(vcodec, rate=fps)
      vs.width, vs.height = size
      vs.pix_fmt = 'yuv420p'
    if audio is not None:
      a = c.add_stream(acodec, rate=sr)
      a.layout = layout
      fmt = a.codec_context.format.name
      nch = 2 if layout == 'stereo' else 1
      step = {'aac': 1024, 'libopus': 960}.get(acodec, 1024)
      for s in range(0, audio.shape[0], step):
        chunk = audio[s:s + step]
        if fmt == 'fltp':
          arr = np.tile(chunk[None], (nch, 1))
        elif fmt == 'flt':
          arr = np.repeat(chunk, nch)[None]
        else:  # s16 packed
          arr = np.repeat((chunk * 32767).astype(np.int16), nch)[None]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=fmt, layout=layout)
        frame.sample_rate, frame.pts = sr, s
        for p in a.encode(frame):
          c.mux(p)
      for p in a.encode(None):
        c.mux(p)
    if vs is not None:
      for i in range(int(round(video_seconds * fps))):
        img = np.full((size[1], size[0], 3), colour if colour is not None else 10 * i, np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format='rgb24')
        frame.pts = i
        for p in vs.encode(frame):
          c.mux(p)
      for p in vs.encode(None):
        c.mux(p)


def _write_wav(path, audio: np.ndarray, sr: int, channels: int):
  pcm = np.repeat((audio * 32767).astype(np.int16), channels)
  with av.open(str(path), 'w', format='wav') as c:
    a = c.add_stream('pcm_s16le', rate=sr)
    a.layout = 'stereo' if channels == 2 else 'mono'
    frame = av.AudioFrame.from_ndarray(pcm[None], format='s16', layout=a.layout.name)
    frame.sample_rate, frame.pts = sr, 0
    for p in list(a.encode(frame)) + list(a.encode(None)):
      c.mux(p)


def _jpeg_bytes(size, colour) -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', size, colour).save(buf, format='JPEG', quality=95)
  return buf.getvalue()


def make_manual_dir(root) -> str:
  """Writes the fixture manual dir (index + clips) and returns its path."""
  d = os.path.join(str(root), 'manual')
  for sub in ('video', 'audio', 'frames'):
    os.makedirs(os.path.join(d, sub))
  v, a, f = (os.path.join(d, sub) for sub in ('video', 'audio', 'frames'))
  _write_video(os.path.join(v, 'aaaaaaaaaaa_000010.mp4'), video_seconds=2.4, audio=_tone(440, 2.4, 44100))
  _write_video(os.path.join(v, 'bbbbbbbbbbb_000000.mkv'), video_seconds=1.8, acodec='pcm_s16le', sr=22050,
               layout='mono', audio=_tone(1000, 1.75, 22050))
  _write_wav(os.path.join(a, 'ccccccccccc_000030.wav'), _tone(300, 2.0, 8000), 8000, 2)
  with open(os.path.join(f, 'ccccccccccc_000030.jpg'), 'wb') as fh:
    fh.write(_jpeg_bytes((40, 30), (0, 0, 255)))
  _write_video(os.path.join(v, 'ddddddddddd_000100.webm'), size=(96, 128), colour=(255, 0, 0), vcodec='libvpx',
               acodec='libopus', sr=48000, audio=_tone(660, 2.0, 48000))
  _write_wav(os.path.join(a, 'eeeeeeeeeee_000000.wav'), _tone(523, 2.0, 48000), 48000, 1)
  with open(os.path.join(f, 'eeeeeeeeeee_000000.jpg'), 'wb') as fh:
    fh.write(_jpeg_bytes((80, 60), (255, 255, 0)))
  # The bad ones.
  _write_video(os.path.join(v, 'shortaudio0_000005.mp4'), audio=_tone(440, 1.0, 44100))
  _write_video(os.path.join(v, 'noaudio0000_000000.mp4'))
  _write_video(os.path.join(v, 'audioonly00_000000.mp4'), video_seconds=0, audio=_tone(440, 2.0, 44100))
  with open(os.path.join(v, 'aaaaaaaaaaa_000010.mp4'), 'rb') as fh:
    whole = fh.read()
  with open(os.path.join(v, 'truncmp4000_000000.mp4'), 'wb') as fh:
    fh.write(whole[:len(whole) // 2])
  with open(os.path.join(v, 'garbage0000_000000.mp4'), 'wb') as fh:
    fh.write(b'this is not a video file\n' * 200)
  _write_wav(os.path.join(a, 'badjpg00000_000000.wav'), _tone(440, 2.0, 16000), 16000, 1)
  with open(os.path.join(f, 'badjpg00000_000000.jpg'), 'wb') as fh:
    fh.write(_jpeg_bytes((64, 48), (0, 255, 0))[:300])
  with open(os.path.join(a, 'badwav00000_000000.wav'), 'wb') as fh:
    fh.write(b'RIFF....WAVEfmt broken header' * 10)
  with open(os.path.join(f, 'badwav00000_000000.jpg'), 'wb') as fh:
    fh.write(_jpeg_bytes((64, 48), (0, 255, 0)))
  _write_wav(os.path.join(a, 'wavonly0000_000000.wav'), _tone(440, 2.0, 16000), 16000, 1)
  # The index: clip-id order scrambled, one duplicate row (its first occurrence is kept).
  rows = [(c[:-7], int(c[-6:]), s[1], s[0]) for c, s in list(BAD.items()) + list(GOOD.items())]
  rows = rows[::-1] + [('aaaaaaaaaaa', 10, 'cat purring', 'train')]
  with open(os.path.join(d, 'vggsound.csv'), 'w', newline='') as fh:
    csv.writer(fh).writerows(rows)
  return d


def _config():
  return vgg.make_config(sample_rate=SR, clip_seconds=CLIP_S, min_seconds=MIN_S, frame_size=FRAME)


def _read_all(data_dir, name):
  out = {}
  for split in ('train', 'test'):
    source = tfds.data_source(f'vggsound/{name}', data_dir=data_dir, split=split, download=False)
    out[split] = [source[i] for i in range(len(source))]
  return out


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('vggsound')
  manual = make_manual_dir(root)
  builder = vgg.Vggsound(config=_config(), data_dir=str(root / 'tfds'), num_workers=1)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False),
      file_format='array_record')
  return root, manual, builder, _read_all(str(root / 'tfds'), builder.builder_config.name)


def test_config_name_and_validation():
  assert vgg.make_config().name == vgg.DEFAULT_CONFIG_NAME == '16k_10s'
  assert vgg.make_config().min_seconds == 9.0
  assert vgg.make_config() is vgg.Vggsound.BUILDER_CONFIGS[0]  # TFDS refuses a second object under that name
  assert vgg.Vggsound(config=vgg.make_config(), data_dir='/nonexistent').builder_config.num_samples == 160000
  with pytest.raises(ValueError, match='default config'):
    vgg.make_config(name='16k_10s', frame_size=128)
  assert vgg.make_config(clip_seconds=5, frame_size=128, limit=100).name == '16k_5s_128px_first100'
  assert _config().num_samples == 32000
  with pytest.raises(ValueError, match='min_seconds'):
    vgg.make_config(clip_seconds=2.0, min_seconds=3.0)
  with pytest.raises(ValueError, match='frame_time'):
    vgg.make_config(frame_time=1.5)


def test_exactly_the_good_clips_in_their_splits(built):
  _, _, _, data = built
  for split in ('train', 'test'):
    got = [_text(ex['clip']) for ex in data[split]]
    assert got == sorted(c for c, g in GOOD.items() if g[0] == split)  # clip-id order
    for ex in data[split]:
      clip = _text(ex['clip'])
      assert _text(ex['label']) == GOOD[clip][1]  # the first of the duplicate rows, the comma label intact
      assert _text(ex['youtube_id']) == clip[:-7] and int(ex['start_seconds']) == int(clip[-6:])


def test_audio_length_tone_and_padding(built):
  _, _, _, data = built
  for ex in data['train'] + data['test']:
    clip = _text(ex['clip'])
    freq, seconds = GOOD[clip][2], GOOD[clip][3]
    audio = np.asarray(ex['audio'])
    assert audio.dtype == np.int16 and audio.shape == (int(SR * CLIP_S),)
    x = audio[:int(1.5 * SR)].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    assert abs(np.argmax(spectrum) * SR / x.size - freq) < 2.0, clip
    assert 0.25 * 32767 < np.abs(x).max() <= 32767, clip  # neither silent nor clipped to nothing
    if seconds < CLIP_S:  # short but acceptable: zero padding after the tone, none before
      tail = audio[int((seconds + 0.02) * SR):]
      assert tail.size > 0 and np.all(tail == 0), clip
      assert np.abs(audio[int((seconds - 0.1) * SR):int((seconds - 0.02) * SR)]).max() > 1000, clip
    else:
      assert np.abs(audio[-int(0.1 * SR):]).max() > 1000, clip


def test_frame_size_colour_and_time(built):
  _, _, _, data = built
  for ex in data['train'] + data['test']:
    clip = _text(ex['clip'])
    want_size, want = GOOD[clip][4], GOOD[clip][5]
    image = np.asarray(ex['image'])
    assert image.dtype == np.uint8 and image.shape == (want_size[1], want_size[0], 3), clip
    mean = image.reshape(-1, 3).mean(0)
    if isinstance(want, int):  # grey ramp 10*i: the level says which frame (neighbours differ by 10)
      assert np.all(np.abs(mean - want) < 4.5), (clip, mean)
    else:
      assert np.all(np.abs(mean - np.array(want)) < 25), (clip, mean)


def test_bad_clips_reported_with_reason(built):
  root, _, builder, _ = built
  skipped = {(s.split, s.clip): s.reason for s in builder.skipped}
  want = {(s, c): r for c, (s, _, r) in BAD.items()}
  want[('train', 'aaaaaaaaaaa_000010')] = vgg.DUPLICATE
  assert skipped == want
  report_path = os.path.join(builder.data_dir, vgg.REPORT_NAME)
  assert os.path.isfile(report_path)
  report = vgg.read_report(report_path)
  assert {(s.split, s.clip): s.reason for s in report} == want
  assert all(s.detail for s in report)
  with open(report_path) as fh:
    summary = [line for line in fh if line.startswith('# train') or line.startswith('# test')]
  assert len(summary) == 2 and '3 written' in summary[0] + summary[1] and '2 written' in summary[0] + summary[1]
  assert builder.counts['train']['written'] == 3 and builder.counts['test']['written'] == 2


def test_limit_takes_the_first_clips_of_each_split(built, tmp_path):
  _, manual, _, _ = built
  config = vgg.make_config(sample_rate=SR, clip_seconds=CLIP_S, min_seconds=MIN_S, frame_size=FRAME, limit=4)
  assert config.name.endswith('_first4')
  builder = vgg.Vggsound(config=config, data_dir=str(tmp_path), num_workers=2)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False),
      file_format='array_record')
  data = _read_all(str(tmp_path), config.name)
  # Clip-id order: train aaa, bbb, ccc, missing0000 | test audioonly00, badjpg00000, badwav00000, ddd.
  assert [_text(ex['clip']) for ex in data['train']] == ['aaaaaaaaaaa_000010', 'bbbbbbbbbbb_000000',
                                                         'ccccccccccc_000030']
  assert [_text(ex['clip']) for ex in data['test']] == ['ddddddddddd_000100']
  assert sorted(s.clip for s in builder.skipped if s.split == 'test') == [
      'audioonly00_000000', 'badjpg00000_000000', 'badwav00000_000000']


def test_index_errors_name_the_line(tmp_path):
  path = tmp_path / 'vggsound.csv'
  path.write_text('youtube_id,start_seconds,label,split\nabc,12,"a, b",train\n')
  assert vgg.read_index(path) == [vgg.IndexRow('abc', 12, 'a, b', 'train')]  # header tolerated, quoted comma
  path.write_text('abc,12,a,train\nabd,x,b,test\n')
  with pytest.raises(ValueError, match='line 2: start_seconds'):
    vgg.read_index(path)
  path.write_text('abc,12,a,b,train\n')
  with pytest.raises(ValueError, match='line 1: expected 4 columns'):
    vgg.read_index(path)
  path.write_text('abc,12,a,val\n')
  with pytest.raises(ValueError, match="line 1: split must be one of"):
    vgg.read_index(path)
  with pytest.raises(FileNotFoundError, match='vggsound.csv'):
    vgg.read_index(tmp_path / 'nope' / 'vggsound.csv')


def test_empty_split_is_a_clear_error(tmp_path):
  manual = tmp_path / 'manual'
  (manual / 'video').mkdir(parents=True)
  _write_video(manual / 'video' / 'xxxxxxxxxxx_000000.mp4', audio=_tone(440, 2.0, 44100))
  (manual / 'vggsound.csv').write_text('xxxxxxxxxxx,0,ok,train\nyyyyyyyyyyy,0,gone,test\n')
  builder = vgg.Vggsound(config=_config(), data_dir=str(tmp_path / 'tfds'), num_workers=1)
  with pytest.raises(ValueError, match="split 'test' is empty.*missing=1"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual), try_download_gcs=False),
        file_format='array_record')


def _run_prepare(*args, timeout=120):
  return subprocess.run([sys.executable, PREPARE, *args], capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})


def test_prepare_cli_builds_the_same_records_with_threads(built):
  root, manual, builder, data = built
  out = root / 'cli_tfds'
  r = _run_prepare(f'--manual_dir={manual}', f'--data_dir={out}', f'--clip_seconds={CLIP_S}',
                   f'--sample_rate={SR}', f'--min_seconds={MIN_S}', f'--frame_size={FRAME}', '--num_workers=3',
                   '--log_every=2')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'train: 3 examples, 5 clips skipped' in r.stdout and 'test: 2 examples, 5 clips skipped' in r.stdout
  assert os.path.join(str(out), 'vggsound', builder.builder_config.name, '1.0.0', vgg.REPORT_NAME) in r.stdout
  again = _read_all(str(out), builder.builder_config.name)
  for split in ('train', 'test'):
    assert len(again[split]) == len(data[split])
    for a, b in zip(again[split], data[split]):
      assert sorted(a) == sorted(b)
      for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize('what', ['no_dir', 'no_csv'])
def test_prepare_cli_missing_input_exits_2_with_one_line(tmp_path, what):
  manual = tmp_path / 'manual'
  if what == 'no_csv':
    (manual / 'video').mkdir(parents=True)
  r = _run_prepare(f'--manual_dir={manual}', f'--data_dir={tmp_path / "out"}', timeout=60)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in r.stderr
  assert ('not a directory' if what == 'no_dir' else 'vggsound.csv') in lines[0]
