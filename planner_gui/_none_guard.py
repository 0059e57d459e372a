"""Work around a reference-counting bug in the Qt bindings on Python < 3.12.

PySide6 6.12 on CPython 3.11 returns ``None`` from every void method (``update()``,
``processEvents()``, ``QPainter.setPen()``, ...) without taking a reference, so each call
decrements ``None``'s reference count. A live window makes tens of thousands of such calls a
minute and the interpreter aborts with "Fatal Python error: none_dealloc" within seconds to
minutes. Python 3.12 made ``None`` immortal (PEP 683); here we give it a reference count that no
program can exhaust, which is what immortality amounts to. ``None`` is a static object that is
never freed, so a larger count changes nothing else.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# 2**60 references: at a billion void calls per second this lasts over 36 years.
_GUARD = 1 << 60


def protect_none_refcount() -> bool:
    """Raise ``None``'s reference count on CPython < 3.12; True when it was raised."""
    if sys.version_info >= (3, 12) or platform.python_implementation() != "CPython":
        return False
    refcount = ctypes.c_ssize_t.from_address(id(None))  # ob_refcnt is PyObject's first field
    if refcount.value < _GUARD:
        refcount.value += _GUARD
    return True
