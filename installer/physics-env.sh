#!/usr/bin/env bash
# Create the isolated physics environment used by `dosepilot physics ...` (engine/physics/dose_calc.py).
#
# pyRadPlan (the Python port of matRad: 6 MV photon pencil beam with bundled machine data and
# fluence optimisation) pins numpy<2.4 and breaks with pydantic>=2.13, while the core DosePilot
# environment runs newer numpy/pydantic. It therefore lives in its own venv and DosePilot talks
# to it through a subprocess exchanging plain files (npz without pickle + JSON).
#
# Usage: installer/physics-env.sh [VENV_DIR]     (default: .venv-physics at the repository root)
# Then point DosePilot at it (only needed for a non-default location):
#   export DOSEPILOT_PHYSICS_PYTHON=VENV_DIR/bin/python
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv-physics}"
python="${PHYSICS_BASE_PYTHON:-python3}"

# pyRadPlan 0.5.0 is the measured release (shared notes §3.4); pydantic 2.13+ raises a
# PydanticSerializationError inside calc_dose_influence.
requirements=(
    "pyRadPlan==0.5.0"
    "pydantic>=2.10,<2.13"
    "numpy>=2.0,<2.4"
)

if [ -x "$venv/bin/python" ] && [ -f "$venv/.dosepilot-physics" ] \
        && [ "$(cat "$venv/.dosepilot-physics")" = "${requirements[*]}" ]; then
    echo "physics environment already present: $venv"
    exit 0
fi

echo "creating the physics environment in $venv (pyRadPlan and its dependencies, ~1 GB)"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${requirements[@]}"
# a smoke check: the bundled 6 MV machine and the solver must load
"$venv/bin/python" - <<'PY'
import pyRadPlan
from importlib.metadata import version
from pyRadPlan.machines import load_machine_from_mat  # noqa: F401
print("pyRadPlan", version("pyRadPlan"), "ok")
PY
echo "${requirements[*]}" > "$venv/.dosepilot-physics"
echo "physics environment ready: $venv/bin/python"
