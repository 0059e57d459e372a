"""``dosepilot predict PATH... [--steps N] [--seeds K] [--preview | --full-vae] [--model CKPT]
[--out DIR] [--json]``.

Predicts the dose of one or many cases with one model load. Each PATH is

* a DICOM patient folder (CT, RTSTRUCT, RTPLAN; searched recursively),
* a dataset case file: an OpenKBP ``pt_N.npz`` or a GDP-HMM ``*.npz`` (its PTV_DICT.json next to
  it, in ``meta_files/`` or given with ``--meta-dir``), or an OpenKBP CSV patient folder,
* or a folder of those (a cohort): dataset files in it, and each sub-folder that is a case.

For each case, ``OUT/<case>/`` receives ``dose.dcm`` (RTDOSE on the CT grid, referring to the
case's plan; dataset cases also get the ``plan.dcm`` it refers to), ``dvh.csv``,
``metrics.json``, ``report.png`` and, for dataset cases, ``dose.npy``: the dose in Gy in the
dataset's own array layout (OpenKBP: 128³ in its (i0, i1, i2) order, zero outside the
possible-dose mask, which ``dosepilot evaluate OUT REF`` reads; GDP-HMM: the case file's
[z, y, x] grid). A case that fails is reported and the
others still run; the exit code is 1 when any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.case import Case
from engine.commands.bench_cmd import add_precision_argument
from engine.errors import UserError

DATASET_SUFFIXES = (".npz",)


@dataclass(frozen=True)
class CaseInput:
    """One case to predict: where it is and how to read it ("dicom", "openkbp", "gdp-hmm")."""

    path: Path
    kind: str

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _npz_kind(path: Path) -> str | None:
    """"openkbp", "gdp-hmm" or None, from the array names (nothing is unpickled)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.removesuffix(".npy") for n in zf.namelist()}
    except (OSError, zipfile.BadZipFile):
        return None
    if {"ct", "roi_bits"} <= names:
        return "openkbp"
    if "arr_0" in names:
        return "gdp-hmm"
    return None


def _has_dicom(folder: Path) -> bool:
    return any(p.is_file() and _is_dicom_file(p) for p in folder.rglob("*"))


def _single_case(path: Path) -> CaseInput | None:
    """``path`` as one case, or None when it is not one by itself."""
    if path.is_file():
        if path.suffix.lower() in DATASET_SUFFIXES:
            kind = _npz_kind(path)
            return CaseInput(path, kind) if kind else None
        return None
    if (path / "ct.csv").is_file():
        return CaseInput(path, "openkbp")
    if any(p.is_file() and _is_dicom_file(p) for p in path.iterdir()):
        return CaseInput(path, "dicom")
    if any(p.suffix.lower() in DATASET_SUFFIXES or (p / "ct.csv").is_file()
           for p in path.iterdir()):
        return None  # a folder of dataset cases
    subfolders = [p for p in path.iterdir() if p.is_dir() and _has_dicom(p)]
    if len(subfolders) > 1 and len({_patient_key(p) for p in subfolders}) == 1:
        return CaseInput(path, "dicom")  # one patient's series in sub-folders
    return None


def _patient_key(folder: Path) -> tuple[str, str]:
    """(PatientID, StudyInstanceUID) of the first DICOM file under ``folder``."""
    import pydicom

    for p in sorted(folder.rglob("*")):
        if p.is_file() and _is_dicom_file(p):
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True,
                                     specific_tags=["PatientID", "StudyInstanceUID"], force=True)
            except Exception:  # noqa: BLE001 - an unreadable file is the loader's to report
                continue
            return str(ds.get("PatientID", "")), str(ds.get("StudyInstanceUID", ""))
    return "", ""


def find_cases(path: Path) -> list[CaseInput]:
    """The cases at ``path``: itself when it is one, else the cases in the folder (sorted)."""
    case = _single_case(path)
    if case is not None:
        return [case]
    if not path.is_dir():
        return []
    found = []
    for child in sorted(path.iterdir()):
        sub = _single_case(child)
        if sub is not None:
            found.append(sub)
    return found


def load_case(source: CaseInput, meta_dir: Path | None = None) -> Case:
    """Read one case; the loader's own error types say what is wrong."""
    if source.kind == "dicom":
        from engine.io.dicom import load_dicom_case

        return load_dicom_case(source.path)
    if source.kind == "openkbp":
        from engine.io.openkbp import load_openkbp

        return load_openkbp(source.path)
    if source.kind == "gdp-hmm":
        from engine.io.gdp_hmm import load_gdp_hmm_npz

        return load_gdp_hmm_npz(source.path, meta_dir)
    raise ValueError(f"unknown case kind {source.kind!r}")


def load_one_patient(path: Path) -> Case:
    """The one patient at ``path`` (a DICOM folder or a dataset case file), or a UserError
    saying why not: nothing there, several patients, or the reader's own fault."""
    found = find_cases(path) if path.exists() else []
    if len(found) != 1:
        raise UserError(f"{path}: " + ("not one patient (a DICOM folder or a dataset case file)"
                                       if path.exists() else "no such file or folder"))
    try:
        return load_case(found[0])
    except (ValueError, OSError) as exc:  # the readers' errors are ValueErrors naming the fault
        raise UserError(f"{path}: {exc}") from None


def dataset_array(source: CaseInput, case: Case, dose_gy: np.ndarray) -> np.ndarray | None:
    """The CT-grid dose (Gy, [z, y, x]) in the dataset's own layout, None for DICOM cases.

    OpenKBP cases were read as ``a.transpose(2, 0, 1)[::-1]`` (engine.io.openkbp), so the
    inverse is ``c[::-1].transpose(1, 2, 0)``; the dose is zeroed outside the possible-dose mask
    (the case's body), as the challenge's own prediction code does before scoring, since its
    dose score sums the error over the whole volume. GDP-HMM cases keep the file's [z, y, x]
    grid.
    """
    if source.kind == "openkbp":
        from engine.case import Role

        body = next((s.mask for s in case.structures if s.role is Role.EXTERNAL), None)
        if body is not None:
            dose_gy = np.where(body, dose_gy, np.float32(0))
        return np.ascontiguousarray(dose_gy[::-1].transpose(1, 2, 0), dtype=np.float32)
    if source.kind == "gdp-hmm":
        return np.ascontiguousarray(dose_gy, dtype=np.float32)
    return None


def write_outputs(source: CaseInput, case: Case, result, out: Path, model: str) -> list[str]:
    """Write the case's files into ``out`` (each all-or-nothing); returns their names."""
    from engine.durable import replacing, write_text
    from engine.io.dicom_export import write_rtdose, write_rtplan
    from engine.io.dicom_modules import ensure_refs
    from engine.reports import metrics_document, write_dvh_csv, write_report_figure

    out.mkdir(parents=True, exist_ok=True)
    written = []
    case = ensure_refs(case)
    plan_uid = case.refs.plan_sop_instance_uid
    if not plan_uid:  # a dataset case: the dose needs a plan to refer to
        plan_uid = write_rtplan(case, case.plan, out / "plan.dcm")
        case = dataclasses.replace(case, refs=dataclasses.replace(
            case.refs, plan_sop_instance_uid=plan_uid, plan_path=str(out / "plan.dcm")))
        written.append("plan.dcm")
    write_rtdose(result.dose, case, out / "dose.dcm", plan_sop_instance_uid=plan_uid,
                 description=f"DosePilot {'preview' if result.kind == 'preview' else 'prediction'}"
                             f" ({result.steps} steps)")
    write_dvh_csv(result, out / "dvh.csv")
    write_text(out / "metrics.json", json.dumps(metrics_document(case, result, model), indent=2))
    write_report_figure(case, result, out / "report.png")
    written += ["dose.dcm", "dvh.csv", "metrics.json", "report.png"]
    array = dataset_array(source, case, result.dose.array)
    if array is not None:
        with replacing(out / "dose.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, array)
        written.append("dose.npy")
    return written


def _folder_name(name: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "case"
    candidate, n = base, 2
    while candidate in used:
        candidate, n = f"{base}-{n}", n + 1
    used.add(candidate)
    return candidate


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def predict_cases(engine, sources: list[CaseInput], out_dir: Path, steps: int,
                  seeds: tuple[int, ...], meta_dir: Path | None = None,
                  show_progress: bool = False,
                  log: Callable[[str], None] = lambda s: None,
                  preview: bool = False) -> Iterator[dict[str, Any]]:
    """Predict and write each case; yields one summary per case (failures included).
    ``preview``: the engine's 1-step preview instead (``steps`` and ``seeds`` unused)."""
    if preview:
        steps = 1
    used: set[str] = set()
    bar = _progress_bar(len(sources) * steps, show_progress)
    model = str(engine.model.path) if engine.model.path else None
    try:
        for source in sources:
            folder = _folder_name(source.name, used)
            entry: dict[str, Any] = {"case": source.name, "input": str(source.path),
                                     "kind": source.kind, "out": str(out_dir / folder)}
            bar.set_description(source.name[:24])
            done = 0

            def progress(i: int, n: int) -> None:
                nonlocal done
                bar.update(i - done)
                done = i

            t0 = time.perf_counter()
            try:
                t_load = time.perf_counter()
                case = load_case(source, meta_dir)
                load_s = time.perf_counter() - t_load
                result = (engine.preview(case) if preview else
                          engine.predict(case, steps=steps, seeds=seeds, progress=progress))
                t_write = time.perf_counter()
                files = write_outputs(source, case, result, out_dir / folder, model)
                timings = {"load": load_s, **result.timings_s,
                           "write": time.perf_counter() - t_write}
                timings["total"] = time.perf_counter() - t0
                entry.update(status="ok", files=files, timings_s=timings,
                             max_gy=float(result.dose.array.max()),
                             metrics={k: {f: v for f, v in dataclasses.asdict(m).items()
                                          if f != "name"} for k, m in result.metrics.items()},
                             scorecard=(None if result.scorecard is None
                                        else result.scorecard.total))
            except Exception as exc:  # noqa: BLE001 - one bad case must not stop the cohort
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            bar.update(steps - done)
            if entry["status"] == "ok":
                log(f"{source.name}: max {entry['max_gy']:.2f} Gy, "
                    f"{entry['timings_s']['total']:.1f} s -> {entry['out']}")
            else:
                log(f"{source.name}: FAILED: {entry['error']}")
            yield entry
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    from engine.commands.bench_cmd import load_engine
    from engine.reports import _clean

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.preview and (args.steps != 10 or args.seeds != 1 or args.solver != "euler"):
        raise UserError("--preview is the planner's 1-step preview: it takes no --steps, "
                        "--seeds or --solver")
    sources: list[CaseInput] = []
    missing: list[dict[str, Any]] = []
    for path in args.paths:
        found = find_cases(path) if path.exists() else []
        if not found:
            why = ("no such file or folder" if not path.exists() else
                   "not a DICOM patient folder, a dataset case file (OpenKBP/GDP-HMM .npz, "
                   "OpenKBP CSV folder) or a folder of them")
            missing.append({"case": path.name, "input": str(path), "status": "failed",
                            "error": why})
        sources.extend(found)
    if not sources:
        raise UserError("nothing to predict: " + "; ".join(f"{m['input']}: {m['error']}"
                                                           for m in missing))
    t0 = time.perf_counter()
    if args.preview and args.full_vae:
        raise UserError("--full-vae is for full predictions; --preview always takes the codec")
    engine = load_engine(args.model, args.threads, precision=args.precision,
                         full_vae=args.full_vae)
    engine.solver = args.solver
    load_model_s = time.perf_counter() - t0
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = tuple(range(args.seeds))

    def log(line: str) -> None:
        if not args.json:  # through tqdm, so that a progress bar on the terminal stays whole
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout if "FAILED" not in line else sys.stderr)

    for m in missing:
        log(f"{m['input']}: FAILED: {m['error']}")
    cases = list(missing)
    cases += predict_cases(engine, sources, out_dir, args.steps, seeds, args.meta_dir,
                           show_progress=sys.stderr.isatty(), log=log, preview=args.preview)
    failed = sum(c["status"] != "ok" for c in cases)
    summary = {"model": str(engine.model.path), "device": str(engine.device),
               "threads": engine.threads, "preview": args.preview,
               "steps": 1 if args.preview else args.steps, "solver": engine.solver,
               "decoder": "codec" if args.preview or engine.codec_decode else "vae",
               "seeds": [0] if args.preview else list(seeds),
               "out": str(out_dir), "n_cases": len(cases), "n_failed": failed,
               "timings_s": {"load_model": load_model_s,
                             "total": time.perf_counter() - t0},
               "cases": cases}
    if args.json:
        print(json.dumps(_clean(summary), indent=2))
    else:
        print(f"{len(cases) - failed} of {len(cases)} case(s) predicted into {out_dir}"
              + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="predict doses for DICOM patients or dataset cases",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="DICOM patient folder, dataset case file, or a folder of them")
    p.add_argument("--steps", type=int, default=10, help="sampler steps (default 10)")
    # engine.diffusion.SOLVERS, spelled out: importing it would load torch on every CLI start
    p.add_argument("--solver", choices=("euler", "dpm++2m"), default="euler",
                   help="sampler: euler (default) or dpm++2m (second order, one model call "
                        "per step like euler)")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds; more than one adds the mean and its uncertainty")
    p.add_argument("--preview", action="store_true",
                   help="the 1-step preview the planner shows while a beam is dragged (the "
                        "model's preview codec decodes it), e.g. to score it with evaluate")
    p.add_argument("--full-vae", action="store_true",
                   help="decode the dose with the full VAE (the default only for bundles "
                        "without a dose refiner; with one, the preview codec decodes it, the "
                        "decoder the refiner was fitted on)")
    p.add_argument("--model", type=Path, help="model bundle folder (default: the shipped model)")
    p.add_argument("--out", type=Path, default=Path("predictions"),
                   help="output folder (default: ./predictions)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: the cores other processes leave free)")
    p.add_argument("--meta-dir", type=Path,
                   help="GDP-HMM: folder with PTV_DICT.json (default: found next to the files)")
    add_precision_argument(p)
    p.set_defaults(func=run)
