"""Distributed calibration: QIG-GPTQ at W8A8 across processes (llm-compressor 0.14's multi-process mode), each rank
calibrating its own share of the samples. GPTQ sums every module's QIG-weighted Hessian onto the rank that
compresses it; every rank takes part in saving, rank 0 writes the checkpoint.

    torchrun --standalone --nproc-per-node 2 examples/distributed_calibration.py     # quantize environment

On GPUs each rank takes its own device (NCCL); on a CPU the ranks are processes (gloo). MODEL_ID: the offline
SmolLM2-135M-Instruct, a hub id or a local folder; NUM_CALIBRATION_SAMPLES and SAVE_DIR from the environment too.
"""

import os

import torch
import torch.distributed as dist
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from qig_plugin.data import batch_one_collator, build_calibration_dataset, shipped_text_records
from qig_plugin.models import build_text_model
from qig_plugin.modifiers import QIGGPTQModifier

if torch.accelerator.is_available():
    from compressed_tensors.distributed.utils import init_dist

    init_dist()  # one accelerator per rank
else:
    dist.init_process_group("gloo")  # CPU processes
rank, world_size = dist.get_rank(), dist.get_world_size()

MODEL_ID = os.environ.get("MODEL_ID") or str(build_text_model())  # e.g. "meta-llama/Llama-3.1-8B-Instruct"
NUM_CALIBRATION_SAMPLES = int(os.environ.get("NUM_CALIBRATION_SAMPLES", "16"))
SAVE_DIR = os.environ.get("SAVE_DIR", os.path.basename(MODEL_ID.rstrip("/")) + "-QIG-GPTQ-W8A8-distributed")

model = AutoModelForCausalLM.from_pretrained(MODEL_ID, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)

# Each rank tokenizes its own contiguous share of the samples (llm-compressor 0.14 would give every rank the
# first share of a dataset that is the same on all ranks).
records = shipped_text_records("calibration")[:NUM_CALIBRATION_SAMPLES]
share = records[rank * len(records) // world_size : (rank + 1) * len(records) // world_size]
dataset = build_calibration_dataset(share, tokenizer, max_length=2048)

oneshot(
    model=model,
    processor=tokenizer,
    dataset=dataset,
    recipe=QIGGPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    num_calibration_samples=len(dataset),
    data_collator=batch_one_collator,
    pipeline="sequential",
    shuffle_calibration_samples=False,
)

if rank == 0:
    print("========== SAMPLE GENERATION ==============")
    question = "What is the capital of France?"
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = question + "\n\n"
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    print(question, "->", tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    print("==========================================")
dist.barrier()

# Every rank takes part in saving (the ranks share the model's weights); rank 0 writes the checkpoint.
model.save_pretrained(SAVE_DIR, save_compressed=True)
if rank == 0:
    tokenizer.save_pretrained(SAVE_DIR)
    print(f"saved {SAVE_DIR}")
dist.destroy_process_group()
