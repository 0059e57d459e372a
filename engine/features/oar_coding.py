"""The OAR channel's index coding, as the GDP-HMM data loader does it (``combine_oar``).

Each organ at risk found in the site's list gets the value ``1 + 4 * idx / 30`` over its mask and
the channel is the voxel-wise maximum (notes/gdp-hmm-challenge.md §2.1 step 5). Names are the
challenge's own (including its quirks: "Chiasim", "-PTV" suffixes); clinical names are matched
through :func:`engine.structure_names.canonical_name`. Parotids are coded ipsilateral or
contralateral to the highest-dose target, by which side of the patient that target's centre is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.case import Case, Role, Structure
from engine.structure_names import canonical_name

HAN_OAR_LIST: tuple[str, ...] = (
    "Cochlea_L", "Cochlea_R", "Eyes", "Lens_L", "Lens_R", "OpticNerve_L", "OpticNerve_R",
    "Chiasim", "LacrimalGlands", "BrachialPlexus", "Brain", "BrainStem_03", "Esophagus", "Lips",
    "Lungs", "Trachea", "Posterior_Neck", "Shoulders", "Larynx-PTV", "Mandible-PTV",
    "OCavity-PTV", "ParotidCon-PTV", "ParotidIps-PTV", "Parotids-PTV", "PharConst-PTV",
    "Submand-PTV", "SubmandL-PTV", "SubmandR-PTV", "Thyroid-PTV", "SpinalCord_05")
LUNG_OAR_LIST: tuple[str, ...] = (
    "PTV_Ring.3-2", "Total Lung-GTV", "SpinalCord", "Heart", "LAD", "Esophagus",
    "BrachialPlexus", "GreatVessels", "Trachea", "Body_Ring0-3")
LUNG_FIRST_INDEX = 10

# canonical clinical name -> challenge name, per site
_HAN_FROM_CANONICAL = {
    "Cochlea_L": "Cochlea_L", "Cochlea_R": "Cochlea_R", "Eye_L": "Eyes", "Eye_R": "Eyes",
    "Lens_L": "Lens_L", "Lens_R": "Lens_R", "OpticNerve_L": "OpticNerve_L",
    "OpticNerve_R": "OpticNerve_R", "OpticChiasm": "Chiasim",
    "BrachialPlexus_L": "BrachialPlexus", "BrachialPlexus_R": "BrachialPlexus",
    "Brain": "Brain", "Brainstem": "BrainStem_03", "Esophagus": "Esophagus", "Lips": "Lips",
    "Lungs": "Lungs", "Lung_L": "Lungs", "Lung_R": "Lungs", "Trachea": "Trachea",
    "Larynx": "Larynx-PTV", "Mandible": "Mandible-PTV", "OralCavity": "OCavity-PTV",
    "Pharynx": "PharConst-PTV", "Submandibular_L": "SubmandL-PTV",
    "Submandibular_R": "SubmandR-PTV", "Thyroid": "Thyroid-PTV", "SpinalCord": "SpinalCord_05",
}
_LUNG_FROM_CANONICAL = {
    "Lungs": "Total Lung-GTV", "SpinalCord": "SpinalCord", "Heart": "Heart",
    "Esophagus": "Esophagus", "BrachialPlexus_L": "BrachialPlexus",
    "BrachialPlexus_R": "BrachialPlexus", "Trachea": "Trachea",
}
_LUNG_ONLY = {"Heart", "Lungs", "Lung_L", "Lung_R", "Total Lung-GTV", "GreatVessels", "LAD"}
_HAN_ONLY = {"Parotid_L", "Parotid_R", "Mandible", "Brainstem", "Larynx", "OralCavity",
             "ParotidIps-PTV", "ParotidCon-PTV", "Mandible-PTV", "BrainStem_03"}


def oar_code(index: int) -> float:
    """GDP-HMM's normalised code of list position ``index`` (1-based)."""
    return 1.0 + 4.0 * index / 30.0


def guess_site(names: Sequence[str]) -> str:
    """'Lung' when the structures name lung-site organs and no head-and-neck ones, else 'HaN'."""
    keys = {canonical_name(n) or n for n in names}
    return "Lung" if keys & _LUNG_ONLY and not keys & _HAN_ONLY else "HaN"


def _centroid_x_mm(structure: Structure, case: Case) -> float:
    """LPS x (mm) of the structure's centroid. The mean index comes from the voxel counts per
    slice, row and column (np.argwhere of a large body would hold 24 bytes per voxel)."""
    mask = structure.mask
    mean_index = [float(np.arange(n) @ np.count_nonzero(mask, axis=other)) for n, other in
                  zip(mask.shape, ((1, 2), (0, 2), (0, 1)))]
    return float(case.geometry.index_to_lps(np.asarray(mean_index) / np.count_nonzero(mask))[0])


def challenge_name(structure: Structure, case: Case, site: str) -> str | None:
    """The GDP-HMM list name a structure is coded as, or None when it is not in the list."""
    names = HAN_OAR_LIST if site == "HaN" else LUNG_OAR_LIST
    for n in names:
        if structure.name.lower() == n.lower():
            return n
    canon = canonical_name(structure.name)
    if canon is None:
        return None
    if site == "HaN" and canon in ("Parotid_L", "Parotid_R"):
        targets = [t for t in case.targets if t.mask.any()]
        if not targets or not structure.mask.any():
            return "Parotids-PTV"
        top = max(targets, key=lambda t: t.prescription_gy or 0.0)
        body = case.external
        if body is not None and body.mask.any():
            midline = _centroid_x_mm(body, case)
        else:
            midline = float(case.geometry.index_to_lps(
                (np.asarray(case.geometry.shape) - 1) / 2.0)[0])
        offset = _centroid_x_mm(top, case) - midline  # > 0: target on the patient's left
        if abs(offset) < 1.0:  # a midline target has no ipsilateral side
            return "Parotids-PTV"
        return "ParotidIps-PTV" if (offset > 0) == (canon == "Parotid_L") else "ParotidCon-PTV"
    table = _HAN_FROM_CANONICAL if site == "HaN" else _LUNG_FROM_CANONICAL
    return table.get(canon)


def oar_codes(case: Case, site: str | None = None) -> list[tuple[Structure, float]]:
    """Each coded organ at risk of the case with its code (site guessed when not given)."""
    oars = [s for s in case.structures if s.role is Role.OAR]
    site = site or guess_site([s.name for s in case.structures])
    names = HAN_OAR_LIST if site == "HaN" else LUNG_OAR_LIST
    first = 1 if site == "HaN" else LUNG_FIRST_INDEX
    out = []
    for s in oars:
        name = challenge_name(s, case, site)
        if name is not None:
            out.append((s, oar_code(first + names.index(name))))
    return out
