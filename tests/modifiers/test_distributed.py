"""QIG under llm-compressor's distributed calibration: 2 CPU processes (gloo) against one process.

llm-compressor 0.14 partitions a dataset that is identical on every rank (same fingerprint) across ranks,
calibrates each rank's samples, then GPTQ sums every module's Hessian onto the rank that compresses it and
broadcasts the result, SmoothQuant all-reduces its per-channel min/max, and AWQ sums its grid-search loss.
QIG's token weights are per sample, so each rank computes its own samples' weights; the reduced Hessians,
ranges and losses must then equal the single-process ones.

On CPU, llm-compressor skips the final qparam broadcast for CPU modules (it expects ranks to share offloaded
CPU memory); the runs here broadcast them, as ranks on accelerators do, so later layers see the same
quantized earlier layers on every rank.
"""

import functools
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
SAMPLES = 4


def _calibrate(model_dir: Path, data_dir: Path) -> dict:
    """QIG-SmoothQuant + QIG-GPTQ (W8A8) on the saved dataset; what each rank computed, by name."""
    from datasets import load_from_disk
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import base as gptq_base

    from qig_plugin.modifiers import QIGGPTQModifier, QIGSmoothQuantModifier
    from tests.modifiers.tiny_llama import load_tiny_llama, tiny_tokenizer

    hessians = {}
    real_compress = gptq_base.GPTQModifier.compress_module_list

    def record_hessians(self, module_list):
        for module in module_list:
            hessians[self._module_names[module]] = (self._hessians[module] / self._num_samples[module]).clone()
        return real_compress(self, module_list)

    gptq_base.GPTQModifier.compress_module_list = record_hessians
    gptq_base.broadcast_qparams_and_cleanup = functools.partial(
        gptq_base.broadcast_qparams_and_cleanup, skip_cpu=False
    )
    model = load_tiny_llama(model_dir)
    oneshot(
        model=model,
        processor=tiny_tokenizer(),
        dataset=load_from_disk(str(data_dir)),
        recipe=[
            QIGSmoothQuantModifier(qig_steps=2, smoothing_strength=0.8),
            QIGGPTQModifier(qig_steps=2, scheme="W8A8", ignore=["lm_head"]),
        ],
        num_calibration_samples=SAMPLES,
        pipeline="sequential",
        shuffle_calibration_samples=False,
    )
    return {
        "hessians": hessians,
        "norms": {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("layernorm")},
        "scales": {n: m.weight_scale.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_scale")},
    }


def _awq_loss(batches: list[int]) -> float:
    """QIG-AWQ's grid-search loss over the given batches of a fixed random set (distributed: summed over ranks)."""
    from qig_plugin.modifiers import QIGAWQModifier

    generator = torch.Generator().manual_seed(0)
    reference = [torch.randn(1, 5, 8, generator=generator) for _ in range(SAMPLES)]
    candidate = [torch.randn(1, 5, 8, generator=generator) for _ in range(SAMPLES)]
    weights = [torch.rand(1, 5, generator=generator) * (i + 1) for i in range(SAMPLES)]
    modifier = QIGAWQModifier()
    modifier._loss_weights = [weights[i] for i in batches]
    return modifier._compute_loss([reference[i] for i in batches], [candidate[i] for i in batches])


def _rank_main(rank: int, port: int, model_dir: Path, data_dir: Path, out_dir: Path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        result = _calibrate(model_dir, data_dir)
        half = SAMPLES // WORLD_SIZE
        result["awq_loss"] = _awq_loss(list(range(rank * half, (rank + 1) * half)))
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process result and each rank's result of a 2-process gloo run, on the same 4 samples."""
    from tests.modifiers.tiny_llama import build_tiny_llama, random_token_dataset

    root = tmp_path_factory.mktemp("distributed")
    model_dir = build_tiny_llama(root / "model")
    random_token_dataset(samples=SAMPLES).save_to_disk(str(root / "data"))  # same fingerprint on every rank
    mp.spawn(_rank_main, args=(_free_port(), model_dir, root / "data", root), nprocs=WORLD_SIZE, join=True)
    single = _calibrate(model_dir, root / "data")
    single["awq_loss"] = _awq_loss(list(range(SAMPLES)))
    return single, [torch.load(root / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_each_rank_calibrates_its_partition_and_the_reduced_hessians_equal_one_process(runs):
    single, ranks = runs
    distributed = {name: h for result in ranks for name, h in result["hessians"].items()}
    assert all(result["hessians"] for result in ranks)  # both ranks compressed modules
    assert sum(len(result["hessians"]) for result in ranks) == len(single["hessians"]) == 14  # no module twice
    for name, hessian in single["hessians"].items():
        torch.testing.assert_close(distributed[name], hessian, rtol=1e-4, atol=1e-5)


def test_every_rank_ends_with_the_single_process_smoothing_and_quantization(runs):
    single, ranks = runs
    for result in ranks:
        for name, norm in single["norms"].items():
            torch.testing.assert_close(result["norms"][name], norm, rtol=1e-5, atol=1e-6)  # reduced min/max
        for name, scale in single["scales"].items():
            torch.testing.assert_close(result["scales"][name], scale, rtol=1e-3, atol=1e-6)


def test_qig_awq_loss_is_summed_over_ranks(runs):
    single, ranks = runs
    assert [result["awq_loss"] for result in ranks] == pytest.approx([single["awq_loss"]] * WORLD_SIZE, rel=1e-9)
