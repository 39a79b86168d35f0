#!/usr/bin/env bash
# The main job on a fresh machine: set up both environments, build the default model,
# quantize it with QIG-GPTQ at the scheme this CPU's vLLM serves fast, generate in vLLM.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO_ROOT/scripts/setup_envs.sh"
export QIG_SERVE_PYTHON="${QIG_SERVE_PYTHON:-${QIG_VENVS:-$REPO_ROOT/.venvs}/serve/bin/python}"
exec "${QIG_VENVS:-$REPO_ROOT/.venvs}/quantize/bin/python" -m qig_plugin.demo "$@"
