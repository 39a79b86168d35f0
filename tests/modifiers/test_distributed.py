"""QIG under llm-compressor's distributed calibration: 2 CPU processes (gloo) against one process.

Each rank calibrates its own shard of the samples (llm-compressor 0.14.0.1's automatic partition of a dataset
that is identical on every rank is broken: it builds the sampler over the rank's partition but indexes the
full dataset with it, so every rank calibrates the first partition; give each rank its own shard instead).
GPTQ then sums every module's Hessian onto the rank that compresses it and
broadcasts the result, and AWQ sums its grid-search loss. QIG's token weights are per sample, so each rank
computes its own samples' weights; the reduced Hessians and losses must then equal the single-process ones.

Only the first decoder layer is compared with the single process: its inputs are the embeddings on every
rank. Later layers see the quantized earlier layers, which llm-compressor shares between ranks through the
offloaded CPU memory of a model loaded for distributed use (it skips the qparam broadcast for CPU modules).
These processes were thought not to share it, but ``oneshot`` does put their weights in shared memory
(``DistributedCPUCache``, see below), so why QIG-GPTQ's later layers differ is not established.

QIG-SmoothQuant all-reduces its weighted channel ranges as stock does, and every rank smooths the same
weights, which ``oneshot`` keeps in memory shared by the ranks: its smoothed norms and balance weights must
equal the single-process ones in both layers, each smoothed once.

Tolerances follow from the arithmetic, not from one machine's rounding. The single process runs with the
ranks' one thread, so every sample goes through the same kernels in both runs and gives the same floats;
what differs is only how per-sample results are combined. Min/max reductions (SmoothQuant's ranges, the
observers' weight ranges) are exact in any order, so those results must be equal. Sums are not: a float32
sum of n terms, in any order or blocking, is within ``gamma_n * sum |terms|`` of the exact sum
(``gamma_n = n u / (1 - n u)``, ``u = 2^-24``), so two orders differ by at most twice that. An element of the
Hessian that is a small difference of large terms (AVX-512 kernels block the sums differently) can therefore
differ by far more than a fixed ``atol`` allows, and a fixed ``rtol`` says nothing about it.
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
SAMPLES = 4
FIRST_LAYER = "model.layers.0."
THREADS = 1  # every process, the single one included: the same kernels on every sample
AWQ_TOKENS = 5  # tokens per batch of the AWQ loss check
FLOAT32_UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2
FLOAT64_UNIT_ROUNDOFF = torch.finfo(torch.float64).eps / 2


def _gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n``: the relative error bound of ``n`` roundings (e.g. a sum of ``n + 1`` terms)."""
    return n * u / (1 - n * u)


def _calibrate(model_dir: Path, data_dir: Path, shard: range) -> dict:
    """QIG-GPTQ (W8A8) on ``shard`` of the saved samples; what this process computed, by name."""
    from datasets import load_from_disk
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import base as gptq_base

    from qig_plugin.modifiers import QIGGPTQModifier
    from tests.modifiers.tiny_llama import load_tiny_llama, tiny_tokenizer

    hessians, abs_hessians, terms = {}, {}, {}
    abs_sums, token_counts = {}, {}
    real_calibrate = gptq_base.GPTQModifier.calibrate_module
    real_compress = gptq_base.GPTQModifier.compress_module_list

    def record_terms(self, module, args, output):
        # GPTQ adds 2 a_t a_t^T per token row a_t of its input (QIG's rows come scaled by sqrt(lambda_t)):
        # sum 2 |a_t| |a_t|^T (float64) bounds each element's rounding
        rows = args[0].detach().reshape(-1, args[0].shape[-1]).double().abs()
        abs_sums[module] = abs_sums.get(module, 0) + 2 * rows.T @ rows
        token_counts[module] = token_counts.get(module, 0) + rows.shape[0]
        return real_calibrate(self, module, args, output)

    def record_hessians(self, module_list):
        for module in module_list:
            name = self._module_names[module]
            hessians[name] = (self._hessians[module] / self._num_samples[module]).clone()
            abs_hessians[name] = abs_sums[module] / self._num_samples[module].item()
            terms[name] = token_counts[module]
        return real_compress(self, module_list)

    gptq_base.GPTQModifier.calibrate_module = record_terms
    gptq_base.GPTQModifier.compress_module_list = record_hessians
    model = load_tiny_llama(model_dir)
    try:
        oneshot(
            model=model,
            processor=tiny_tokenizer(),
            dataset=load_from_disk(str(data_dir)).select(shard),
            recipe=[QIGGPTQModifier(qig_steps=2, scheme="W8A8", ignore=["lm_head"])],
            num_calibration_samples=len(shard),
            pipeline="sequential",
            shuffle_calibration_samples=False,
        )
    finally:  # the single-process run happens in the test process: later tests get stock GPTQ back
        gptq_base.GPTQModifier.calibrate_module = real_calibrate
        gptq_base.GPTQModifier.compress_module_list = real_compress
    return {
        "hessians": hessians,
        "abs_hessians": abs_hessians,  # this process's own samples only
        "terms": terms,
        "scales": {n: m.weight_scale.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_scale")},
    }


def _smoothquant(model_dir: Path, data_dir: Path, shard: range) -> dict[str, torch.Tensor]:
    """QIG-SmoothQuant (then W8A8) on ``shard``: every smoothed norm and balance linear weight, by name."""
    from datasets import load_from_disk
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from qig_plugin.modifiers import QIGSmoothQuantModifier
    from tests.modifiers.tiny_llama import load_tiny_llama, tiny_tokenizer

    model = load_tiny_llama(model_dir)
    oneshot(
        model=model,
        processor=tiny_tokenizer(),
        dataset=load_from_disk(str(data_dir)).select(shard),
        recipe=[
            QIGSmoothQuantModifier(smoothing_strength=0.8, qig_steps=2),
            QuantizationModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"]),
        ],
        num_calibration_samples=len(shard),
        pipeline="sequential",
        shuffle_calibration_samples=False,
    )
    smoothed = ("layernorm", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(smoothed)}


def _awq_loss(batches: list[int]) -> float:
    """QIG-AWQ's grid-search loss over the given batches of a fixed random set (distributed: summed over ranks)."""
    from qig_plugin.modifiers import QIGAWQModifier

    generator = torch.Generator().manual_seed(0)
    reference = [torch.randn(1, AWQ_TOKENS, 8, generator=generator) for _ in range(SAMPLES)]
    candidate = [torch.randn(1, AWQ_TOKENS, 8, generator=generator) for _ in range(SAMPLES)]
    weights = [torch.rand(1, AWQ_TOKENS, generator=generator) * (i + 1) for i in range(SAMPLES)]
    modifier = QIGAWQModifier()
    modifier._loss_weights = [weights[i] for i in batches]
    return modifier.search_loss([reference[i] for i in batches], [candidate[i] for i in batches])


def _rank_main(rank: int, port: int, model_dir: Path, data_dir: Path, out_dir: Path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        shard = range(rank * SAMPLES // WORLD_SIZE, (rank + 1) * SAMPLES // WORLD_SIZE)
        result = _calibrate(model_dir, data_dir, shard)
        result["awq_loss"] = _awq_loss(list(shard))
        result["smoothquant"] = _smoothquant(model_dir, data_dir, shard)
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
    random_token_dataset(samples=SAMPLES).save_to_disk(str(root / "data"))
    mp.spawn(_rank_main, args=(_free_port(), model_dir, root / "data", root), nprocs=WORLD_SIZE, join=True)
    # with the machine's thread count, matmuls and QIG's weights would round differently from the ranks'
    # (a few ulps on this model, more through a quantized layer): not what these tests compare
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        single = _calibrate(model_dir, root / "data", range(SAMPLES))
        single["awq_loss"] = _awq_loss(list(range(SAMPLES)))
        single["smoothquant"] = _smoothquant(model_dir, root / "data", range(SAMPLES))
    finally:
        torch.set_num_threads(threads)
    return single, [torch.load(root / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_each_rank_calibrates_its_partition_and_the_reduced_hessians_equal_one_process(runs):
    single, ranks = runs
    distributed = {name: h for result in ranks for name, h in result["hessians"].items()}
    assert all(result["hessians"] for result in ranks)  # both ranks compressed modules
    assert sum(len(result["hessians"]) for result in ranks) == len(single["hessians"]) == 14  # no module twice
    first_layer = [name for name in single["hessians"] if name.startswith(FIRST_LAYER)]
    assert len(first_layer) == 7
    for name in first_layer:
        # both are the same n float32 terms over the same sample count (a power of 2 here), summed in two
        # orders (one process's batches vs each rank's, then the reduce) and divided: each within
        # gamma_{n+1} sum |terms| of the exact value. A missing rank, a doubled sample or unreduced counts
        # exceed this bound on the diagonal (whose terms are all positive) by a factor over 10^4.
        n = single["terms"][name]
        bound = 2 * _gamma(n + 1, FLOAT32_UNIT_ROUNDOFF) * single["abs_hessians"][name]
        error = (distributed[name].double() - single["hessians"][name].double()).abs()
        worst = (error / bound).nan_to_num(nan=0.0, posinf=float("inf")).max().item()  # 0/0: both exact
        assert worst <= 1, f"{name}: |distributed - single| reaches {worst:.3g} x its rounding bound ({n} terms)"


def test_each_modules_owner_rank_quantizes_it_as_one_process_does(runs):
    single, ranks = runs
    for result in ranks:
        for name in result["hessians"]:  # the modules this rank compressed
            if name.startswith(FIRST_LAYER):
                # W8A8's channel scales come from the weights' min/max (exact in any order), not the Hessian
                torch.testing.assert_close(result["scales"][name], single["scales"][name], rtol=0, atol=0)


def test_qig_awq_loss_is_summed_over_ranks(runs):
    # One process divides by each batch's float32 weight sum, the ranks all-reduce float64 sums: per batch
    # (AWQ_TOKENS weights, all positive) they differ by at most gamma_{AWQ_TOKENS-1} relative, the ratio of
    # the summed error to the summed weights by at most twice that, plus float64 rounding. A rank's own
    # loss or an unweighted mean of the ranks' losses is off by over 100 times this.
    single, ranks = runs
    rel = 2 * _gamma(AWQ_TOKENS - 1, FLOAT32_UNIT_ROUNDOFF) + _gamma(4 * SAMPLES, FLOAT64_UNIT_ROUNDOFF)
    assert [result["awq_loss"] for result in ranks] == pytest.approx([single["awq_loss"]] * WORLD_SIZE, rel=rel)


def test_qig_smoothquant_smooths_every_layer_once_as_one_process_does(runs):
    # the reduced weighted ranges give every rank the single-process scales; the model's CPU weights are in
    # memory shared by the ranks, so each rank writing ``W / s`` over ``W`` in place would leave some
    # layers smoothed twice (``W / s^2``, ``W * s^2``: norms up to 84% off here) depending on timing.
    # Ranges are min/max over tokens and ranks (exact in any order) of per-sample values both runs compute
    # alike, and the smoothing is the same elementwise arithmetic: equal, in the second layer too.
    single, ranks = runs
    assert len(single["smoothquant"]) == 2 * (2 + 5)  # layers x (2 norms, 5 balance linears)
    for result in ranks:
        for name, weight in single["smoothquant"].items():
            torch.testing.assert_close(
                result["smoothquant"][name], weight, rtol=0, atol=0, msg=lambda m: f"{name}: {m}"
            )
