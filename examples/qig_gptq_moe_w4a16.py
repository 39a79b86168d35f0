"""QIG-GPTQ on a mixture-of-experts LLM at W4A16. llm-compressor runs every expert on every calibration token
(moe_calibrate_all_experts); QIG weights each expert's rows by the token's QIG score times its routing weight, and
the rows that only fill the Hessian keep weight 1. The routers (mlp.gate) and lm_head stay in full precision.

    python examples/qig_gptq_moe_w4a16.py          # quantize environment

MODEL_ID: a hub id (here Qwen/Qwen3-30B-A3B) or a local folder (CI runs a tiny Qwen3-MoE); NUM_CALIBRATION_SAMPLES
and SAVE_DIR from the environment too.
"""

import os

from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from qig_plugin.data import batch_one_collator, build_calibration_dataset, shipped_text_records
from qig_plugin.modifiers import QIGGPTQModifier

MODEL_ID = os.environ.get("MODEL_ID", "Qwen/Qwen3-30B-A3B")
NUM_CALIBRATION_SAMPLES = int(os.environ.get("NUM_CALIBRATION_SAMPLES", "16"))
SAVE_DIR = os.environ.get("SAVE_DIR", os.path.basename(MODEL_ID.rstrip("/")) + "-QIG-GPTQ-W4A16")

model = AutoModelForCausalLM.from_pretrained(MODEL_ID, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)

records = shipped_text_records("calibration")[:NUM_CALIBRATION_SAMPLES]
dataset = build_calibration_dataset(records, tokenizer, max_length=2048)

# int4 symmetric groups of 64 (they divide the experts' width: 768 in Qwen3-30B-A3B)
recipe = QIGGPTQModifier(
    ignore=["lm_head", "re:.*mlp.gate$"],
    config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64,
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
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(question, "->", tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print("==========================================")

model.save_pretrained(SAVE_DIR, save_compressed=True)
tokenizer.save_pretrained(SAVE_DIR)
print(f"saved {SAVE_DIR}")
