"""From a case and a plan to the seven normalised model inputs (DESIGN §3).

Slots: 0 CT, 1 PTV, 2 OAR, 3 body, 4 dose, 5 beam plate, 6 angle plate; every volume is float32
on the model grid (:mod:`engine.features.model_grid`) with values in [-1, 1]
(:class:`~engine.features.normalization.Normalization`). Label-like channels (PTV prescription
map, OAR codes, body) are composed on the CT grid and resampled once with nearest neighbour;
CT and dose are resampled trilinearly. Outside the CT grid each channel takes its background
(air, no structure, no dose). Dose goes both ways with cubic B-splines, clipped at 0 Gy: on the
OpenKBP doses (zero outside the body, steep edges) a round trip CT grid -> model grid -> CT grid
then keeps 0.05-0.12 Gy mean absolute error inside the body, where trilinear resampling both
ways loses 0.6-0.8 Gy. The beam and angle plates are drawn on the model grid from the
resampled PTV and the plan's beams.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from engine.case import Case, Plan, Volume
from engine.features.model_grid import ModelGridTransform
from engine.features.normalization import Normalization
from engine.features.oar_coding import oar_codes
from engine.features.plates import plan_plates


class Slot(enum.IntEnum):
    CT = 0
    PTV = 1
    OAR = 2
    BODY = 3
    DOSE = 4
    BEAM_PLATE = 5
    ANGLE_PLATE = 6


N_SLOTS = len(Slot)


@dataclass(frozen=True)
class ModelInputs:
    """The seven model-grid volumes of one case and plan.

    Attributes:
        volumes: float32 ``(7, 97, 128, 160)`` in [-1, 1], indexed by :class:`Slot`.
        present: which slots carry data (the dose slot is False when the case has no dose).
        transform: the kept patient <-> model grid transform.
        normalization: the constants used.
        n_angles: number of gantry angles summed into the beam plate.
    """

    volumes: np.ndarray
    present: tuple[bool, ...]
    transform: ModelGridTransform
    normalization: Normalization = field(default_factory=Normalization)
    n_angles: float = 0.0

    def __post_init__(self) -> None:
        self.volumes.flags.writeable = False

    def __getitem__(self, slot: Slot | int) -> np.ndarray:
        return self.volumes[int(slot)]

    def dose_on_patient_grid(self, dose_unit: np.ndarray) -> Volume:
        """A model-grid dose in [-1, 1] (e.g. a prediction) as Gy on the patient's CT grid."""
        return self.transform.dose_to_patient(self.normalization.dose_to_gy(dose_unit))


Box = tuple[slice, slice, slice]


def _label_map(masks: list[tuple[np.ndarray, float]], shape: tuple[int, ...],
               box: Box | None) -> np.ndarray:
    """Per voxel of ``box`` (the whole grid when None), the highest value of the masks covering
    it (0 elsewhere)."""
    out = np.zeros(shape, dtype=np.float32)
    part = box if box is not None else (slice(None),) * 3
    for mask, value in masks:
        if value > 0:
            np.maximum(out, np.float32(value), out=out, where=mask[part])
    return out


def _prescription_map(case: Case, box: Box | None = None) -> np.ndarray:
    """Per CT voxel (of ``box``), the highest prescription (Gy) of the targets covering it."""
    shape = case.geometry.shape if box is None else tuple(b.stop - b.start for b in box)
    return _label_map([(t.mask, t.prescription_gy or 0.0) for t in case.targets], shape, box)


def _oar_map(case: Case, site: str | None, box: Box | None = None) -> np.ndarray:
    """Per CT voxel (of ``box``), the highest OAR code of the organs covering it."""
    shape = case.geometry.shape if box is None else tuple(b.stop - b.start for b in box)
    return _label_map([(s.mask, code) for s, code in oar_codes(case, site)], shape, box)


def build_modalities(case: Case, plan: Plan | None = None,
                     normalization: Normalization | None = None, site: str | None = None,
                     arc_step_deg: float = 4.0, workers: int = 2) -> ModelInputs:
    """The seven normalised model inputs of ``case`` under ``plan`` (default: the case's plan).

    ``workers``: threads drawing the beam plate (:func:`engine.features.plates.beam_plate`).

    Raises:
        ValueError: no plan, a plan without beams, or no target with a prescription.
    """
    plan = plan or case.plan
    if plan is None or not plan.beams:
        raise ValueError(f"case {case.name!r} has no plan with beams: the beam plate needs one")
    norm = normalization or Normalization()
    if not any((t.prescription_gy or 0.0) > 0 and t.mask.any() for t in case.targets):
        raise ValueError(f"case {case.name!r} has no target with a prescription (PTV channel "
                         f"and beam plate need one); structures: "
                         f"{', '.join(s.name for s in case.structures) or 'none'}")
    tf = ModelGridTransform.around(case.geometry, plan.isocenter_mm)
    shape = tf.model.shape
    # label maps are composed on the part of the CT the model grid covers only: a large CT
    # would otherwise need several full-size float32 maps (GBs) for a 2 M-voxel result
    box = tf.patient_box()
    whole = (slice(None),) * 3
    volumes = np.full((N_SLOTS, *shape), -1.0, dtype=np.float32)
    volumes[Slot.CT] = norm.ct(tf.box_to_model(case.ct.array[box or whole], box, order=1,
                                               fill=norm.ct_min_hu))
    rx_model = tf.box_to_model(_prescription_map(case, box), box, order=0, fill=0.0)
    volumes[Slot.PTV] = norm.ptv(rx_model)
    volumes[Slot.OAR] = norm.oar(tf.box_to_model(_oar_map(case, site, box), box, order=0,
                                                 fill=0.0))
    body = case.external
    if body is not None:
        volumes[Slot.BODY] = norm.binary(tf.box_to_model(body.mask[box or whole], box, order=0,
                                                         fill=0))
    if case.dose is not None:
        volumes[Slot.DOSE] = norm.dose(tf.dose_to_model(case.dose.array))
    beam, angle, n_angles = plan_plates(rx_model > 0, tf.model, plan, arc_step_deg, workers)
    volumes[Slot.BEAM_PLATE] = norm.beam_plate(beam, n_angles)
    volumes[Slot.ANGLE_PLATE] = norm.binary(angle)
    present = tuple(bool(p) for p in (True, True, True, body is not None, case.dose is not None,
                                      True, True))
    return ModelInputs(volumes=volumes, present=present, transform=tf, normalization=norm,
                       n_angles=n_angles)
