"""RTPLAN to beams and prescription.

Static beams take their gantry angle from the first control point; an arc (a gantry rotation
direction CW/CC on the first control point, or gantry angles that change between control points)
keeps every control point's angle in delivery order. Setup beams (TreatmentDeliveryType SETUP)
are not treatment beams and are left out. The prescription comes from DoseReferenceSequence
(TargetPrescriptionDose of the TARGET references; per-ROI when the reference names a ROI) and,
failing that, from the fraction group's beam doses.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from engine.case import Beam, PatientPosition, Plan, Technique
from engine.io.dicom_errors import DicomImportError


@dataclass(frozen=True)
class PlanInfo:
    """A parsed RTPLAN: the plan, per-ROI target prescriptions and what was noticed."""

    plan: Plan
    roi_prescriptions_gy: dict[int, float]
    structure_set_uid: str
    notes: tuple[str, ...] = ()


def _float(value: object, default: float | None = None) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _first(cps: list[Dataset], keyword: str) -> object:
    """The value of ``keyword`` on the first control point that carries it."""
    for cp in cps:
        if keyword in cp and cp.get(keyword) is not None and cp.get(keyword) != "":
            return cp.get(keyword)
    return None


def _beam(item: Dataset, index: int, notes: list[str]) -> Beam | None:
    number = int(_float(item.get("BeamNumber"), index + 1) or index + 1)
    name = str(item.get("BeamName") or item.get("BeamDescription") or f"Beam {number}").strip()
    if str(item.get("TreatmentDeliveryType", "TREATMENT")).upper() == "SETUP":
        notes.append(f"setup beam {name!r} is not a treatment beam; left out")
        return None
    cps = list(item.get("ControlPointSequence", None) or [])
    if not cps:
        notes.append(f"beam {name!r} has no control points; left out")
        return None
    gantry = [_float(cp.get("GantryAngle")) for cp in cps if "GantryAngle" in cp]
    gantry = [g for g in gantry if g is not None]
    if not gantry:
        notes.append(f"beam {name!r} has no gantry angle; left out")
        return None
    iso = _first(cps, "IsocenterPosition")
    try:
        iso_mm = tuple(float(v) for v in iso)  # type: ignore[union-attr]
        if len(iso_mm) != 3:
            raise ValueError
    except (TypeError, ValueError):
        notes.append(f"beam {name!r} has no isocentre; left out")
        return None
    rotation = str(cps[0].get("GantryRotationDirection", "NONE") or "NONE").upper()
    is_arc = rotation in ("CW", "CC") or len({round(g, 3) for g in gantry}) > 1
    if is_arc and len(gantry) < 2:
        notes.append(f"arc beam {name!r} has a single gantry angle; read as static")
        is_arc = False
    energy = _float(_first(cps, "NominalBeamEnergy"), 6.0)
    sad = _float(item.get("SourceAxisDistance"), 1000.0)
    return Beam(
        name=name, number=number, gantry_deg=gantry[0], isocenter_mm=iso_mm,
        couch_deg=_float(_first(cps, "PatientSupportAngle"), 0.0) or 0.0,
        collimator_deg=_float(_first(cps, "BeamLimitingDeviceAngle"), 0.0) or 0.0,
        technique=Technique.ARC if is_arc else Technique.STATIC,
        control_point_gantry_deg=tuple(gantry) if is_arc else (),
        sad_mm=sad or 1000.0, energy_mv=energy or 6.0)


def _prescriptions(ds: Dataset, fractions: int, notes: list[str]) -> tuple[float | None,
                                                                           dict[int, float]]:
    by_roi: dict[int, float] = {}
    targets: list[float] = []
    for ref in ds.get("DoseReferenceSequence", []):
        dose = _float(ref.get("TargetPrescriptionDose"))
        if dose is None or str(ref.get("DoseReferenceType", "")).upper() != "TARGET":
            continue
        targets.append(dose)
        roi = ref.get("ReferencedROINumber")
        if roi is not None and str(ref.get("DoseReferenceStructureType", "")).upper() in (
                "VOLUME", "SITE", ""):
            by_roi[int(roi)] = dose
    if targets:
        return max(targets), by_roi
    total = 0.0
    for group in ds.get("FractionGroupSequence", [])[:1]:
        for ref in group.get("ReferencedBeamSequence", []):
            total += _float(ref.get("BeamDose"), 0.0) or 0.0
    if total > 0:
        notes.append("no target prescription in DoseReferenceSequence; prescription taken as "
                     f"the sum of beam doses x fractions ({total * fractions:.2f} Gy)")
        return total * fractions, by_roi
    return None, by_roi


def read_rtplan(ds: Dataset, default_position: str | None = None) -> PlanInfo:
    """Parse an RTPLAN dataset (photon/electron BeamSequence)."""
    notes: list[str] = []
    if "BeamSequence" not in ds:
        kind = "ion (proton/carbon)" if "IonBeamSequence" in ds else "brachytherapy or empty"
        raise DicomImportError(f"RTPLAN {ds.get('RTPlanLabel', '')!r} is an {kind} plan; "
                               "DosePilot reads external photon beam plans")
    beams = [b for i, item in enumerate(ds.BeamSequence) if (b := _beam(item, i, notes))]
    groups = ds.get("FractionGroupSequence", [])
    fractions = int(_float(groups[0].get("NumberOfFractionsPlanned"), 1) or 1) if groups else 1
    prescription, by_roi = _prescriptions(ds, fractions, notes)
    setup = ds.get("PatientSetupSequence", [])
    position = str(setup[0].get("PatientPosition", "") or "").upper() if setup else ""
    position = position or (default_position or "")
    if position not in PatientPosition.__members__:
        notes.append(f"patient position {position or 'missing'!r} not recognised; assuming HFS")
        position = "HFS"
    isos = {b.isocenter_mm for b in beams}
    if len(isos) > 1:
        notes.append(f"the plan's beams use {len(isos)} different isocentres")
    ss = ds.get("ReferencedStructureSetSequence", [])
    plan = Plan(beams=tuple(beams), fractions=fractions, prescription_gy=prescription,
                patient_position=PatientPosition(position),
                name=str(ds.get("RTPlanLabel") or ds.get("RTPlanName") or "Plan").strip())
    return PlanInfo(plan=plan, roi_prescriptions_gy=by_roi,
                    structure_set_uid=str(ss[0].get("ReferencedSOPInstanceUID", "")) if ss else "",
                    notes=tuple(notes))
