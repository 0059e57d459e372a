"""Readers and writers: DICOM RT and the public datasets, each giving an `engine.case.Case`."""
