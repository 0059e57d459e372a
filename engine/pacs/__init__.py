"""DICOM networking: DosePilot as a query/retrieve and storage client of a PACS or TPS, and as a
DICOM node of its own.

One module per job, no Qt, thin commands on top (``engine/commands/pacs_cmd.py``,
``engine/commands/listen_cmd.py``):

* :mod:`engine.pacs.nodes`: remote nodes, the local AE title and the settings file they persist in;
* :mod:`engine.pacs.errors`: the specific errors (unreachable, rejected, aborted, timed out,
  incomplete retrieve), all :class:`engine.errors.UserError`;
* :mod:`engine.pacs.tls`: TLS contexts for associations;
* :mod:`engine.pacs.sop`: the SOP classes and presentation contexts DosePilot asks for or accepts;
* :mod:`engine.pacs.association`: opening an association with clear errors, C-ECHO;
* :mod:`engine.pacs.query`: C-FIND at patient, study and series level;
* :mod:`engine.pacs.store`: the local study store (one folder per patient and study, staged,
  committed only when complete, never overwriting a different object);
* :mod:`engine.pacs.retrieve`: C-MOVE and C-GET into the store;
* :mod:`engine.pacs.send`: C-STORE of files (DosePilot's RTPLAN, RTDOSE, reports);
* :mod:`engine.pacs.listener`: the Storage SCP node (allowed senders, quiet-period grouping);
* :mod:`engine.pacs.results` and :mod:`engine.pacs.auto_predict`: what the node writes and sends
  back after predicting a received study (RTDOSE, DVH report as Encapsulated PDF).

pynetdicom is imported by the modules that talk DICOM, never at ``import engine.pacs``.
"""
