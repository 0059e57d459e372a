#!/usr/bin/env bash
# Install the Debian packages in installer/system-packages.txt that are missing.
# Needs root (or sudo); does nothing when everything is already there.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mapfile -t wanted < <(grep -v '^\s*#' "$here/system-packages.txt" | grep -v '^\s*$')
missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
echo "installing system packages: ${missing[*]}"
sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get update -qq
$sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
# Orthanc comes as a system service; DosePilot only runs it as a test fixture (its own port,
# configuration and storage), so the service must not stay up listening on 4242/8042.
if printf '%s\n' "${missing[@]}" | grep -qx orthanc; then
  $sudo_cmd systemctl disable --now orthanc >/dev/null 2>&1 || true
  $sudo_cmd service orthanc stop >/dev/null 2>&1 || true
fi
