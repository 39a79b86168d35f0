"""``qig quantize ORG/NAME`` through the Hugging Face cache, offline: a hub-layout cache
(``models--ORG--NAME/snapshots/<revision>/``, ``refs/main``) holding a tiny text-only Llama, read with
``HF_HUB_OFFLINE=1``; and the one-line error for an id that is not cached. (``qig eval --reference`` and
``qig explain`` resolve a hub id with the same function.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_text_folder import build_tiny_text_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Put ``folder``'s files in ``cache`` as the hub's ``repo_id`` at ``REVISION`` (its ``main``); the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    """The environment of an offline hub cache holding ``tiny-org/tiny-llama``, and its snapshot folder."""
    root = tmp_path_factory.mktemp("hub")
    snapshot = add_to_hub_cache(root / "hf" / "hub", "tiny-org/tiny-llama", build_tiny_text_folder(root / "models"))
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)
    return env, snapshot


def qig(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qig_plugin.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_quantize_a_hub_id_from_the_offline_cache(offline_hub, tmp_path):
    (env, snapshot), work = offline_hub, tmp_path  # no tiny-org/ folder here
    quantized = qig(["quantize", "tiny-org/tiny-llama", "--scheme", "W8A8", "--samples", "2", "--output", "w8a8"],
                    work, env)
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    assert f"[qig] model tiny-org/tiny-llama ({snapshot})" in quantized.stdout
    config = json.loads((work / "w8a8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (work / "w8a8" / "tokenizer.json").read_bytes() == (snapshot / "tokenizer.json").read_bytes()


def test_an_id_that_is_not_cached_fails_in_one_line(offline_hub, tmp_path):
    (env, _), work = offline_hub, tmp_path
    completed = qig(["quantize", "tiny-org/elsewhere", "--scheme", "W8A8", "--output", "out"], work, env)
    assert completed.returncode == 2
    assert completed.stderr.startswith(
        "qig quantize: error: tiny-org/elsewhere is no local folder, and the hub model tiny-org/elsewhere is not in "
        "the Hugging Face cache ("
    )
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1 and list(work.iterdir()) == []
