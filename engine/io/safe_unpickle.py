"""Read pickled data that may only hold numpy arrays, numpy scalars and plain builtins.

Unpickling an untrusted file runs whatever callables it names (``os.system`` and friends). This
unpickler resolves only the handful of globals numpy needs to rebuild arrays, dtypes and
scalars, plus a few inert builtin types; any other global stops the load with
:class:`UnsafePickleError` before anything is called. Dicts, lists, tuples, strings, bytes,
numbers, booleans and None need no globals at all.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy_format

_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
})


class UnsafePickleError(ValueError):
    """The pickle names something other than numpy arrays and plain data."""


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that admits only numpy array machinery and inert builtins."""

    def __init__(self, file: IO[bytes], source: str = "pickle"):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"{self._source}: refused to load: it asks for {module}.{name}, but only numpy "
                f"arrays and plain Python values are accepted (nothing was executed)")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused to load: persistent ids are not "
                                f"accepted")


def safe_loads(data: bytes, source: str = "pickle") -> Any:
    """Unpickle bytes with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), source).load()


def _read_npy(fp: IO[bytes], source: str) -> np.ndarray:
    version = npy_format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"{source}: unsupported .npy version {version}")
    if dtype.hasobject:
        array = RestrictedUnpickler(fp, source).load()
        if not isinstance(array, np.ndarray):
            raise UnsafePickleError(f"{source}: the pickled object is not an array")
        return array
    count = int(np.prod(shape))
    data = np.frombuffer(fp.read(count * dtype.itemsize), dtype=dtype, count=count)
    return data.reshape(shape, order="F" if fortran else "C")


def load_npz_restricted(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file; object arrays are unpickled with the restricted rules.

    Raises:
        UnsafePickleError: an object array names a callable or class that is not allowed.
        ValueError: not a readable ``.npz`` file.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not an .npz (zip) file") from None
    out = {}
    with archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as fp:
                try:
                    out[member[:-4]] = _read_npy(fp, f"{path.name}:{member}")
                except UnsafePickleError:
                    raise
                except (ValueError, EOFError, pickle.UnpicklingError) as exc:
                    raise ValueError(f"{path}: cannot read {member} ({exc})") from None
    return out
