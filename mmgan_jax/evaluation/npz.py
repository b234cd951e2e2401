"""Reading an .npz of plain arrays with errors that say what is wrong with the file.

`np.load` falls back to unpickling whatever is not a zip or .npy file, so a truncated download or a text file
reads as "Cannot load file containing pickled data when allow_pickle=False" -- true, and no help. `read_arrays`
checks the file's first bytes, refuses object arrays (pickles) and arrays larger than the file could hold
uncompressed many times over (a zip bomb), and names the file and the problem.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

_ZIP_MAGIC = b'PK\x03\x04'
_MAX_EXPANSION = 1000  # an array may be at most this many times the file's size (zip deflate stays far below)


def read_arrays(path: str, what: str) -> dict[str, np.ndarray]:
  """All arrays of the .npz at `path`; ValueError naming `what` the file should be and what is wrong with it.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not an .npz (the first bytes say what it is instead), truncated or corrupt, pickled object
      arrays, or an array too large for the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} not found: {path}')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
  if not head.startswith(_ZIP_MAGIC):
    kind = 'empty' if not head else ('a single .npy array' if head.startswith(b'\x93NUMPY') else
                                     f'not an .npz archive (it starts with {head!r})')
    raise ValueError(f'{path} is {kind}; expected {what} (an .npz archive of arrays).')
  try:
    with zipfile.ZipFile(path) as z:
      for info in z.infolist():
        if info.file_size > _MAX_EXPANSION * max(size, 1) + 2**20:
          raise ValueError(f'{path}: the member {info.filename} claims {info.file_size:,} bytes from a '
                           f'{size:,}-byte file; refusing it (expected {what}).')
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (zipfile.BadZipFile, EOFError, OSError) as e:
    raise ValueError(f'{path} is truncated or corrupt ({type(e).__name__}: {e}); expected {what}.') from None
  except ValueError as e:
    if 'pickle' in str(e):
      raise ValueError(f'{path} holds Python objects (pickled), which are not loaded; expected {what} as '
                       'plain numeric arrays.') from None
    raise ValueError(f'{path} could not be read as {what}: {e}') from None
