"""The PySide6 + VTK desktop application on top of engine."""
