#!/usr/bin/env bash
# Validates the manifests against the Kubernetes schemas, offline (kubernetes-validate from PyPI
# carries them), strict (an unknown field fails), for the oldest and newest versions checked.
#   deploy/kubernetes/validate.sh            # a venv under target/ made once (python3-venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=1.37.0
venv=${CARGO_TARGET_DIR:-target}/kubernetes-validate-$VERSION
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv" || { echo "validate.sh: python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
  "$venv/bin/pip" install --quiet "kubernetes-validate==$VERSION"
fi
for k in 1.28.0 1.37.0; do
  "$venv/bin/kubernetes-validate" --strict -k "$k" deploy/kubernetes/*.yaml
done
