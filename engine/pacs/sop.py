"""The SOP classes and presentation contexts DosePilot asks for (as a client) or accepts (as a
node), and readable names for DIMSE status codes."""

from __future__ import annotations

from pydicom.uid import UID

from engine.io.dicom_modules import (
    CT_IMAGE_STORAGE,
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
#: what a planning node uses: the planning CT, its structure set, the plan and a dose
PLANNING_CLASSES: dict[str, str] = {
    CT_IMAGE_STORAGE: "CT",
    RT_STRUCTURE_SET_STORAGE: "RTSTRUCT",
    RT_PLAN_STORAGE: "RTPLAN",
    RT_DOSE_STORAGE: "RTDOSE",
}


def sop_name(uid: str) -> str:
    """A SOP class UID's name ("CT Image Storage"), or the UID itself when unknown."""
    name = UID(str(uid)).name
    return name if name and name != str(uid) else str(uid)


def status_text(code: int | None) -> str:
    """``0xA900 (Data Set Does Not Match SOP Class)``-style text for a DIMSE status."""
    if code is None:
        return "no status"
    from pynetdicom.status import (
        GENERAL_STATUS,
        QR_FIND_SERVICE_CLASS_STATUS,
        QR_GET_SERVICE_CLASS_STATUS,
        QR_MOVE_SERVICE_CLASS_STATUS,
        STORAGE_SERVICE_CLASS_STATUS,
    )

    for table in (STORAGE_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS,
                  QR_GET_SERVICE_CLASS_STATUS, QR_FIND_SERVICE_CLASS_STATUS, GENERAL_STATUS):
        if code in table:
            return f"0x{code:04X} ({table[code][1]})"
    return f"0x{code:04X}"


def is_failure(code: int) -> bool:
    """Whether a DIMSE status code is a failure (not success, warning, pending or cancel)."""
    from pynetdicom.status import code_to_category

    return code_to_category(code) not in ("Success", "Warning", "Pending", "Cancel")


def storage_contexts_for_get() -> list:
    """Presentation contexts for C-GET: the study-root GET model and every storage class that
    fits next to it (at most 128 contexts in one association)."""
    from pynetdicom import StoragePresentationContexts
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    return ([build_context(StudyRootQueryRetrieveInformationModelGet)]
            + list(StoragePresentationContexts))


def storage_roles_for_get() -> list:
    """SCP/SCU role selection items letting the node send us objects over a C-GET association."""
    from pynetdicom import StoragePresentationContexts, build_role

    return [build_role(cx.abstract_syntax, scp_role=True) for cx in StoragePresentationContexts]
