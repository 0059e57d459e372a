"""Size and build time of the desktop bundle (installer/build.sh, PyInstaller one-folder).

Builds the bundle into a temporary folder (or ``--dist``), then reports the wall time of the
build, the bundle's size on disk (allocated blocks, as ``du``) and its apparent size, the file
count and the largest parts of ``_internal/``. With ``--model CKPT`` it also times the bundle's
``--self-test`` (a fresh process: start-up, demo patient, model load, one preview).

    python -m benchmarks.bench_installer --model /path/to/bundle
    python -m benchmarks.bench_installer --dist /tmp/dp-dist --keep
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def tree_size(path: Path) -> tuple[int, int, int]:
    """(bytes on disk, apparent bytes, files) of everything under ``path`` (links not followed)."""
    disk = apparent = files = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            disk += st.st_blocks * 512
            apparent += st.st_size
            files += 1
    return disk, apparent, files


def largest_parts(internal: Path, n: int = 8) -> list[tuple[str, int]]:
    """The ``n`` largest top-level entries of the bundle's ``_internal/`` (bytes on disk)."""
    sizes = []
    for entry in internal.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            sizes.append((entry.name, tree_size(entry)[0]))
        else:
            sizes.append((entry.name, os.lstat(entry).st_blocks * 512))
    return sorted(sizes, key=lambda item: -item[1])[:n]


def build(dist: Path, work: Path) -> float:
    """Run installer/build.sh into ``dist``; seconds of wall time."""
    env = dict(os.environ, PYTHON=sys.executable, DIST=str(dist), WORK=str(work))
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "installer" / "build.sh")], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-3000:]}")
    return seconds


def time_self_test(app: Path, model: Path) -> float:
    """Seconds for ``DosePilot --self-test --model CKPT`` in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DOSEPILOT_RESOURCES")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    t0 = time.perf_counter()
    proc = subprocess.run([str(app), "--self-test", "--model", str(model)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or "self-test OK" not in proc.stdout:
        raise SystemExit(f"bundle self-test failed:\n{proc.stdout}{proc.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, help="output folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the bundle after measuring")
    parser.add_argument("--model", type=Path, help="model bundle for timing --self-test")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dosepilot-bundle-"))
    dist = args.dist or tmp / "dist"
    try:
        load_before = os.getloadavg()[0]
        seconds = build(dist, tmp / "work")
        load_after = os.getloadavg()[0]
        app_dir = dist / "DosePilot"
        disk, apparent, files = tree_size(app_dir)
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; "
              f"python {platform.python_version()}; load average {load_before:.1f} -> "
              f"{load_after:.1f}")
        print(f"build (installer/build.sh, clean): {seconds:.0f} s")
        print(f"bundle {app_dir}: {disk / MB:.0f} MB on disk, {apparent / MB:.0f} MB apparent, "
              f"{files} files")
        for name, size in largest_parts(app_dir / "_internal"):
            print(f"  {name:<28}{size / MB:8.0f} MB")
        if args.model:
            self_test = time_self_test(app_dir / "DosePilot", args.model)
            print(f"bundle --self-test (fresh process): {self_test:.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
            if args.dist:
                shutil.rmtree(args.dist / "DosePilot", ignore_errors=True)


if __name__ == "__main__":
    main()
