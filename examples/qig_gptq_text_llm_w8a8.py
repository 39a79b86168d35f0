"""QIG-GPTQ on a text-only LLM at W8A8: int8 weights, int8 dynamic per-token activations (vLLM serves it on any
CPU and on GPUs).

    python examples/qig_gptq_text_llm_w8a8.py      # quantize environment

MODEL_ID: this project's offline SmolLM2-135M-Instruct (built into ~/.cache/qig-plugin on first use), a hub id
(e.g. meta-llama/Llama-3.1-8B-Instruct) or a local folder; NUM_CALIBRATION_SAMPLES and SAVE_DIR from the
environment too.
"""

import os

from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from qig_plugin.data import batch_one_collator, build_calibration_dataset, shipped_text_records
from qig_plugin.models import build_text_model
from qig_plugin.modifiers import QIGGPTQModifier

MODEL_ID = os.environ.get("MODEL_ID") or str(build_text_model())  # e.g. "meta-llama/Llama-3.1-8B-Instruct"
NUM_CALIBRATION_SAMPLES = int(os.environ.get("NUM_CALIBRATION_SAMPLES", "16"))
SAVE_DIR = os.environ.get("SAVE_DIR", os.path.basename(MODEL_ID.rstrip("/")) + "-QIG-GPTQ-W8A8")

model = AutoModelForCausalLM.from_pretrained(MODEL_ID, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)

# Calibration data: the shipped documentation-passage records (prompt + answer), in the model's chat template
# ("prompt, blank line, answer" for a base model without one).
records = shipped_text_records("calibration")[:NUM_CALIBRATION_SAMPLES]
dataset = build_calibration_dataset(records, tokenizer, max_length=2048)

recipe = QIGGPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])

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
