"""QIG-GPTQ inside llm-compressor's sequential onloading, with every weight offloaded to disk.

The tiny Llama is loaded through compressed-tensors' ``load_offloaded_model`` with
``device_map={"": "disk"}``: every parameter stays a meta tensor backed by a safetensors file in the
offload folder, and the sequential pipeline reads one decoder layer back at a time. The real
``oneshot`` then runs QIG-GPTQ on it; the compressed checkpoint must equal, tensor for tensor,
the one from the same run on the model loaded fully in memory. The benchmark on a model larger
than a memory limit is ``benchmarks/offload_memory.py``.
"""

import os
from pathlib import Path

import torch
from compressed_tensors.offload import load_offloaded_model
from compressed_tensors.offload.cache import DiskCache, OffloadCache
from llmcompressor import oneshot
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.modifiers import QIGGPTQModifier
from tests.modifiers.tiny_llama import SEQ, random_token_dataset, tiny_tokenizer

SCHEME = {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head"]}
SAMPLES = 2


def calibrate(model) -> None:
    oneshot(
        model=model,
        processor=tiny_tokenizer(),
        dataset=random_token_dataset(samples=SAMPLES),
        recipe=QIGGPTQModifier(**SCHEME),
        num_calibration_samples=SAMPLES,
        max_seq_length=SEQ,
        pipeline="sequential",
        shuffle_calibration_samples=False,
    )


def save(model, output_dir: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(output_dir, save_compressed=True)
    return load_file(output_dir / "model.safetensors")


def offloaded(module: torch.nn.Module, suffix: str = "") -> list[torch.Tensor]:
    """The parameters a module's offload caches hold (meta tensors when on disk), without onloading them."""
    with OffloadCache.disable_onloading():
        return [p for name, p in module.named_parameters() if name.endswith(suffix)]


def test_qig_gptq_offloaded_to_disk_gives_the_in_memory_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    calibrate(model)
    in_memory = save(model, tmp_path / "mem")

    offload_dir = tmp_path / "offload"
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            tiny_llama_dir, dtype=torch.float32, device_map={"": "disk"}, offload_folder=str(offload_dir)
        )
    layers = model.model.layers
    with_weights = [m for m in layers.modules() if len(m._parameters)]
    assert len(with_weights) == 2 * 9 and all(isinstance(m._parameters, DiskCache) for m in with_weights)
    assert all(p.is_meta for p in offloaded(model))  # nothing of the model is held in memory
    assert len(os.listdir(offload_dir)) > 0

    # right after layer 1 runs on a batch (calibrating, then propagating), its weights are onloaded
    # and layer 0's are not: they went back to disk
    seen = []

    def layer_one_ran(_module, _args, output):
        if output.is_meta:  # llm-compressor's shape-only pass while preparing the pipeline
            return
        onloaded = OffloadCache.keep_onloaded_values
        seen.append(
            (
                sum(t in onloaded for t in offloaded(layers[0])),
                sum(t in onloaded for t in offloaded(layers[1], "weight")),
                all(t.is_meta for t in offloaded(layers)),
            )
        )

    layers[1].register_forward_hook(layer_one_ran)
    layer_one_weights = len(offloaded(layers[1], "weight"))
    assert layer_one_weights == 9  # 7 linears, 2 norms
    attributed = []
    attribute = QIGGPTQModifier.group_weights

    def spy(self, group, args, kwargs):  # the real attribution, recording where it ran
        attributed.append(group.block_name)
        return attribute(self, group, args, kwargs)

    monkeypatch.setattr(QIGGPTQModifier, "group_weights", spy)
    calibrate(model)

    assert len(seen) == 2 * SAMPLES and all(s == (0, layer_one_weights, True) for s in seen), seen
    assert len(attributed) == SAMPLES * 2 * 4  # samples x layers x groups, all on disk-offloaded layers
    # GPTQ wrote the quantized layers back to the offload folder: real files replaced the checkpoint symlinks
    weights = [DiskCache.index[t]["safetensors_file"] for t in offloaded(layers, "proj.weight")]
    assert len(weights) == 14
    assert all(Path(f).parent == offload_dir.resolve() and not Path(f).is_symlink() for f in weights)

    on_disk = save(model, tmp_path / "disk")

    assert in_memory.keys() == on_disk.keys()
    assert sum(name.endswith("weight_packed") for name in on_disk) == 14
    different = [name for name in in_memory if not torch.equal(in_memory[name], on_disk[name])]
    assert not different
