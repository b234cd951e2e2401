"""Caption metrics under the COCO caption protocol: BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D).

Anchor: the MS-COCO caption evaluation server (Chen et al. 2015, "Microsoft COCO Captions: Data Collection
and Evaluation Server") as packaged in pycocoevalcap. The scorers are pycocoevalcap's own (``Bleu`` with the
'closest' reference length, Java ``Meteor`` 1.5, ``Rouge`` with beta = 1.2, ``Cider``); nothing here
re-implements a metric. Protocol details:

* Tokenisation: Stanford PTBTokenizer (CoreNLP 3.4.1, the jar pycocoevalcap ships), lower-cased, then the
  protocol's punctuation tokens are dropped. We call that jar with exactly the flags and punctuation list of
  ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`` but feed it through a pipe, so no temporary file is
  written into site-packages (which may be read-only) and Java's stderr chatter is captured, not printed.
* Java is needed by the PTB tokenizer and by METEOR. Without Java (or with ``tokenize=False``) a simple
  tokeniser is used instead: lower-case, every non-alphanumeric character becomes a space, split on
  whitespace. It agrees with PTB on plain captions but not on clitics ("don't" -> PTB "do n't", simple
  "don t"), so numbers are comparable with published ones only for 'ptb'. The result reports which one
  ran under the key 'tokenizer' ('ptb' or 'simple'; the only non-float value in the dict, so drop it
  before writing scalars). METEOR without Java raises RuntimeError.
* BLEU and METEOR are corpus-level scores; ROUGE-L is the mean over examples; CIDEr-D takes its document
  frequencies from the references of the evaluated set, so it needs a corpus (with one example it is 0).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

ALL_METRICS = ('bleu', 'meteor', 'rouge', 'cider')
_PTB_TIMEOUT_S = 600


def java_available() -> bool:
  """True when a `java` executable is on PATH (needed for the PTB tokenizer and METEOR)."""
  return shutil.which('java') is not None


def simple_tokenize(text: str) -> str:
  """Lower-case, replace every non-alphanumeric character by a space, and re-join the words with spaces."""
  return ' '.join(re.sub(r'[^\w\s]|_', ' ', text.lower()).split())


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
  """PTB-tokenise captions as the COCO protocol does (needs Java); one output string per input string.

  Same jar, flags ('-preserveLines -lowerCase') and punctuation removal as pycocoevalcap's PTBTokenizer.
  Whitespace inside a caption (including newlines) is collapsed first, so each caption stays one line.
  """
  from pycocoevalcap.tokenizer import ptbtokenizer

  if not texts:
    return []
  if not java_available():
    raise RuntimeError('The PTB tokenizer needs Java 8+ on PATH (install a JRE, e.g. openjdk-17-jre-headless), '
                       'or call caption_scores(..., tokenize=False).')
  lines = [' '.join(str(t).split()) for t in texts]
  jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
  cmd = ['java', '-cp', ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR, 'edu.stanford.nlp.process.PTBTokenizer',
         '-preserveLines', '-lowerCase']
  try:
    proc = subprocess.run(cmd, cwd=jar_dir, input='\n'.join(lines) + '\n', capture_output=True,
                          encoding='utf-8', timeout=_PTB_TIMEOUT_S, check=False)
  except (OSError, subprocess.SubprocessError) as e:
    raise RuntimeError(f'Running the PTB tokenizer (Java) failed: {e}') from e
  out = proc.stdout.split('\n')
  if proc.returncode != 0 or len(out) < len(lines):
    raise RuntimeError(f'The PTB tokenizer (Java) failed with exit code {proc.returncode} and '
                       f'{len(out)} output lines for {len(lines)} captions; stderr: {proc.stderr.strip()[-2000:]}')
  punct = set(ptbtokenizer.PUNCTUATIONS)
  return [' '.join(w for w in line.rstrip().split(' ') if w and w not in punct) for line in out[:len(lines)]]


class _MeteorScorer:
  """pycocoevalcap's Java METEOR 1.5 wrapper, started and stopped around one call, with readable errors."""

  def __enter__(self):
    from pycocoevalcap.meteor.meteor import Meteor

    try:
      self.meteor = Meteor()
    except OSError as e:
      raise RuntimeError(f'METEOR needs Java 8+ on PATH; starting it failed: {e}') from e
    return self

  def compute_score(self, gts, res) -> float:
    try:
      score, _ = self.meteor.compute_score(gts, res)
      return float(score)
    except (ValueError, OSError) as e:  # the JVM died: empty output or a broken pipe
      if self.meteor.lock.locked():
        self.meteor.lock.release()
      self.meteor.meteor_p.kill()
      _, err = self.meteor.meteor_p.communicate()
      err = err.decode(errors='replace').strip()[-2000:] if err else ''
      raise RuntimeError(f'METEOR (Java, meteor-1.5.jar) failed; it needs Java 8+ and ~2 GB of heap. '
                         f'stderr: {err}') from e

  def __exit__(self, *exc):
    p = self.meteor.meteor_p
    if p.poll() is None:
      with contextlib.suppress(OSError):
        p.stdin.close()
      p.kill()
    p.wait()
    if self.meteor.lock.locked():  # let the wrapper's __del__ run without blocking
      self.meteor.lock.release()
    return False


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                   metrics: Sequence[str] = ALL_METRICS, tokenize: bool = True) -> dict[str, float | str]:
  """Corpus caption scores of `predictions` against several `references` per example (COCO protocol).

  Args:
    predictions: one generated caption per example (empty strings are allowed and score 0).
    references: for each example, one or more reference captions.
    metrics: any of 'bleu', 'meteor', 'rouge', 'cider'.
    tokenize: use the PTB tokenizer (falls back to `simple_tokenize` when Java is missing); False always
      uses `simple_tokenize`.

  Returns:
    {'BLEU-1': ..., 'BLEU-2': ..., 'BLEU-3': ..., 'BLEU-4': ..., 'METEOR': ..., 'ROUGE-L': ..., 'CIDEr': ...}
    for the requested metrics, as floats in the scorers' usual ranges (BLEU, METEOR, ROUGE-L in [0, 1];
    CIDEr in [0, 10]), plus 'tokenizer': 'ptb' | 'simple' (a string).

  Raises:
    ValueError: mismatched lengths, no examples, an example without references, an unknown metric.
    RuntimeError: METEOR requested but Java is missing or the METEOR process fails.
  """
  metrics = tuple(m.lower() for m in metrics)
  unknown = set(metrics) - set(ALL_METRICS)
  if unknown:
    raise ValueError(f'Unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}.')
  if isinstance(predictions, str):
    raise ValueError('predictions must be a sequence of strings, not one string.')
  predictions = [str(p) for p in predictions]
  references = [[references[i]] if isinstance(references[i], str) else [str(r) for r in references[i]]
                for i in range(len(references))]
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} reference lists.')
  if not predictions:
    raise ValueError('caption_scores needs at least one example.')
  if any(len(r) == 0 for r in references):
    raise ValueError('Every example needs at least one reference caption.')
  java = java_available()
  if 'meteor' in metrics and not java:
    raise RuntimeError('METEOR needs Java 8+ on PATH (it runs meteor-1.5.jar); install a JRE, e.g. '
                       'openjdk-17-jre-headless, or leave METEOR out of `metrics`.')

  use_ptb = tokenize and java
  flat = predictions + [r for refs in references for r in refs]
  toks = ptb_tokenize(flat) if use_ptb else [simple_tokenize(t) for t in flat]
  n = len(predictions)
  res, gts, pos = {}, {}, n
  for i, refs in enumerate(references):
    res[i] = [toks[i]]
    # METEOR's stdio protocol separates fields with '|||'; pycocoevalcap strips it from hypotheses only.
    gts[i] = [toks[pos + j].replace('|||', ' ') for j in range(len(refs))]
    pos += len(refs)

  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  out: dict[str, float | str] = {}
  with contextlib.redirect_stdout(io.StringIO()):
    if 'bleu' in metrics:
      bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
      out.update({f'BLEU-{k + 1}': float(v) for k, v in enumerate(bleu)})
    if 'meteor' in metrics:
      with _MeteorScorer() as meteor:
        out['METEOR'] = meteor.compute_score(gts, res)
    if 'rouge' in metrics:
      out['ROUGE-L'] = float(Rouge().compute_score(gts, res)[0])
    if 'cider' in metrics:
      out['CIDEr'] = float(Cider().compute_score(gts, res)[0])
  out['tokenizer'] = 'ptb' if use_ptb else 'simple'
  return out
