"""The PySide6 + VTK desktop application on top of engine."""

from planner_gui._refcount_guard import protect_singletons

protect_singletons()
