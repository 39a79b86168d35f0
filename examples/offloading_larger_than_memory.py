"""QIG-GPTQ at W4A16 on a model larger than memory: compressed-tensors offloads the weights that do not fit in
MAX_CPU_MEMORY to disk, and llm-compressor's sequential pipeline onloads one decoder layer at a time. QIG attributes
inside the onloaded layer, so its extra memory is one block's, not the model's.

    python examples/offloading_larger_than_memory.py    # quantize environment

MODEL_ID: the offline SmolLM2-135M-Instruct (its 540 MB of float32 weights against a 100 MB limit here), a hub id
or a local folder; MAX_CPU_MEMORY, OFFLOAD_FOLDER, NUM_CALIBRATION_SAMPLES and SAVE_DIR from the environment too.
Saving onloads the model again (save_pretrained is not bounded by the limit).
"""

import os

import torch
from compressed_tensors.offload import load_offloaded_model
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from qig_plugin.data import batch_one_collator, build_calibration_dataset, shipped_text_records
from qig_plugin.models import build_text_model
from qig_plugin.modifiers import QIGGPTQModifier

MODEL_ID = os.environ.get("MODEL_ID") or str(build_text_model())  # e.g. "meta-llama/Llama-3.3-70B-Instruct"
MAX_CPU_MEMORY = os.environ.get("MAX_CPU_MEMORY", "100MB")  # weights beyond this go to OFFLOAD_FOLDER
OFFLOAD_FOLDER = os.environ.get("OFFLOAD_FOLDER", "offload")
NUM_CALIBRATION_SAMPLES = int(os.environ.get("NUM_CALIBRATION_SAMPLES", "16"))
SAVE_DIR = os.environ.get("SAVE_DIR", os.path.basename(MODEL_ID.rstrip("/")) + "-QIG-GPTQ-W4A16-offloaded")

# Load with compressed-tensors' offloading: as much as fits in MAX_CPU_MEMORY, the rest on disk.
with load_offloaded_model():
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_ID, dtype=torch.float32, device_map="auto_offload", max_memory={"cpu": MAX_CPU_MEMORY},
        offload_folder=OFFLOAD_FOLDER,
    )
tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)

records = shipped_text_records("calibration")[:NUM_CALIBRATION_SAMPLES]
dataset = build_calibration_dataset(records, tokenizer, max_length=2048)

# int4 symmetric groups (128, or 64 for SmolLM2's width 576)
width = model.config.hidden_size
recipe = QIGGPTQModifier(
    ignore=["lm_head"],
    config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128 if width % 128 == 0 else 64,
    }}},
)

oneshot(
    model=model,
    processor=tokenizer,
    dataset=dataset,
    recipe=recipe,
    num_calibration_samples=len(dataset),
    data_collator=batch_one_collator,
    pipeline="sequential",
)

print("========== SAMPLE GENERATION ==============")
question = "What is the capital of France?"
if tokenizer.chat_template:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
else:
    text = question + "\n\n"
inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
output = model.generate(**inputs, max_new_tokens=16, do_sample=False)  # onloads layer by layer: slow
print(question, "->", tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print("==========================================")

model.save_pretrained(SAVE_DIR, save_compressed=True)
tokenizer.save_pretrained(SAVE_DIR)
print(f"saved {SAVE_DIR}")
