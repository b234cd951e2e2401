r"""Conceptual Captions (the paper's third dataset): text -> image and image -> text, the COCO model.

  python launch/train_codec.py --config=configs/conceptual_captions.py --workdir=runs/cc_codec --config.data.data_dir=DIR
  python launch/train.py --config=configs/conceptual_captions.py --workdir=runs/cc \
      --config.model.codec.checkpoint=runs/cc_codec/codec --config.data.data_dir=DIR

DIR holds train.tsv / validation.tsv (the official caption<TAB>url files, renamed) and the downloaded images in
train/ and validation/, each named by its 0-based TSV row (the layout of `img2dataset --output_format files`);
rows without an image are left out and counted (docs/datasets.md). Variants: those of configs/coco.py
(`res=128`, `smoke`).
"""

from configs import coco


def get_config(arg: str | None = None):
  c = coco.get_config(arg)
  c.data.update(name='cc', max_text_len=min(c.data.max_text_len, 32), num_eval=min(c.data.num_eval, 5000))
  return c
