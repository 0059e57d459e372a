"""The error DICOM import raises for input it cannot use."""

from __future__ import annotations


class DicomImportError(ValueError):
    """The DICOM input cannot be turned into a case; the message says what is wrong and where."""
