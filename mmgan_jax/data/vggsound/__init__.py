"""VGGSound as a TFDS dataset (built locally from user-downloaded clips; there is no public TFDS builder).

Importing `mmgan_jax.data.vggsound.vggsound_dataset_builder` registers the builder under the TFDS name
`vggsound` (TFDS convention: a builder lives in a package, in `<name>_dataset_builder.py`). This package file
stays light on purpose: importing it does not import TensorFlow, TFDS or PyAV.

  python launch/prepare_vggsound.py --manual_dir=DIR --data_dir=OUT      # build the array_record shards
  from mmgan_jax.data.vggsound import vggsound_dataset_builder  # noqa: F401  (registers `vggsound`)
  source = tfds.data_source('vggsound', data_dir=OUT, split='train')
"""
