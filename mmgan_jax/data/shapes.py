"""The embedded procedural tri-modal dataset "shapes" (image, captions, audio, attribute labels).

Anchor: the DESIGN.md "embedded dataset" section; the idea follows the synthetic attribute datasets used to
score conditional generators exactly (dSprites / CLEVR-style captions, Multi-MNIST-like audio-visual pairs).

Every example is a pure function of ``(seed, split, index)``: a ``numpy.random.Generator`` is seeded with
``SeedSequence([seed, split_id, index])`` and nothing else is read, so any example can be produced on its own
(random access for grain) and the train and test splits are disjoint random draws.

Attributes and how each modality encodes them
---------------------------------------------
============  =======================================  ============================================
attribute     image                                    audio
============  =======================================  ============================================
shape (4)     filled circle/square/triangle/cross      timbre: sine / square / sawtooth / triangle
colour (6)    saturated RGB palette                    base pitch (6 notes, 5 semitones apart)
size (3)      half-extent 0.09 / 0.12 / 0.15 of side   beep length 0.08 / 0.14 / 0.20 of the clip
position (9)  centre in a cell of the 3x3 grid         column -> 1/2/3 beeps; row -> rising/flat/
                                                       falling pitch glide (top = rising)
============  =======================================  ============================================

Size note: with a 3x3 grid a cell is 1/3 of the side, so a shape centred in a corner cell can have a
half-extent of at most 1/6 of the side before it leaves the image. The half-extents are therefore
0.09/0.12/0.15 of the side (the side lengths are 0.18/0.24/0.30), and the positional jitter of each size is
what keeps the shape at least 1 % of the side inside the image (never more than 0.067 of the side, so the
centre never leaves its cell).

Clean variant: uniform dark-grey background, exact palette colour, beeps start 5 % into the clip.
Noisy variant (the "VGGSound vs COCO" contrast): random grey level plus an achromatic grating texture,
2-4 small grey distractor blobs drawn behind the shape, gaussian pixel noise (mostly luminance), a small
jitter of the shape colour that keeps it saturated; audio gets a random onset offset and white noise at
about 10 dB SNR (measured over the whole clip).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'cross')
COLOURS = ('red', 'green', 'blue', 'yellow', 'magenta', 'cyan')
SIZES = ('small', 'medium', 'large')
POSITIONS = ('top left', 'top', 'top right', 'left', 'centre', 'right', 'bottom left', 'bottom',
             'bottom right')
ATTRIBUTE_NAMES = ('shape', 'colour', 'size', 'position')
NUM_CLASSES = (len(SHAPES), len(COLOURS), len(SIZES), len(POSITIONS))
SPLITS = ('train', 'test')

# Saturated palette (uint8 RGB) and its hue in degrees, in COLOURS order.
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]],
                   dtype=np.float32)
PALETTE_HUES = np.array([0.0, 120.0, 240.0, 60.0, 300.0, 180.0], dtype=np.float32)

# Half-extent of each size as a fraction of the image side, in SIZES order.
SIZE_FRACTIONS = (0.09, 0.12, 0.15)
# Area of each shape in units of half-extent**2, and the offset of its centroid below the bbox centre in
# units of half-extent (only the upward-pointing triangle is off-centre). Used by the oracle.
SHAPE_AREA = (np.pi, 4.0, 2.0, 20.0 / 9.0)
SHAPE_CENTROID_DY = (0.0, 0.0, 1.0 / 3.0, 0.0)
CROSS_ARM = 1.0 / 3.0  # half-width of the cross arms relative to the half-extent
EDGE_MARGIN = 0.01  # the shape stays this fraction of the side away from the image border

CLEAN_BACKGROUND = 48.0

# Audio: base pitch per colour (Hz), 5 semitones apart; glide of +-2 semitones across each beep.
BASE_PITCH_HZ = tuple(200.0 * 2.0 ** (5.0 * k / 12.0) for k in range(len(COLOURS)))
GLIDE_SEMITONES = 2.0
BEEP_FRACTIONS = (0.08, 0.14, 0.20)  # beep length per size, as a fraction of the clip
GAP_FRACTION = 0.08
CLEAN_ONSET_FRACTION = 0.05
NOISY_MAX_ONSET_FRACTION = 0.20
AUDIO_AMPLITUDE = 0.5
NOISY_SNR_DB = 10.0
RAMP_SECONDS = 0.005

# ------------------------------------------------------------------------------------------------
# Captions: templates and synonyms. Only lowercase words separated by single spaces (no punctuation),
# so tokenising and decoding a caption gives it back exactly.
# ------------------------------------------------------------------------------------------------
SHAPE_WORDS = (('circle', 'disc', 'round shape'), ('square', 'box', 'square shape'),
               ('triangle', 'triangle shape'), ('cross', 'plus sign', 'plus shape'))
COLOUR_WORDS = tuple((c,) for c in COLOURS)
SIZE_WORDS = (('small', 'little', 'tiny'), ('medium', 'medium sized', 'mid sized'), ('large', 'big', 'huge'))
# Prepositional phrases ("... in the top left") and bare location names ("top left").
POSITION_PHRASES = (
    ('in the top left', 'at the upper left', 'in the top left corner'),
    ('at the top', 'in the top middle', 'at the top centre'),
    ('in the top right', 'at the upper right', 'in the top right corner'),
    ('on the left', 'at the left', 'in the middle left'),
    ('in the centre', 'in the middle', 'at the centre'),
    ('on the right', 'at the right', 'in the middle right'),
    ('in the bottom left', 'at the lower left', 'in the bottom left corner'),
    ('at the bottom', 'in the bottom middle', 'at the bottom centre'),
    ('in the bottom right', 'at the lower right', 'in the bottom right corner'),
)
POSITION_NAMES = (
    ('top left', 'upper left'), ('top', 'top middle'), ('top right', 'upper right'),
    ('left', 'middle left'), ('centre', 'middle'), ('right', 'middle right'),
    ('bottom left', 'lower left'), ('bottom', 'bottom middle'), ('bottom right', 'lower right'),
)
# {s}=size {c}=colour {h}=shape {p}=position phrase {n}=position name. Template 0 is the canonical one.
TEMPLATES = (
    'a {s} {c} {h} {p}',
    'there is a {s} {c} {h} {p}',
    '{p} there is a {s} {c} {h}',
    'the image shows a {s} {c} {h} {p}',
    'a {h} that is {s} and {c} {p}',
    'a picture of a {s} {c} {h} {p}',
    'the {n} of the image shows a {s} {c} {h}',
    'a {c} {h} {p} that is {s}',
    '{s} {c} {h} {p}',
)


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
  """Static description of a shapes variant.

  Attributes:
    image_size: side of the square RGB image in pixels (>= 32, multiple of 16).
    sample_rate: audio sample rate in Hz.
    audio_seconds: clip length in seconds (the beeps are laid out as fractions of it).
    noisy: the cluttered / noisy variant.
    num_captions: number of distinct paraphrases per example (>= 3; the first is the canonical one).
  """
  image_size: int = 32
  sample_rate: int = 16000
  audio_seconds: float = 1.0
  noisy: bool = False
  num_captions: int = 3

  def __post_init__(self):
    if not isinstance(self.image_size, (int, np.integer)) or self.image_size < 32 or self.image_size % 16:
      raise ValueError(f'image_size must be an int >= 32 and a multiple of 16, got {self.image_size!r}.')
    if self.sample_rate < 4000:
      raise ValueError(f'sample_rate must be >= 4000 Hz, got {self.sample_rate!r}.')
    if not 0.25 <= self.audio_seconds <= 60.0:
      raise ValueError(f'audio_seconds must lie in [0.25, 60], got {self.audio_seconds!r}.')
    if self.num_captions < 3:
      raise ValueError(f'num_captions must be >= 3, got {self.num_captions!r}.')

  @property
  def num_samples(self) -> int:
    return int(round(self.sample_rate * self.audio_seconds))


def split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
  return SPLITS.index(split)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The only source of randomness for one example."""
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), split_id(split), int(index)])))


# ------------------------------------------------------------------------------------------------
# Image.
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates: ys of shape (size, 1), xs of shape (1, size)."""
  c = np.arange(size, dtype=np.float32) + 0.5
  return c[:, None], c[None, :]


def shape_coverage(shape: int, cx: float, cy: float, r: float, size: int) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] of a filled shape (size, size), float32.

  The shape has half-extent ``r`` pixels around the bbox centre ``(cx, cy)``; coverage is
  ``clip(0.5 - d, 0, 1)`` with ``d`` an (approximate) signed distance in pixels. The triangle points up.
  """
  ys, xs = _pixel_grid(size)
  dx = xs - np.float32(cx)
  dy = ys - np.float32(cy)
  r = np.float32(r)
  if shape == 0:  # circle
    d = np.sqrt(dx * dx + dy * dy) - r
  elif shape == 1:  # square
    d = np.maximum(np.abs(dx), np.abs(dy)) - r
  elif shape == 2:  # triangle: apex (cx, cy - r), base y = cy + r from cx - r to cx + r
    inv = np.float32(1.0 / np.sqrt(5.0))
    side = (2.0 * np.abs(dx) - dy - r) * inv
    d = np.maximum(dy - r, side)
  elif shape == 3:  # cross (plus sign)
    adx, ady = np.abs(dx), np.abs(dy)
    w = r * np.float32(CROSS_ARM)
    d = np.minimum(np.maximum(adx - r, ady - w), np.maximum(adx - w, ady - r))
  else:
    raise ValueError(f'unknown shape id {shape}')
  return np.clip(np.float32(0.5) - d, 0.0, 1.0)


def shape_centre(spec: ShapesSpec, size_id: int, position: int, rng: np.random.Generator
                 ) -> tuple[float, float, float]:
  """Bbox centre (cx, cy) and half-extent r in pixels, with jitter that keeps the shape inside its cell."""
  s = spec.image_size
  r = SIZE_FRACTIONS[size_id]
  jitter = 1.0 / 6.0 - r - EDGE_MARGIN
  row, col = divmod(position, 3)
  jx, jy = rng.uniform(-jitter, jitter, size=2)
  cx = ((col + 0.5) / 3.0 + jx) * s
  cy = ((row + 0.5) / 3.0 + jy) * s
  return float(cx), float(cy), r * s


def _noisy_background(s: int, rng: np.random.Generator) -> np.ndarray:
  """Grey level plus a random achromatic grating texture (S, S) float32."""
  ys, xs = _pixel_grid(s)
  level = rng.uniform(40.0, 170.0)
  amp = rng.uniform(8.0, 25.0, size=3).astype(np.float32)
  freq = rng.uniform(1.0, 4.0, size=4).astype(np.float32) * np.float32(2.0 * np.pi / s)
  phase = rng.uniform(0.0, 2.0 * np.pi, size=4).astype(np.float32)
  gx = np.cos(freq[0] * xs + phase[0])
  gy = np.cos(freq[1] * ys + phase[1])
  gxy = np.cos(freq[2] * ys + phase[2]) * np.cos(freq[3] * xs + phase[3])
  return (np.float32(level) + amp[0] * gx + amp[1] * gy + amp[2] * gxy).astype(np.float32)


def _draw_distractors(grey: np.ndarray, rng: np.random.Generator) -> None:
  """2-4 small achromatic discs of random grey level, drawn in place (each on its own bounding window)."""
  s = grey.shape[0]
  for _ in range(int(rng.integers(2, 5))):
    bx, by = rng.uniform(0.0, s, size=2)
    br = rng.uniform(0.025, 0.06) * s
    level = rng.uniform(0.0, 255.0)
    x0, x1 = max(0, int(bx - br - 1)), min(s, int(bx + br + 2))
    y0, y1 = max(0, int(by - br - 1)), min(s, int(by + br + 2))
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + np.float32(0.5 - bx)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + np.float32(0.5 - by)
    blob = np.clip(np.float32(0.5 + br) - np.sqrt(xs * xs + ys * ys), 0.0, 1.0)
    window = grey[y0:y1, x0:x1]
    window += blob * (np.float32(level) - window)


def render_image(spec: ShapesSpec, attributes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8 (S, S, 3) image of the attributes (draws from ``rng``)."""
  shape, colour, size_id, position = (int(a) for a in attributes)
  s = spec.image_size
  cx, cy, r = shape_centre(spec, size_id, position, rng)
  cov = shape_coverage(shape, cx, cy, r, s)[..., None]
  col = PALETTE[colour]
  if not spec.noisy:
    img = CLEAN_BACKGROUND + cov * (col - CLEAN_BACKGROUND)
  else:
    grey = _noisy_background(s, rng)
    _draw_distractors(grey, rng)  # achromatic blobs, behind the shape
    # Colour jitter that keeps the colour saturated (chroma >= 255 - 2 * 35).
    col = np.where(col > 0, col - rng.uniform(0.0, 35.0, size=3), rng.uniform(0.0, 35.0, size=3))
    img = grey[..., None] + cov * (col.astype(np.float32) - grey[..., None])
    noise = _noise(rng, s * s * 4).reshape(s, s, 4)
    img = img + 8.0 * noise[..., :1] + 3.0 * noise[..., 1:]
  return np.clip(img + 0.5, 0.0, 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Captions.
# ------------------------------------------------------------------------------------------------
def _fill(template: str, shape: int, colour: int, size_id: int, position: int, choice) -> str:
  return template.format(s=choice(SIZE_WORDS[size_id]), c=choice(COLOUR_WORDS[colour]),
                         h=choice(SHAPE_WORDS[shape]), p=choice(POSITION_PHRASES[position]),
                         n=choice(POSITION_NAMES[position]))


def canonical_caption(attributes) -> str:
  """The canonical caption, e.g. 'a large red circle in the top left'."""
  shape, colour, size_id, position = (int(a) for a in attributes)
  return _fill(TEMPLATES[0], shape, colour, size_id, position, lambda words: words[0])


def make_captions(spec: ShapesSpec, attributes, rng: np.random.Generator) -> list[str]:
  """``spec.num_captions`` distinct captions; the first is canonical, the rest random paraphrases."""
  shape, colour, size_id, position = (int(a) for a in attributes)
  captions = [canonical_caption(attributes)]
  choice = lambda words: words[int(rng.integers(len(words)))]
  while len(captions) < spec.num_captions:
    c = _fill(TEMPLATES[int(rng.integers(len(TEMPLATES)))], shape, colour, size_id, position, choice)
    if c not in captions:
      captions.append(c)
  return captions


def all_captions(attributes) -> list[str]:
  """Every caption the generator can produce for ``attributes`` (used by tests and the vocabulary)."""
  shape, colour, size_id, position = (int(a) for a in attributes)
  out = set()
  for t in TEMPLATES:
    for s, c, h, p, n in itertools.product(SIZE_WORDS[size_id], COLOUR_WORDS[colour], SHAPE_WORDS[shape],
                                           POSITION_PHRASES[position], POSITION_NAMES[position]):
      out.add(t.format(s=s, c=c, h=h, p=p, n=n))
  return sorted(out)


def _phrase_table() -> tuple[tuple[str, int, int], ...]:
  """(phrase, attribute index, class) for every wording of every attribute value, longest phrases first."""
  tables = (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS)
  rows = [(w, a, k) for a, table in enumerate(tables) for k, words in enumerate(table) for w in words]
  rows += [(w, 3, k) for table in (POSITION_PHRASES, POSITION_NAMES) for k, words in enumerate(table)
           for w in words]
  return tuple(sorted(set(rows), key=lambda r: -len(r[0])))


def parse_caption(text: str) -> np.ndarray:
  """The attributes a caption states: int32 (4,) (shape, colour, size, position), -1 where none is named.

  Longest wording first, each word used once ("in the middle left" is the left, not the centre), so every
  caption `all_captions(a)` parses back to `a`; used to score the captioner per attribute.
  """
  words = ' '.join(text.lower().split()).split(' ')
  used = [False] * len(words)
  out = np.full((4,), -1, np.int32)
  for phrase, attr, cls in _PHRASES:
    p = phrase.split(' ')
    for i in range(len(words) - len(p) + 1):
      if out[attr] < 0 and words[i:i + len(p)] == p and not any(used[i:i + len(p)]):
        out[attr] = cls
        used[i:i + len(p)] = [True] * len(p)
  return out


def caption_vocabulary() -> tuple[str, ...]:
  """Sorted tuple of every word any caption can contain (closed vocabulary)."""
  words = set()
  for t in TEMPLATES:
    words.update(w for w in t.split() if not w.startswith('{'))
  for group in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS, POSITION_PHRASES, POSITION_NAMES):
    for synonyms in group:
      for phrase in synonyms:
        words.update(phrase.split())
  return tuple(sorted(words))


# ------------------------------------------------------------------------------------------------
# Audio.
# ------------------------------------------------------------------------------------------------
_TABLE_SIZE = 4096


@functools.lru_cache(maxsize=8)
def _wavetables(sample_rate: int) -> np.ndarray:
  """Band-limited single-period tables (4, TABLE_SIZE), unit peak: sine, square, sawtooth, triangle.

  The number of harmonics is capped so that the highest pitch (top note, rising glide) keeps every
  harmonic below 0.45 * sample_rate: the clips are alias-free.
  """
  f_max = BASE_PITCH_HZ[-1] * 2.0 ** (GLIDE_SEMITONES / 12.0)
  n_harm = max(1, min(15, int(0.45 * sample_rate / f_max)))
  ph = 2.0 * np.pi * np.arange(_TABLE_SIZE) / _TABLE_SIZE
  k = np.arange(1, n_harm + 1)[:, None]
  sines = np.sin(k * ph[None, :])
  odd = (k % 2 == 1).astype(np.float64)
  square = (odd / k * sines).sum(0)
  saw = ((-1.0) ** (k + 1) / k * sines).sum(0)
  tri_sign = (-1.0) ** ((k - 1) // 2)
  tri = (odd * tri_sign / (k * k) * sines).sum(0)
  tables = np.stack([np.sin(ph), square, saw, tri])
  tables /= np.abs(tables).max(axis=1, keepdims=True)
  return tables.astype(np.float32)


def beep_layout(spec: ShapesSpec, size_id: int, position: int, onset_fraction: float
                ) -> list[tuple[int, int]]:
  """(start, stop) sample indices of each beep."""
  n = spec.num_samples
  col = position % 3
  dur = BEEP_FRACTIONS[size_id] * n
  gap = GAP_FRACTION * n
  starts = [onset_fraction * n + b * (dur + gap) for b in range(col + 1)]
  return [(int(round(a)), min(n, int(round(a + dur)))) for a in starts]


@functools.lru_cache(maxsize=1024)
def _beep(sample_rate: int, num: int, shape: int, colour: int, row: int) -> np.ndarray:
  """One enveloped beep of ``num`` samples (cached: it depends only on these discrete arguments)."""
  table = _wavetables(sample_rate)[shape]
  f0 = BASE_PITCH_HZ[colour]
  glide = (1.0, 0.0, -1.0)[row] * GLIDE_SEMITONES  # top row rises, bottom row falls
  t = np.arange(num, dtype=np.float64) / sample_rate
  if glide == 0.0:
    cycles = f0 * t
  else:
    # Exponential glide f(t) = f0 * 2**(g * t / (12 * dur)); the phase (in cycles) is its integral.
    k = glide * np.log(2.0) / (12.0 * num / sample_rate)
    cycles = f0 * np.expm1(k * t) / k
  idx = (cycles * _TABLE_SIZE).astype(np.int64) & (_TABLE_SIZE - 1)
  ramp = max(1, int(RAMP_SECONDS * sample_rate))
  n = np.arange(num)
  env = np.minimum(1.0, np.minimum(n + 1, num - n) / ramp)
  out = (AUDIO_AMPLITUDE * table[idx] * env).astype(np.float32)
  out.flags.writeable = False
  return out


@functools.lru_cache(maxsize=8)
def _noise_bank(length: int) -> np.ndarray:
  """A fixed bank of standard normals; examples read a random window of it (drawing fresh normals per
  example costs more than everything else together). Read-only."""
  bank = np.random.Generator(np.random.PCG64(0x5eed)).standard_normal(length, dtype=np.float32)
  bank.flags.writeable = False
  return bank


def _noise(rng: np.random.Generator, num: int) -> np.ndarray:
  """``num`` standard normals: a random window of the bank with a random sign (a fresh array)."""
  bank = _noise_bank(max(1 << 16, 8 * num))
  start = int(rng.integers(len(bank) - num))
  sign = np.float32(1.0 if rng.integers(2) else -1.0)
  return bank[start:start + num] * sign


def render_audio(spec: ShapesSpec, attributes, rng: np.random.Generator) -> np.ndarray:
  """float32 (num_samples,) clip with peak <= 1 encoding the attributes (draws from ``rng``)."""
  shape, colour, size_id, position = (int(a) for a in attributes)
  n = spec.num_samples
  onset = rng.uniform(0.0, NOISY_MAX_ONSET_FRACTION) if spec.noisy else CLEAN_ONSET_FRACTION
  out = np.zeros(n, dtype=np.float32)
  for start, stop in beep_layout(spec, size_id, position, onset):
    if stop > start:
      out[start:stop] = _beep(spec.sample_rate, stop - start, shape, colour, position // 3)
  if spec.noisy:
    power = float(np.dot(out, out)) / n
    std = np.sqrt(power / 10.0 ** (NOISY_SNR_DB / 10.0))
    out += np.float32(std) * _noise(rng, n)
    peak = float(np.abs(out).max())
    if peak > 1.0:
      out /= np.float32(peak)
  return out


# ------------------------------------------------------------------------------------------------
# Examples and grain source.
# ------------------------------------------------------------------------------------------------
def chance_accuracy() -> float:
  """Mean per-attribute accuracy of a uniform random guess (the floor of the semantic-accuracy metrics)."""
  return float(np.mean([1.0 / k for k in NUM_CLASSES]))


def sample_attributes(rng: np.random.Generator) -> np.ndarray:
  return np.array([rng.integers(k) for k in NUM_CLASSES], dtype=np.int32)


def make_example(spec: ShapesSpec, seed: int, split: str, index: int) -> dict[str, Any]:
  """One example, a pure function of (spec, seed, split, index).

  Returns dict(image=uint8 (S, S, 3), captions=list[str], audio=float32 (N,), attributes=int32 (4,)).
  """
  rng = example_rng(seed, split, index)
  attributes = sample_attributes(rng)
  image = render_image(spec, attributes, rng)
  captions = make_captions(spec, attributes, rng)
  audio = render_audio(spec, attributes, rng)
  return dict(image=image, captions=captions, audio=audio, attributes=attributes)


class ShapesSource:
  """Random-access source (grain's ``RandomAccessDataSource`` protocol: ``__len__`` and ``__getitem__``)."""

  def __init__(self, spec: ShapesSpec, seed: int, split: str, num_examples: int):
    split_id(split)
    if num_examples <= 0:
      raise ValueError(f'num_examples must be positive, got {num_examples}.')
    self.spec, self.seed, self.split, self.num_examples = spec, int(seed), split, int(num_examples)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -self.num_examples <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self.num_examples} examples.')
    return make_example(self.spec, self.seed, self.split, index % self.num_examples)

  def __repr__(self) -> str:
    return (f'ShapesSource(spec={self.spec!r}, seed={self.seed}, split={self.split!r}, '
            f'num_examples={self.num_examples})')


_PHRASES = _phrase_table()
