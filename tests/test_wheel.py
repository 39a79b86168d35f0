"""The wheel of this checkout works on its own: built with hatchling, installed into a fresh venv, run from there.

The fresh venv gets qig-plugin from the wheel (``--no-deps``) and nothing else; a ``.pth`` file appends the
quantize venv's site-packages for torch, transformers and llm-compressor, so nothing heavy is reinstalled. A plain
path line in a ``.pth`` does not run that directory's own ``.pth`` files, so the quantize venv's editable install
of qig-plugin (``_editable_impl_qig_plugin.pth`` -> the checkout) is not seen: ``qig_plugin`` must come from the
wheel. Every command runs with its working directory outside the checkout and ``PYTHONPATH`` unset.

The wheel is built by ``pip wheel --no-deps``: offline (``--no-build-isolation``) when hatchling is installed in
the quantize venv, otherwise in pip's isolated build environment, which fetches hatchling from PyPI (a few
seconds; the setup needs PyPI anyway).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

CHECKOUT = Path(__file__).resolve().parent.parent
QUANTIZE_SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
SERVE_PYTHON = Path(os.environ.get("QIG_SERVE_PYTHON") or CHECKOUT / ".venvs" / "serve" / "bin" / "python")
DEPENDENCIES_PTH = "zz_qig_test_quantize_dependencies.pth"


@dataclass(frozen=True)
class FreshVenv:
    wheel: Path
    root: Path
    python: Path
    qig: Path
    site_packages: Path
    workdir: Path  # cwd of every command: outside the checkout


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def run(command: list, cwd: Path, timeout: float, **extra_env: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=clean_env(**extra_env), capture_output=True, text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, (
        f"{command} exited {completed.returncode}\n--- stdout\n{completed.stdout[-4000:]}\n"
        f"--- stderr\n{completed.stderr[-6000:]}"
    )
    return completed


def build_wheel(out_dir: Path) -> Path:
    offline = importlib.util.find_spec("hatchling") is not None
    isolation = ["--no-build-isolation"] if offline else []  # else pip installs hatchling>=1.25 from PyPI
    start = time.perf_counter()
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--wheel-dir", out_dir, CHECKOUT],
        cwd=out_dir, timeout=300)
    print(f"wheel built in {time.perf_counter() - start:.1f} s "
          f"({'hatchling from the quantize venv' if offline else 'isolated build, hatchling from PyPI'})")
    (wheel,) = out_dir.glob("qig_plugin-*.whl")
    return wheel


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> FreshVenv:
    """The checkout's wheel, installed alone into a new venv that borrows the quantize venv's dependencies."""
    base = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(base)
    root = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", root], cwd=base, timeout=120)
    python = root / "bin" / "python"
    # pip (of the quantize venv) installs into the fresh venv's interpreter: no pip inside it is needed
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
        cwd=base, timeout=120)
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             cwd=base, timeout=60).stdout.strip())
    (site_packages / DEPENDENCIES_PTH).write_text(f"{QUANTIZE_SITE_PACKAGES}\n")
    workdir = base / "work"
    workdir.mkdir()
    return FreshVenv(wheel, root, python, root / "bin" / "qig", site_packages, workdir)


def test_the_wheel_ships_the_recipes_and_the_startup_hook(fresh_venv):
    names = set(zipfile.ZipFile(fresh_venv.wheel).namelist())
    recipes = sorted(path.name for path in (CHECKOUT / "qig_plugin" / "recipes").glob("*.yaml"))
    assert recipes, "the checkout has no recipes"
    missing = [name for name in recipes if f"qig_plugin/recipes/{name}" not in names]
    assert not missing, f"recipes missing from {fresh_venv.wheel.name}: {missing}"
    with zipfile.ZipFile(fresh_venv.wheel) as wheel:
        for name in recipes:
            assert wheel.read(f"qig_plugin/recipes/{name}") == (CHECKOUT / "qig_plugin" / "recipes" / name).read_bytes()
        (entry_points_name,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        entry_points = wheel.read(entry_points_name).decode()
    assert {"qig_plugin/recipes/__init__.py", "qig_plugin_recipe_hint.py", "qig_plugin_recipe_hint.pth"} <= names
    assert "qig = qig_plugin.cli:main" in entry_points
    # anything else git tracks in the package (data included) is in the wheel too
    tracked = subprocess.run(["git", "ls-files", "qig_plugin"], cwd=CHECKOUT, capture_output=True, text=True)
    if tracked.returncode == 0:
        absent = [name for name in tracked.stdout.split() if (CHECKOUT / name).is_file() and name not in names]
        assert not absent, f"tracked package files missing from the wheel: {absent}"


def test_the_fresh_venv_imports_qig_plugin_from_its_own_site_packages(fresh_venv):
    probe = textwrap.dedent("""
        import json, sys
        import qig_plugin.cli
        heavy = sorted(name for name in ("torch", "llmcompressor") if name in sys.modules)
        import qig_plugin, qig_plugin_recipe_hint
        from qig_plugin.recipes import shipped_recipe, shipped_recipes
        print(json.dumps({"heavy": heavy, "qig_plugin": qig_plugin.__file__, "hint": qig_plugin_recipe_hint.__file__,
                          "recipes": [str(path) for path in shipped_recipes()],
                          "w8a8": str(shipped_recipe("qig_gptq_w8a8")), "sys_path": sys.path}))
    """)
    found = json.loads(run([fresh_venv.python, "-c", probe], cwd=fresh_venv.workdir, timeout=120).stdout)
    assert found["heavy"] == [], f"`import qig_plugin.cli` imported {found['heavy']}"
    for key in ("qig_plugin", "hint", "w8a8"):
        assert Path(found[key]).is_relative_to(fresh_venv.site_packages), (key, found[key])
    assert [Path(path).name for path in found["recipes"]] == sorted(
        path.name for path in (CHECKOUT / "qig_plugin" / "recipes").glob("*.yaml"))
    assert all(Path(path).is_relative_to(fresh_venv.site_packages) for path in found["recipes"])
    assert str(CHECKOUT) not in found["sys_path"], "the checkout leaked onto sys.path (editable .pth processed?)"

    help_text = run([fresh_venv.qig, "--help"], cwd=fresh_venv.workdir, timeout=120).stdout
    assert "quantize" in help_text


def test_qig_quantize_runs_from_the_installed_wheel(fresh_venv, tmp_path):
    from tests.tiny_vlm_folder import build_tiny_vlm_folder

    model_dir = build_tiny_vlm_folder(tmp_path / "model")
    output = tmp_path / "out"
    start = time.perf_counter()
    completed = run([fresh_venv.qig, "quantize", model_dir, "--scheme", "W8A8", "--samples", "2", "--output", output],
                    cwd=fresh_venv.workdir, timeout=600)
    print(f"qig quantize (tiny VLM, W8A8, 2 samples) took {time.perf_counter() - start:.1f} s")
    assert "scheme       W8A8 (qig_gptq_w8a8.yaml)" in completed.stdout
    assert f"recipe {fresh_venv.site_packages}" in completed.stdout  # the wheel's own recipe file
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "QIGGPTQModifier" in (output / "recipe.yaml").read_text()
    assert (output / "model.safetensors").is_file()


ORIGINS_PROBE = textwrap.dedent("""
    import importlib.metadata, json, os, sys
    import compressed_tensors, torch, transformers, vllm
    import qig_plugin, qig_plugin.serving
    modules = {"compressed_tensors": compressed_tensors, "torch": torch, "transformers": transformers,
               "vllm": vllm, "qig_plugin": qig_plugin, "qig_plugin.serving": qig_plugin.serving}
    print(json.dumps({
        "prefix": sys.prefix,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "compressed_tensors_version": importlib.metadata.version("compressed-tensors"),
        "files": {name: module.__file__ for name, module in modules.items()},
        "real_files": {name: os.path.realpath(module.__file__) for name, module in modules.items()},
    }))
""")

# Runs in the fresh venv: run_in_serve_env as shipped, once with `support` and once with the command swapped for
# ORIGINS_PROBE, so the probe sees exactly the interpreter, environment and PYTHONPATH that serving commands get.
SERVE_DRIVER = textwrap.dedent("""
    import json, subprocess, sys
    from qig_plugin.serve_env import run_in_serve_env

    support = run_in_serve_env(["support"], timeout=300)
    real_run = subprocess.run

    def probe_instead(command, **kwargs):
        assert command[1:3] == ["-m", "qig_plugin.serving"], command
        return real_run([command[0], "-c", sys.argv[1]], **kwargs)

    subprocess.run = probe_instead
    try:
        origins = run_in_serve_env([], timeout=300)
    finally:
        subprocess.run = real_run
    print(json.dumps({"support": [support.returncode, support.stdout, support.stderr[-3000:]],
                      "origins": [origins.returncode, origins.stdout, origins.stderr[-3000:]]}))
""")


@pytest.mark.serve
def test_the_serve_env_imports_its_own_packages_and_the_wheels_qig_plugin(fresh_venv):
    if not SERVE_PYTHON.exists():
        pytest.skip(f"no serve venv python at {SERVE_PYTHON} (run scripts/setup_envs.sh serve or set QIG_SERVE_PYTHON)")
    serve_root = SERVE_PYTHON.parent.parent
    completed = run([fresh_venv.python, "-c", SERVE_DRIVER, ORIGINS_PROBE], cwd=fresh_venv.workdir, timeout=600,
                    QIG_SERVE_PYTHON=str(SERVE_PYTHON))
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    code, out, err = result["support"]
    assert code == 0 and "fastest servable scheme" in out, f"`serving support` failed ({code}):\n{out}\n{err}"
    code, out, err = result["origins"]
    assert code == 0, f"origins probe failed ({code}):\n{out}\n{err}"
    origins = json.loads(out.strip().splitlines()[-1])

    assert origins["compressed_tensors_version"].startswith("0.17."), origins["compressed_tensors_version"]
    for name in ("compressed_tensors", "torch", "transformers", "vllm"):
        real = Path(origins["real_files"][name])
        assert real.is_relative_to(serve_root.resolve()), f"{name} came from {real}, not the serve venv {serve_root}"
        assert not real.is_relative_to(QUANTIZE_SITE_PACKAGES.resolve()), f"{name} leaked from the quantize venv"
    # qig_plugin: through the temporary link folder (the only PYTHONPATH entry) to the fresh venv's package
    (link_folder,) = origins["pythonpath"].split(os.pathsep)
    for name in ("qig_plugin", "qig_plugin.serving"):
        assert Path(origins["files"][name]).is_relative_to(link_folder), origins["files"][name]
        assert Path(origins["real_files"][name]).is_relative_to(fresh_venv.site_packages.resolve()), (
            f"{name} resolved to {origins['real_files'][name]}, not the wheel in {fresh_venv.site_packages}")
