"""The dose refiner: a per-voxel correction of the decoded dose around the targets.

The DiT predicts the dose as latents of 4 x 8 x 8 model-grid voxels (8 x 20 x 20 mm), and the
decoders cannot draw a PTV's edge from them: on the 33 OpenKBP validation patients the model
before this component put the PTVs' D99 and D95 21.9 and 12.9 Gy too low on average, its dose
falling off inside the targets. The prescription map, though, is an input the model grid holds
at full resolution. The refiner sees, per voxel near the targets, the decoded dose and where the
voxel lies relative to the targets, and adds a learned correction::

    refined = max(0, dose + mlp(features))          (Gy, model grid)

Features (:data:`FEATURES`; doses divided by ``reference_gy``, distances by ``near_mm``):

0. the decoded dose;
1. the prescription at the voxel (0 outside every target);
2. the prescription of the nearest target voxel;
3. the case's highest prescription;
4. the signed distance to the surface of all targets (mm, negative inside), clipped to
   ``[-near_mm, band_mm]``;
5. the same for the highest-prescription target;
6. with ``beam_plate`` set: the plan's beam plate at the voxel divided by the number of gantry
   angles summed (:func:`beam_fraction`; about 1 inside the targets, where every beam passes,
   and the share of the beams whose path crosses the voxel outside them, inverse-square
   weighted). The DiT sees the same plate only through latents of 8 x 20 x 20 mm; here the
   correction can follow a beam's edge at the model grid's resolution.
7. with ``quick_plan`` set: the plan's quick-plan dose at the voxel
   (:mod:`engine.physics.quick_plan`: the physics objectives optimised on the physics' own
   pencil beam, cut short, in a fraction of a second). It carries what no geometric beam input
   does, the optimiser's fluence response to the arrangement: on the held-out pairs its own
   dose change correlates 0.63 with the physics change.
8. with ``clinical_style`` set: 1 for a clinical plan, 0 for a generated physics plan; always 1
   when the engine predicts. The training set's clinical plans (one fixed arrangement) and
   physics plans (many) differ in style as well as in beams; with this input the fit can keep
   the two apart. Alone it made the validation dose more accurate (preview dose score 4.18
   instead of 4.28 Gy) but the clinical-style dose followed a beam *less* (the fit tied a beam's
   effect to the physics style, as every clinical plan has the same beams); with the trainer's
   beam pairs fed in the clinical style (:func:`trainer.stages.dose_refiner.pair_inputs`) it
   follows beams better than without the input and is as accurate (the shipped model since
   2026-12-08; ``resources/models/default/MODEL_CARD.md``).

With ``dit_class_solution`` (the shipped model since 2026-12-08 night) the engine shows the DiT
the nine-field class solution whatever the plan (:func:`dit_plan`), so that the plan's beams
reach the dose through features 6 and 7 alone. The DiT's own response to a moved beam was mostly
noise against the physics change: on the one-beam benchmark, with the DiT's dose held at the
unmoved plan's, the refiner's change correlated 0.46 with physics, the whole model's 0.37.
Fitted so (its samples' dose input is the class solution's preview), the refiner follows one
moved beam with a correlation of 0.47 instead of 0.37 at the same validation accuracy, but
changes the dose less (0.23 of the physics change instead of 0.33), and the engine runs the DiT
once per case instead of once per plan.

Features 1-5 depend on the case and isocentre only (:func:`target_geometry`, computed once per
case), features 6 and 7 on the plan, feature 0 on each prediction. Voxels farther than ``band_mm``
outside every target, or outside the body, keep their dose: that bounds the cost (a preview
must stay under 1 s) and leaves the low-dose bath, which the correction was not fitted for, to
the model. Trained by the trainer's ``dose-refiner`` stage (:mod:`trainer.stages.dose_refiner`)
on the bundle's own previews of the training cases, so it corrects what this bundle's decoders
get wrong; with the beam plate, on plans of several beam arrangements per patient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from engine.case import Beam, Plan
from engine.io.openkbp import GANTRY_ANGLES_DEG

FEATURES: tuple[str, ...] = ("dose", "prescription", "nearest_prescription", "max_prescription",
                             "distance_to_targets", "distance_to_primary")
BEAM_FEATURE = "beam_fraction"
QUICK_FEATURE = "quick_plan_dose"
STYLE_FEATURE = "clinical_plan"
N_GEOMETRY = len(FEATURES) - 1
# rows of the network evaluated at once: keeps the hidden activations (rows x hidden floats)
# in cache; one 1M-row call is 3x slower on a 2-core VM
CHUNK = 65536
# the class solution a refiner with ``dit_class_solution`` shows the DiT: the arrangement of
# every OpenKBP clinical plan (nine equispaced fields from 0 degrees), on which it is fitted
CLASS_SOLUTION_DEG: tuple[float, ...] = GANTRY_ANGLES_DEG


@dataclass(frozen=True)
class RefinerConfig:
    """Sizes and scales of the refiner (they travel with its weights in the bundle).

    ``hidden``: width of the two hidden layers; ``reference_gy``: dose scale of the features;
    ``near_mm``: the depth inside a target beyond which the distance features saturate;
    ``band_mm``: voxels farther than this outside every target are not corrected;
    ``beam_plate``: the plan's beam plate is an input (feature 6 of the module docstring);
    ``quick_plan``: the plan's quick-plan dose is an input (feature 7);
    ``clinical_style``: the plan's style is an input (feature 8);
    ``quick_plan_model``: with ``quick_plan``, the dose model of the quick plan the refiner was
    fitted on (:data:`engine.physics.quick_plan.DOSE_MODEL`). The refiner's weights are only
    right for that dose: the engine refuses a bundle whose refiner read another (or did not
    record which, as bundles made before 2026-12-07 do not);
    ``dit_class_solution``: the DiT is given the class-solution arrangement
    (:func:`dit_plan`) instead of the plan's own beams, so that the plan's arrangement reaches
    the dose through the refiner's beam inputs only;
    ``quick_plan_samples`` / ``quick_plan_max_iter``: with ``quick_plan``, the quick plan's
    voxel sample (a third as many again per target) and iteration cap
    (:class:`engine.physics.quick_plan.QuickPlanSettings`); the engine computes the quick plan
    the refiner was fitted on.
    """

    hidden: int = 32
    reference_gy: float = 70.0
    near_mm: float = 30.0
    band_mm: float = 60.0
    beam_plate: bool = False
    quick_plan: bool = False
    quick_plan_model: str = ""
    clinical_style: bool = False
    dit_class_solution: bool = False
    quick_plan_samples: int = 6000
    quick_plan_max_iter: int = 50

    def __post_init__(self) -> None:
        if (self.hidden < 1 or self.reference_gy <= 0 or self.near_mm <= 0 or self.band_mm <= 0
                or self.quick_plan_samples < 3 or self.quick_plan_max_iter < 1):
            raise ValueError(f"invalid refiner config {self}")

    @property
    def features(self) -> tuple[str, ...]:
        """The names of the network's inputs, in order."""
        return (FEATURES + ((BEAM_FEATURE,) if self.beam_plate else ())
                + ((QUICK_FEATURE,) if self.quick_plan else ())
                + ((STYLE_FEATURE,) if self.clinical_style else ()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RefinerConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown refiner config keys {sorted(unknown)}; expected some of "
                             f"{sorted(known)}")
        return cls(**values)


def dit_plan(plan: Plan, config: RefinerConfig | None) -> Plan:
    """The plan whose beams the DiT is given: ``plan`` itself, or with
    ``config.dit_class_solution`` the class solution of :data:`CLASS_SOLUTION_DEG` (coplanar
    static fields at the plan's isocentre, in its patient position)."""
    if config is None or not config.dit_class_solution:
        return plan
    iso = plan.isocenter_mm
    return plan.with_beams([Beam(name=f"G{int(a):03d}", gantry_deg=a, isocenter_mm=iso,
                                 number=i + 1) for i, a in enumerate(CLASS_SOLUTION_DEG)])


@dataclass(frozen=True)
class TargetGeometry:
    """The voxels a refiner corrects and their dose-independent features.

    ``index``: flat (C-order) indices into the model grid of shape ``shape``; ``features``:
    float32 ``(len(index), N_GEOMETRY)``, features 1-5 of the module docstring.
    """

    shape: tuple[int, int, int]
    index: np.ndarray
    features: np.ndarray


def _signed_distance(mask: np.ndarray, spacing_mm: tuple[float, float, float]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) to the surface of ``mask`` (positive outside, negative inside) and, per
    voxel, the index ``(3, *shape)`` of the nearest ``mask`` voxel (its own inside)."""
    outside, nearest = ndimage.distance_transform_edt(~mask, sampling=spacing_mm,
                                                      return_indices=True)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    return np.where(mask, -inside, outside), nearest


def target_geometry(prescription_gy: np.ndarray, body: np.ndarray,
                    spacing_mm: tuple[float, float, float],
                    config: RefinerConfig) -> TargetGeometry:
    """Features 1-5 of the body voxels within ``config.band_mm`` of a target.

    Args:
        prescription_gy: per voxel of the model grid ``(z, y, x)``, the highest prescription
            (Gy) of the targets covering it, 0 elsewhere.
        body: bool, same shape: the patient's outline.
        spacing_mm: the grid's voxel size along (z, y, x).

    Raises:
        ValueError: no voxel carries a prescription.
    """
    rx = np.asarray(prescription_gy, dtype=np.float32)
    targets = rx > 0
    if not targets.any():
        raise ValueError("the refiner needs a target with a prescription on the model grid")
    top = rx.max()
    distance, nearest = _signed_distance(targets, spacing_mm)
    keep = np.asarray(body, dtype=bool) & (distance <= config.band_mm)
    index = np.flatnonzero(keep)
    near_rx = rx[tuple(n.ravel()[index] for n in nearest)]
    primary = _signed_distance(rx >= top, spacing_mm)[0].ravel()[index]
    ref, lo = config.reference_gy, -config.near_mm
    features = np.stack([
        rx.ravel()[index] / ref,
        near_rx / ref,
        np.full(index.shape, top / ref, dtype=np.float32),
        np.clip(distance.ravel()[index], lo, config.band_mm) / config.near_mm,
        np.clip(primary, lo, config.band_mm) / config.near_mm,
    ], axis=1).astype(np.float32)
    return TargetGeometry(shape=tuple(rx.shape), index=index, features=features)


def beam_fraction(beam_plate: np.ndarray, n_angles: float,
                  geometry: TargetGeometry) -> np.ndarray:
    """Feature 6 of the voxels of ``geometry``: the summed beam plate on the model grid
    (:func:`engine.features.plates.plan_plates`) divided by the number of angles it sums."""
    plate = np.asarray(beam_plate, dtype=np.float32)
    if plate.shape != geometry.shape:
        raise ValueError(f"beam plate grid {plate.shape} != the refiner geometry's "
                         f"{geometry.shape}")
    return plate.ravel()[geometry.index] / np.float32(max(float(n_angles), 1.0))


def refiner_inputs(dose_gy: np.ndarray, geometry: TargetGeometry, config: RefinerConfig,
                   beam: np.ndarray | None = None, quick: np.ndarray | None = None,
                   clinical: bool = True) -> np.ndarray:
    """The network's input rows ``(len(geometry.index), len(config.features))`` for one dose
    (Gy); ``beam``: :func:`beam_fraction` of the plan, required when ``config.beam_plate``;
    ``quick``: the plan's quick-plan dose (Gy) at the geometry's voxels, required when
    ``config.quick_plan``; ``clinical``: the style input when ``config.clinical_style``
    (predictions are of clinical plans)."""
    dose = np.asarray(dose_gy, dtype=np.float32).ravel()[geometry.index] / config.reference_gy
    columns = [dose[:, None], geometry.features]
    if config.beam_plate:
        if beam is None or beam.shape != geometry.index.shape:
            raise ValueError("this refiner reads the plan's beam plate: pass beam_fraction(...) "
                             "of the plan for the geometry's voxels")
        columns.append(np.asarray(beam, dtype=np.float32)[:, None])
    if config.quick_plan:
        if quick is None or quick.shape != geometry.index.shape:
            raise ValueError("this refiner reads the plan's quick-plan dose: pass it for the "
                             "geometry's voxels")
        columns.append(np.asarray(quick, dtype=np.float32)[:, None] / config.reference_gy)
    if config.clinical_style:
        columns.append(np.full((len(geometry.index), 1), float(clinical), np.float32))
    return np.concatenate(columns, axis=1)


class DoseRefiner(nn.Module):
    """The correction network: ``len(config.features)`` -> hidden -> hidden -> 1, SiLU; it works
    in ``reference_gy`` units like its inputs (so an optimizer step moves Gy-sized corrections)."""

    def __init__(self, config: RefinerConfig | None = None) -> None:
        super().__init__()
        self.config = config or RefinerConfig()
        h = self.config.hidden
        self.net = nn.Sequential(nn.Linear(len(self.config.features), h), nn.SiLU(),
                                 nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Corrections (Gy) ``[N]`` for input rows ``[N, len(FEATURES)]``."""
        return self.net(inputs).squeeze(-1) * self.config.reference_gy

    @torch.inference_mode()
    def refine(self, dose_gy: np.ndarray, geometry: TargetGeometry,
               beam: np.ndarray | None = None, quick: np.ndarray | None = None) -> np.ndarray:
        """``dose_gy`` ``(..., z, y, x)`` on the model grid, corrected around the targets (a new
        float32 array, clipped at 0 Gy; voxels outside ``geometry`` unchanged). ``beam``: the
        plan's :func:`beam_fraction` when the config reads the beam plate; ``quick``: its
        quick-plan dose at the geometry's voxels when the config reads that."""
        doses = np.array(dose_gy, dtype=np.float32)  # a copy: the caller's dose stays as it was
        if doses.shape[-3:] != geometry.shape:
            raise ValueError(f"dose grid {doses.shape[-3:]} != the refiner geometry's "
                             f"{geometry.shape}")
        param = next(self.parameters())
        flat = doses.reshape(-1, int(np.prod(geometry.shape)))
        for row in flat:
            rows = torch.from_numpy(refiner_inputs(row, geometry, self.config, beam, quick))
            correction = torch.cat([self(chunk.to(param.device, param.dtype)).float().cpu()
                                    for chunk in rows.split(CHUNK)])
            row[geometry.index] = np.maximum(row[geometry.index] + correction.numpy(), 0.0)
        return doses
