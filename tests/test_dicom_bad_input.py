"""Broken and awkward input: each case gives a specific, readable error or warning, never a
traceback from inside a library, and never modifies the user's files."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from engine.case import Volume
from engine.geometry import grid_around
from engine.io.dicom import DicomImportError, load_dicom_case
from engine.io.dicom_export import write_rtdose
from engine.phantom import PhantomSpec, write_phantom


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small phantom (with a dose covering the body) to derive broken copies from."""
    out = tmp_path_factory.mktemp("bad_source")
    write_phantom(out, PhantomSpec(shape=(10, 40, 48), spacing=(3.0, 3.0, 3.0),
                                   with_dose=True))
    return out


@pytest.fixture()
def patient(source, tmp_path):
    dst = tmp_path / "patient"
    shutil.copytree(source, dst)
    return dst


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path):
    """Load and check that no file changed; returns the case or the DicomImportError."""
    before = _hashes(root)
    try:
        result = load_dicom_case(root)
    except DicomImportError as exc:
        result = exc
    assert _hashes(root) == before, "the import modified input files"
    return result


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _ct(patient: Path) -> list[Path]:
    return sorted((patient / "CT").glob("*.dcm"))


def _error(result, *fragments):
    assert isinstance(result, DicomImportError), f"expected an error, got {result!r}"
    text = str(result)
    for f in fragments:
        assert f in text, text
    return text


def _warned(case, *fragments):
    assert not isinstance(case, Exception), case
    hits = [w for w in case.warnings if all(f in w for f in fragments)]
    assert hits, case.warnings
    return hits[0]


def test_the_clean_source_loads_without_warnings(patient):
    case = _load(patient)
    assert case.warnings == () and len(case.structures) == 11 and case.dose is not None


def test_truncated_ct_slice(patient):
    path = _ct(patient)[4]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _error(_load(patient), "1 slice(s) missing", "CT_0005.dcm", "truncated")


def test_truncated_rtstruct_is_skipped_with_a_warning(patient):
    path = patient / "RTSTRUCT.dcm"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    case = _load(patient)
    _warned(case, "RTSTRUCT.dcm", "truncated")
    assert case.structures == () and case.plan is not None


def test_non_dicom_files_are_skipped(patient):
    (patient / "notes.txt").write_text("patient notes, not DICOM\n")  # a document: quiet
    (patient / "CT" / "scan.jpg").write_bytes(bytes(range(256)) * 10)
    (patient / "empty").write_bytes(b"")
    (patient / "DICOMDIR.bak").write_bytes(b"\x08\x00\x05\x00" + b"\x00" * 4)  # DICOM-like
    case = _load(patient)
    _warned(case, "skipped 2 non-DICOM file(s)")
    _warned(case, "DICOMDIR.bak", "no Modality or SOPClassUID")
    assert len(case.structures) == 11


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.dat").write_text("hello")
    _error(_load(tmp_path), "no CT images found", "1 non-DICOM file(s) skipped")
    _error(_load(tmp_path / "missing"), "does not exist")


def test_missing_pixel_data(patient):
    _edit(_ct(patient)[3], lambda ds: delattr(ds, "PixelData"))
    _error(_load(patient), "CT_0004.dcm", "no pixel data")


def test_short_pixel_data(patient):
    def cut(ds):
        ds.PixelData = ds.PixelData[:100]
    _edit(_ct(patient)[2], cut)
    _error(_load(patient), "CT_0003.dcm", "pixel data is truncated")


def _second_series(patient: Path) -> None:
    series = generate_uid()
    for path in _ct(patient):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = "recon 2"
        (patient / "CT2").mkdir(exist_ok=True)
        ds.save_as(patient / "CT2" / path.name, enforce_file_format=True)


def test_two_ct_series_with_rtstruct_picks_the_referenced_one(patient):
    _second_series(patient)
    case = _load(patient)
    _warned(case, "ignored CT series", "recon 2", "10 slices")
    assert len(case.structures) == 11


def test_two_ct_series_without_rtstruct_is_an_error(patient):
    _second_series(patient)
    (patient / "RTSTRUCT.dcm").unlink()
    _error(_load(patient), "2 CT series", "recon 2", "Put one CT series")


def test_missing_slice(patient):
    _ct(patient)[5].unlink()
    _error(_load(patient), "1 slice(s) missing between", "gap of 6.00 mm", "3.00 mm apart")


def test_uneven_slices(patient):
    def move(ds):
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 1.3]
    _edit(_ct(patient)[5], move)
    _error(_load(patient), "slice spacing is not uniform")


def test_two_slices_at_one_position(patient):
    paths = _ct(patient)
    ds = pydicom.dcmread(paths[5])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(patient / "CT" / "copy.dcm", enforce_file_format=True)
    _error(_load(patient), "same position", "two acquisitions")


def test_same_file_twice_is_read_once(patient):
    shutil.copy(_ct(patient)[5], patient / "duplicate.dcm")
    case = _load(patient)
    _warned(case, "duplicate.dcm", "read once")


def test_oblique_images(patient):
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    for path in _ct(patient):
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient",
                                       [c, s, 0.0, -s, c, 0.0]))
    _error(_load(patient), "oblique", "10.00 degrees", "axial")


def test_gantry_tilted_stack(patient):
    for k, path in enumerate(_ct(patient)):
        def shift(ds, k=k):
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.8 * k, ipp[2]]
        _edit(path, shift)
    _error(_load(patient), "not stacked along their normal", "gantry tilt")


def test_sagittal_images(patient):
    for path in _ct(patient):
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    _error(_load(patient), "sagittal")


def test_rtstruct_of_another_frame_of_reference(patient):
    other = generate_uid()

    def move(ds):
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = other
        for roi in ds.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = other
    _edit(patient / "RTSTRUCT.dcm", move)
    case = _load(patient)
    _warned(case, "RTSTRUCT.dcm", "another frame of reference", "not loaded")
    assert case.structures == ()


def _add_roi(ds: Dataset, number: int, name: str, contours: list[list[float]] | None) -> None:
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = ds.StructureSetROISequence[0].\
        ReferencedFrameOfReferenceUID
    roi.ROIName = name
    roi.ROIGenerationAlgorithm = ""
    ds.StructureSetROISequence.append(roi)
    rc = Dataset()
    rc.ReferencedROINumber = number
    rc.ROIDisplayColor = [1, 2, 3]
    if contours is not None:
        items = []
        for pts in contours:
            item = Dataset()
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(pts) // 3
            item.ContourData = pts
            items.append(item)
        rc.ContourSequence = Sequence(items)
    ds.ROIContourSequence.append(rc)


def test_empty_roi(patient):
    _edit(patient / "RTSTRUCT.dcm", lambda ds: _add_roi(ds, 99, "Empty", None))
    case = _load(patient)
    _warned(case, "'Empty'", "no contours")
    assert "Empty" not in [s.name for s in case.structures]


def test_duplicate_roi_names(patient):
    def rename(ds):
        ds.StructureSetROISequence[8].ROIName = ds.StructureSetROISequence[7].ROIName
    _edit(patient / "RTSTRUCT.dcm", rename)
    case = _load(patient)
    _warned(case, "two ROIs are named 'Parotid_L'", "'Parotid_L (2)'")
    left = [s for s in case.structures if s.name.startswith("Parotid_L")]
    assert len(left) == 2 and not np.array_equal(left[0].mask, left[1].mask)


def test_degenerate_and_outside_contours(patient):
    z = float(pydicom.dcmread(_ct(patient)[4]).ImagePositionPatient[2])
    square = [-10, -10, z, 10, -10, z, 10, 10, z, -10, 10, z]
    far = [v if i % 3 != 2 else 900.0 for i, v in enumerate(square)]
    _edit(patient / "RTSTRUCT.dcm",
          lambda ds: _add_roi(ds, 98, "Marks", [square, [0, 0, z, 1, 1, z], [5, 5, z], far]))
    case = _load(patient)
    _warned(case, "'Marks'", "fewer than 3 points")
    _warned(case, "'Marks'", "1 contour(s) lie outside the CT")
    marks = case.structure("Marks")
    assert marks.mask.sum() == 36  # the 20 x 20 mm square holds 6 x 6 voxel centres
    assert len(marks.contours) == 1  # only the contour that made the mask is kept


def test_rtdose_not_covering_the_ct(patient, tmp_path):
    case = load_dicom_case(patient)
    (patient / "RTDOSE.dcm").unlink()
    g = grid_around((0.0, 0.0, 0.0), (6, 12, 14), (3.0, 3.0, 3.0))
    write_rtdose(Volume(np.full(g.shape, 2.0, np.float32), g), case, patient / "dose.dcm")
    loaded = _load(patient)
    _warned(loaded, "dose.dcm", "does not cover the whole body", "set to 0 Gy")
    assert loaded.dose.array.max() == pytest.approx(2.0)
    assert loaded.dose.array[0].max() == 0.0


def test_rtdose_without_plan_reference_still_loads(patient):
    _edit(patient / "RTDOSE.dcm", lambda ds: delattr(ds, "ReferencedRTPlanSequence"))
    case = _load(patient)
    assert case.dose is not None and case.dose.array.max() > 60


def test_rtdose_of_another_frame_of_reference(patient):
    _edit(patient / "RTDOSE.dcm", lambda ds: setattr(ds, "FrameOfReferenceUID", generate_uid()))
    case = _load(patient)
    _warned(case, "RTDOSE.dcm", "another frame of reference", "ignored")
    assert case.dose is None


def test_ion_plan_is_reported_not_loaded(patient):
    def to_ion(ds):
        ds.IonBeamSequence = ds.BeamSequence
        del ds.BeamSequence
    _edit(patient / "RTPLAN.dcm", to_ion)
    case = _load(patient)
    _warned(case, "RTPLAN.dcm", "ion (proton/carbon)")
    assert case.plan is None


def test_roi_type_and_name_disagree(patient):
    def retype(ds):
        for obs in ds.RTROIObservationsSequence:
            obs.RTROIInterpretedType = "ORGAN"
    _edit(patient / "RTSTRUCT.dcm", retype)
    case = _load(patient)
    _warned(case, "'PTV70'", "type ORGAN but the name says target")
    assert case.structure("PTV70").role.value == "target"
    assert case.structure("BODY").role.value == "external"


def test_pixel_encodings_give_the_same_hu(patient):
    """Signed pixels, a per-slice RescaleSlope and RLE compression all give the same HU."""
    from pydicom.uid import RLELossless

    reference = load_dicom_case(patient).ct.array
    paths = _ct(patient)

    def signed(ds):
        hu = ds.pixel_array.astype(np.int32) - 1024
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.PixelData = hu.astype("<i2").tobytes()

    def slope(ds):
        raw = ds.pixel_array.astype(np.int32) - 1024
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-1"
        ds.PixelData = ((raw + 1) // 2).astype("<i2").tobytes()

    _edit(paths[0], signed)
    _edit(paths[1], slope)
    _edit(paths[2], lambda ds: ds.compress(RLELossless))
    assert pydicom.dcmread(paths[2]).file_meta.TransferSyntaxUID == RLELossless
    case = _load(patient)
    assert np.array_equal(case.ct.array[[0, 2]], reference[[0, 2]])
    assert np.abs(case.ct.array[1] - reference[1]).max() <= 1.0  # slope 2 rounds odd HU


def test_images_with_rows_along_y(patient):
    """Rows running along y and slices stored along -z (a decubitus-like layout) load as the
    same patient."""
    reference = load_dicom_case(patient)
    for path in _ct(patient):
        def turn(ds):
            image = ds.pixel_array
            ds.PixelData = np.ascontiguousarray(image.T).tobytes()
            ds.Rows, ds.Columns = ds.Columns, ds.Rows
            ds.PixelSpacing = list(ds.PixelSpacing)[::-1]
            ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
        _edit(path, turn)
    case = _load(patient)
    assert case.geometry == reference.geometry
    assert np.array_equal(case.ct.array, reference.ct.array)
    assert case.refs.ct_sop_instance_uids == reference.refs.ct_sop_instance_uids
    for s, r in zip(case.structures, reference.structures):
        assert np.array_equal(s.mask, r.mask), s.name


def test_per_beam_doses_are_summed(patient):
    case = load_dicom_case(patient)
    (patient / "RTDOSE.dcm").unlink()
    g = case.geometry
    for n, value in ((1, 1.0), (2, 2.5)):
        write_rtdose(Volume(np.full(g.shape, value, np.float32), g), case,
                     patient / f"beam{n}.dcm", summation_type="BEAM")
    loaded = _load(patient)
    _warned(loaded, "summed the plan's 2 per-beam doses", "beam1.dcm", "beam2.dcm")
    assert np.allclose(loaded.dose.array, 3.5, atol=1e-4)


def test_two_plan_doses_take_the_newest(patient):
    case = load_dicom_case(patient)
    g = case.geometry
    # named to sort before RTDOSE.dcm, so only its later ContentDate can make it win
    write_rtdose(Volume(np.full(g.shape, 4.0, np.float32), g), case, patient / "A_new.dcm")
    _edit(patient / "A_new.dcm", lambda ds: setattr(ds, "ContentDate", "29990101"))
    loaded = _load(patient)
    _warned(loaded, "2 RTDOSE objects fit the CT", "using the newest (A_new.dcm)")
    assert np.allclose(loaded.dose.array, 4.0, atol=1e-4)
