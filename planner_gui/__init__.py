"""The PySide6 + VTK desktop application on top of engine."""

from planner_gui._none_guard import protect_none_refcount

protect_none_refcount()
