"""Fault injection at random moments, repeated: faults tried, survived, data lost.

    python -m benchmarks.fault_injection                       # 12 training kills, 6 runs each
    python -m benchmarks.fault_injection --train-kills 20 --export-runs 10 --json

* **training**: ``dosepilot train vae --config test-tiny`` on two OpenKBP training cases is
  killed with SIGKILL ``--train-kills`` times and resumed with ``--resume`` after each kill. Each
  kill lands at a random moment: a random step, then 0-150 ms (mid-step, mid-checkpoint or
  while logging); one kill in three is aimed at a checkpoint being written. After every kill
  every checkpoint file must be complete; at the end the loss of every step must equal an
  uninterrupted run's bit for bit. *Lost*: corrupt checkpoint files + steps whose loss differs.
* **exports**: ``dosepilot convert`` (a 128-slice study), ``dosepilot predict`` (the shipped
  model, 1 step) and the window's export (``planner_gui.export``, a whole study) of a synthetic
  128^3 OpenKBP case, ``--export-runs`` runs each. Each run is frozen (SIGSTOP) every 0-10 ms
  while it writes, which leaves on disk exactly what a SIGKILL at that instant would, every
  visible file is checked, and the run is SIGKILLed at a random stop. *Lost*: visible files
  that are not complete.

Needs the shared OpenKBP data (``../shared/data/openkbp``) for the training runs. The fixed
fault cases (13 broken model bundles, a full disk under predict, export, checkpoint and event
log) are the tests ``tests/test_fault_model_bundle.py`` and ``tests/test_fault_disk_full.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.durable import is_temporary
from tests.fault_harness import (
    checkpoint_files,
    dosepilot,
    kill_when,
    reference_of,
    stop_and_inspect,
    subprocess_env,
)
from trainer.events import read_events

REPO = Path(__file__).resolve().parents[1]
OPENKBP = REPO.parent / "shared" / "data" / "openkbp"


def _train_losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run) if e["type"] == "train"}


def train_kills(root: Path, kills: int, rng: random.Random) -> dict:
    """SIGKILL a training run ``kills`` times at random moments, resuming after each."""
    data = root / "data"
    for split, count in (("train", 2), ("validation", 1)):
        (data / split).mkdir(parents=True)
        for src in sorted((OPENKBP / split).glob("pt_*.npz"))[:count]:
            (data / split / src.name).symlink_to(src)
    steps = 2 * kills + 4
    args = ["train", "vae", "--config", "test-tiny", "--data", data, "--set",
            f"run.max_steps={steps}", "--set", "run.checkpoint_every=2", "--set",
            "run.eval_every=100000"]
    env = subprocess_env()
    subprocess.run(dosepilot(*args, "--out", root / "full"), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = root / "killed"
    folder = run / "checkpoints"
    out = {"kills": 0, "aimed_at_checkpoint_writes": 0, "resumed": 0, "corrupt_files": 0,
           "steps_recomputed": 0}
    for k in range(kills):
        resume = ["--resume"] if checkpoint_files(run)[0] else []
        start = max(_train_losses(run), default=0)
        proc = subprocess.Popen(dosepilot(*args, "--out", run, *resume), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if k % 3 == 2:
            def saving() -> bool:
                saved = max((e["step"] for e in read_events(run) if e["type"] == "checkpoint"),
                            default=0)
                return any(is_temporary(p.name) or int(re.search(r"step_(\d+)", p.name)[1])
                           > saved for p in folder.iterdir())
            killed = kill_when(proc, saving, timeout_s=600)
            out["aimed_at_checkpoint_writes"] += killed
        else:
            target = start + rng.randint(1, 3)
            while proc.poll() is None and max(_train_losses(run), default=0) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.15))
            killed = proc.poll() is None
            if killed:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        out["kills"] += killed
        complete, problems = checkpoint_files(run)
        out["corrupt_files"] += len(problems)
        if complete:
            out["resumed"] += 1
            out["steps_recomputed"] += max(_train_losses(run), default=0) - complete[-1]
    subprocess.run(dosepilot(*args, "--out", run, "--resume"), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full, resumed = _train_losses(root / "full"), _train_losses(run)
    out["steps"] = steps
    out["loss_mismatches"] = sum(resumed.get(s) != full[s] for s in full)
    out["lost"] = out["corrupt_files"] + out["loss_mismatches"]
    return out


GUI_EXPORT = ("import sys\nfrom engine.io.openkbp import load_openkbp\n"
              "from planner_gui.export import export_plan_and_dose\n"
              "case = load_openkbp(sys.argv[1])\n"
              "export_plan_and_dose(case, case.plan, case.dose, sys.argv[2])\n")


def export_kills(root: Path, runs: int, rng: random.Random) -> dict:
    """Freeze and kill convert, predict and the window's export at random moments."""
    from engine.cli import main
    from engine.io.openkbp import load_openkbp
    from planner_gui.export import export_plan_and_dose
    from tests.test_predict_cli import write_openkbp_npz

    case_file = write_openkbp_npz(root / "pt_1.npz")
    predict = ["predict", case_file, "--steps", "1", "--threads", "1"]
    with contextlib.redirect_stdout(io.StringIO()):  # the reference runs' own reports
        assert main(["convert", str(case_file), str(root / "ref-convert"), "--to", "dicom"]) == 0
        assert main([str(a) for a in predict] + ["--out", str(root / "ref-predict")]) == 0
    case = load_openkbp(case_file)
    gui_ref = export_plan_and_dose(case, case.plan, case.dose, root / "ref-gui").folder
    writers = {
        "convert": (lambda out: dosepilot("convert", case_file, out, "--to", "dicom"),
                    reference_of(root / "ref-convert"), lambda out: (out / "CT").exists()),
        "predict": (lambda out: dosepilot(*predict, "--out", out),
                    reference_of(root / "ref-predict" / "pt_1"),
                    lambda out: (out / "pt_1").exists()),
        "gui export": (lambda out: [sys.executable, "-c", GUI_EXPORT, str(case_file), str(out)],
                       reference_of(gui_ref), lambda out: out.exists() and any(out.iterdir())),
    }
    results = {}
    for name, (command, reference, started) in writers.items():
        tally = {"runs": runs, "stops": 0, "sigkills": 0, "partial_files": 0, "examples": []}
        for r in range(runs):
            out = root / f"{name.replace(' ', '-')}-{r}"
            if name == "gui export":
                out.mkdir()
            stop_at = rng.randint(1, 40)
            proc = subprocess.Popen(command(out), env=subprocess_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            report = stop_and_inspect(proc, out, reference, lambda o=out, s=started: s(o),
                                      rng, kill_if=lambda rep, n=stop_at: rep.stops >= n)
            tally["stops"] += report.stops
            tally["sigkills"] += report.killed
            tally["partial_files"] += len(report.partial)
            tally["examples"] += report.partial[:2]
        tally["lost"] = tally["partial_files"]
        results[name] = tally
    return results


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-kills", type=int, default=12)
    p.add_argument("--export-runs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rng = random.Random(args.seed)
    report = {"machine": _cpu_model(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="dosepilot-faults-") as tmp:
        t0 = time.perf_counter()
        if args.train_kills and (OPENKBP / "train").is_dir():
            report["training"] = train_kills(Path(tmp) / "train", args.train_kills, rng)
        report["exports"] = export_kills(Path(tmp), args.export_runs, rng)
        report["wall_s"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if "training" in report:
            t = report["training"]
            print(f"training: {t['kills']} SIGKILLs ({t['aimed_at_checkpoint_writes']} at "
                  f"checkpoint writes), {t['resumed']} resumed from a complete checkpoint, "
                  f"{t['corrupt_files']} corrupt checkpoint files, {t['loss_mismatches']} of "
                  f"{t['steps']} step losses differ from the uninterrupted run")
        for name, t in report["exports"].items():
            print(f"{name}: {t['runs']} runs, {t['stops']} kill points inspected, "
                  f"{t['sigkills']} SIGKILLs, {t['partial_files']} partial files")
    lost = report.get("training", {}).get("lost", 0) + sum(
        t["lost"] for t in report["exports"].values())
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
