"""DosePilot's core library: patient model, DICOM I/O, model inputs, DiffKT3D, runtime, metrics.

``engine`` never imports Qt, the GUI or the trainer (DESIGN §1).
"""

__version__ = "0.1.0"
