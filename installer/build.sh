#!/usr/bin/env bash
# Build the DosePilot desktop bundle: dist/DosePilot/ (one folder; run dist/DosePilot/DosePilot).
#
# Usage: installer/build.sh [--venv DIR]
#   without --venv: uses the current Python (it must have DosePilot's dependencies and the
#   `installer` extra: pip install -e '.[installer]');
#   with --venv DIR: creates DIR if needed and installs DosePilot with the extra into it
#   (install torch first there if you want the CPU build: pip install torch==2.13.0).
# Environment: PYTHON (interpreter, default python3), DIST and WORK (output folders, default
# dist/ and build/pyinstaller/ in the repository root).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [[ "${1:-}" == "--venv" ]]; then
    VENV="${2:?--venv needs a folder}"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -e "$ROOT[installer]"
    PYTHON="$VENV/bin/python"
fi
DIST="${DIST:-$ROOT/dist}"
WORK="${WORK:-$ROOT/build/pyinstaller}"

"$PYTHON" -c "import PyInstaller" 2>/dev/null || {
    echo "build.sh: PyInstaller is not installed for $PYTHON: pip install -e '.[installer]'" >&2
    exit 2
}
SECONDS=0
cd "$ROOT"
"$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
    --distpath "$DIST" --workpath "$WORK" installer/dosepilot.spec
elapsed=$SECONDS
size_mb=$(du -sm "$DIST/DosePilot" | cut -f1)
printf 'built %s: %s MB on disk, %d files, %d s\n' "$DIST/DosePilot" "$size_mb" \
    "$(find "$DIST/DosePilot" -type f | wc -l)" "$elapsed"
