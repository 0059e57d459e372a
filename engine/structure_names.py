"""Clinical ROI names to canonical names and planning roles.

Clinics spell the same organ many ways ("Parotid_L", "L Parotid", "LeftParotid", "Lt_Parotid").
:func:`canonical_name` maps them case-insensitively to one canonical spelling (TG-263-like, e.g.
``Parotid_L``); :func:`guess_role` classifies a name as target / OAR / external / other when the
RTSTRUCT's RTROIObservations do not say; :func:`prescription_from_name` reads the dose from a
target name ("PTV70", "PTV_70", "PTV 70Gy", "PTV_7000" in cGy).
"""

from __future__ import annotations

import re

from engine.case import Role

# canonical name -> spellings (compared after lower-casing and removing spaces, _ - . + /)
_MIDLINE: dict[str, tuple[str, ...]] = {
    "SpinalCord": ("spinalcord", "cord", "spinal", "myelon", "spinecord", "medulla"),
    "Brainstem": ("brainstem", "stem", "truncus"),
    "Brain": ("brain", "cerebrum"),
    "Mandible": ("mandible", "bonemandible", "jaw", "mandibula"),
    "Larynx": ("larynx", "glotticlarynx", "supraglotticlarynx"),
    "Esophagus": ("esophagus", "oesophagus", "esoph", "oesoph"),
    "OpticChiasm": ("opticchiasm", "chiasm", "chiasma"),
    "OralCavity": ("oralcavity", "oral", "mouth", "cavityoral"),
    "Pharynx": ("pharynx", "pharyngealconstrictors", "constrictors"),
    "Trachea": ("trachea",),
    "Lips": ("lips", "lip"),
    "Thyroid": ("thyroid", "thyroidgland"),
    "Heart": ("heart", "cor"),
    "Lungs": ("lungs", "lungtotal", "totallung", "lungsboth", "bothlungs", "lungsminusgtv"),
    "Liver": ("liver",),
    "Stomach": ("stomach",),
    "Bowel": ("bowel", "smallbowel", "bowelsmall", "bowelbag", "bowels"),
    "Rectum": ("rectum",),
    "Bladder": ("bladder", "urinarybladder"),
    "Body": ("body", "external", "skin", "outline", "patient", "bodycontour", "ext",
             "patientoutline", "externalcontour"),
}
_LATERAL: dict[str, tuple[str, ...]] = {
    "Parotid": ("parotid", "parotidgland", "parotis"),
    "Submandibular": ("submandibular", "submandibulargland", "submand", "smg"),
    "OpticNerve": ("opticnerve", "opticnrv", "nerveoptic", "on"),
    "Eye": ("eye", "globe", "eyeball"),
    "Lens": ("lens",),
    "Cochlea": ("cochlea",),
    "Lung": ("lung",),
    "Kidney": ("kidney",),
    "FemoralHead": ("femoralhead", "femurhead", "headfemur", "femur", "femoral"),
    "BrachialPlexus": ("brachialplexus", "plexus"),
}
_LEFT = {"l", "lt", "left", "li", "sin"}
_RIGHT = {"r", "rt", "right", "re", "dx"}
_TARGET_KINDS = ("ptv", "ctv", "gtv", "itv")
# tokens marking helper structures (optimisation rings, dose shells, couch...): role "other"
_HELPER_TOKENS = {"ring", "opt", "optimization", "avoid", "dummy", "tuning", "help", "helper",
                  "shell", "couch", "table", "support", "marker", "bolus", "iso", "isocenter",
                  "ctvopt", "ptvopt", "eval", "z", "zz", "x", "xx", "artifact", "artefact"}
_PRV = re.compile(r"prv|\+\s*\d+\s*mm|_\d+mm$", re.IGNORECASE)

_ALIASES: dict[str, str] = {}
for _canon, _spellings in _MIDLINE.items():
    for _s in _spellings:
        _ALIASES[_s] = _canon
_LATERAL_ALIASES: dict[str, str] = {s: c for c, ss in _LATERAL.items() for s in ss}


def _tokens(name: str) -> list[str]:
    """Lower-case word tokens: splits separators, camelCase and letter/digit boundaries."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    spaced = re.sub(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])", " ", spaced)
    return [t for t in re.split(r"[\s_\-.+/,()\[\]]+", spaced.lower()) if t]


def _lateral(tokens: list[str]) -> tuple[str | None, list[str]]:
    """The side ('L', 'R' or None) named by a leading or trailing token, and the other tokens."""
    if len(tokens) > 1:
        for token, rest in ((tokens[0], tokens[1:]), (tokens[-1], tokens[:-1])):
            if token in _LEFT:
                return "L", rest
            if token in _RIGHT:
                return "R", rest
    return None, tokens


def _target_kind(tokens: list[str]) -> str | None:
    """'PTV', 'CTV', 'GTV' or 'ITV' when the name starts with one ("GTVp", "PTV_70"), else None."""
    if tokens and tokens[0][:3] in _TARGET_KINDS:
        return tokens[0][:3].upper()
    return None


def _is_helper(tokens: list[str]) -> bool:
    """True for optimisation/helper structures ("Ring_PTV", "PTVopt", "z_Parotid")."""
    first = tokens[0][3:] if _target_kind(tokens) else tokens[0]
    return first in _HELPER_TOKENS or any(t in _HELPER_TOKENS for t in tokens[1:])


def prescription_from_name(name: str) -> float | None:
    """The dose in Gy written in a target's name, or None.

    "PTV70", "PTV_70", "PTV 70Gy", "PTV70.0" -> 70.0; "PTV_7000" or "PTV 5400cGy" -> centigray
    converted; "PTV_1" or "PTV_high" -> None (an index or a label, not a dose).
    """
    m = re.search(r"(?<![\d.])(\d+(?:[.,]\d+)?)\s*(c?gy)?(?![\d.])", name, re.IGNORECASE)
    if not m or _target_kind(_tokens(name)) is None:
        return None
    value = float(m.group(1).replace(",", "."))
    unit = (m.group(2) or "").lower()
    if unit == "cgy" or (not unit and 1000 <= value <= 20000):
        value /= 100.0
    return value if 10.0 <= value <= 200.0 else None


def canonical_name(name: str) -> str | None:
    """The canonical spelling of a clinical ROI name, or None when it is not recognised.

    Targets map to their kind and dose ("PTV 70Gy" -> "PTV70"); PRVs and helper structures
    ("Cord_PRV5", "Ring_PTV") are not mapped onto the organ they surround.
    """
    tokens = _tokens(name)
    if not tokens:
        return None
    kind = _target_kind(tokens)
    if _is_helper(tokens):
        return None
    if kind is not None:
        dose = prescription_from_name(name)
        return f"{kind}{dose:g}" if dose is not None else None
    if _PRV.search(name):
        return None
    side, rest = _lateral(tokens)
    key = "".join(rest)
    if side is None:
        if key in _ALIASES:
            return _ALIASES[key]
        if key in _LATERAL_ALIASES:
            return None  # a paired organ without a side
        # a side fused onto the organ name: "parotidl", "lparotid", "lungr"
        for fused, organ in ((key[:-1], key[-1]), (key[1:], key[0])):
            if fused in _LATERAL_ALIASES and organ in ("l", "r"):
                return f"{_LATERAL_ALIASES[fused]}_{organ.upper()}"
        if key.startswith(("left", "right")):
            side_word = "left" if key.startswith("left") else "right"
            organ_key = key[len(side_word):]
            if organ_key in _LATERAL_ALIASES:
                return f"{_LATERAL_ALIASES[organ_key]}_{side_word[0].upper()}"
        return None
    if key in _LATERAL_ALIASES:
        return f"{_LATERAL_ALIASES[key]}_{side}"
    if key == "lungs":
        return f"Lung_{side}"
    return None


def guess_role(name: str) -> Role:
    """A planning role from the name alone (fallback when the RTSTRUCT gives no type)."""
    tokens = _tokens(name)
    if not tokens:
        return Role.OTHER
    if _is_helper(tokens):
        return Role.OTHER
    if _target_kind(tokens) is not None:
        return Role.TARGET
    if _PRV.search(name):
        return Role.OAR
    canon = canonical_name(name)
    if canon == "Body":
        return Role.EXTERNAL
    if canon is not None:
        return Role.OAR
    return Role.OTHER


# RTROIInterpretedType (DICOM PS3.3 C.8.8.8) -> role; ORGAN is also what many exporters write
# for every ROI, so a target or body *name* wins over it (see role_from_observation).
_INTERPRETED: dict[str, Role] = {
    "EXTERNAL": Role.EXTERNAL,
    "PTV": Role.TARGET, "CTV": Role.TARGET, "GTV": Role.TARGET,
    "TREATED_VOLUME": Role.TARGET, "IRRAD_VOLUME": Role.TARGET,
    "ORGAN": Role.OAR, "AVOIDANCE": Role.OAR, "OAR": Role.OAR,
    "BOLUS": Role.OTHER, "SUPPORT": Role.OTHER, "FIXATION": Role.OTHER, "MARKER": Role.OTHER,
    "ISOCENTER": Role.OTHER, "REGISTRATION": Role.OTHER, "CONTROL": Role.OTHER,
    "CAVITY": Role.OTHER, "CONTRAST_AGENT": Role.OTHER, "DOSE_REGION": Role.OTHER,
    "BRACHY_CHANNEL": Role.OTHER, "BRACHY_ACCESSORY": Role.OTHER,
    "BRACHY_SRC_APP": Role.OTHER, "BRACHY_CHNL_SHLD": Role.OTHER,
}


def role_from_observation(interpreted_type: str | None, name: str) -> tuple[Role, bool]:
    """The role of an ROI from its RTROIInterpretedType, falling back on its name.

    Returns ``(role, from_name)``; ``from_name`` is True when the name decided (no or unknown
    type, or a generic ORGAN type on a ROI whose name says target or body).
    """
    kind = (interpreted_type or "").strip().upper()
    by_name = guess_role(name)
    if kind in _INTERPRETED:
        role = _INTERPRETED[kind]
        if kind == "ORGAN" and by_name in (Role.TARGET, Role.EXTERNAL):
            return by_name, True
        return role, False
    return by_name, True
