#!/usr/bin/env bash
# System packages the pipeline needs besides its pip packages (Debian/Ubuntu, as root).
# PyQt5's wheels bundle Qt but link these (found with ldd on QtCore/QtGui/QtWidgets/
# QtSvg/QtOpenGL/QtDBus and the offscreen platform plugin); ete3 renders trees with them
# under QT_QPA_PLATFORM=offscreen, and needs a font for the labels.
# With --slurm it also installs and starts the one-node test SLURM (slurm/local/start.sh).
set -euo pipefail

# python3-venv: the README installs into a virtual environment (Debian's python3 refuses pip
# outside one, PEP 668, and has no ensurepip without this package).
# poppler-utils: pdffonts and pdfinfo, with which the tests check the figures' PDFs (fonts
# embedded, no Type 3; page width = the journal column) and you can check yours.
PKGS=(python3-venv libgl1 libglib2.0-0 libfontconfig1 libfreetype6 libdbus-1-3 libx11-6
    libxext6 libxcb1 libpng16-16 fonts-dejavu-core poppler-utils)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for pkg in "${PKGS[@]}"; do installed "$pkg" || missing+=("$pkg"); done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
    echo "[install-system-deps] installing ${missing[*]}" >&2
    apt_get install -y --no-install-recommends "${missing[@]}" \
        || { apt_get update && apt_get install -y --no-install-recommends "${missing[@]}"; }
fi

if [[ ${1:-} == --slurm ]]; then
    "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/slurm/local/start.sh"
fi
