"""Work around reference-counting bugs in the Qt bindings on Python < 3.12.

PySide6 6.12 on CPython 3.11 hands out references it does not own to two kinds of object:

- ``None`` from every void method (``update()``, ``processEvents()``, ``QPainter.setPen()``,
  ...): each call drops one reference to ``None``;
- ``True`` from ``SignalInstance.emit()``: each emission drops one reference to ``True``.
  pyqtgraph and pyvistaqt emit signals on every repaint, scroll and 3D render: the main window
  loses about 11 references per beam drag (tests/test_gui_rapid_drags.py), and ``True`` starts
  with about 22,000.

When a count reaches zero the interpreter aborts ("Fatal Python error: none_dealloc" /
"bool_dealloc"), in whichever thread makes the last decrement; with ``True`` that is after
about 2,000 beam drags. Python 3.12 made these objects immortal (PEP 683); here we give them a
reference count that no program can exhaust, which is what immortality amounts to. They are
static objects that are never freed, so a larger count changes nothing else. ``False`` is
guarded with ``True``: the bindings return both from the same bool conversion.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# 2**60 references: at a billion lost references per second this lasts over 36 years.
_GUARD = 1 << 60
SINGLETONS = (None, True, False)


def protect_singletons() -> bool:
    """Raise the reference counts of ``None``, ``True`` and ``False`` on CPython < 3.12;
    True when they were raised (or already are)."""
    if sys.version_info >= (3, 12) or platform.python_implementation() != "CPython":
        return False
    for obj in SINGLETONS:
        refcount = ctypes.c_ssize_t.from_address(id(obj))  # ob_refcnt is PyObject's first field
        if refcount.value < _GUARD:
            refcount.value += _GUARD
    return True
