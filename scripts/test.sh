#!/usr/bin/env bash
# The test suite on a fresh machine: set up both environments, then run pytest in the
# quantize environment (vLLM tests reach the serve environment through a subprocess).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO_ROOT/scripts/setup_envs.sh"
export QIG_SERVE_PYTHON="${QIG_SERVE_PYTHON:-${QIG_VENVS:-$REPO_ROOT/.venvs}/serve/bin/python}"
cd "$REPO_ROOT"
exec "${QIG_VENVS:-$REPO_ROOT/.venvs}/quantize/bin/python" -m pytest -p no:cacheprovider "$@"
