"""QIG-SmoothQuant + GPTQ on a vision-language model at W8A8: SmoothQuant's activation ranges measured over
QIG-weighted tokens, then GPTQ to int8 weights with int8 dynamic per-token activations. vLLM serves W8A8 on any
CPU (and on GPUs): vllm_offline.py, vllm_openai_server.sh.

    python examples/qig_smoothquant_gptq_vlm_w8a8.py      # quantize environment

MODEL_ID: the offline default VLM, a hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or a local folder;
NUM_CALIBRATION_SAMPLES and SAVE_DIR from the environment too.
"""

import os

from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForImageTextToText

from qig_plugin.data import batch_one_collator, build_calibration_dataset, shipped_records
from qig_plugin.loading import auto_processor
from qig_plugin.models import build_default_model
from qig_plugin.modifiers import QIGSmoothQuantModifier
from qig_plugin.quantize import decoder_layer_class

MODEL_ID = os.environ.get("MODEL_ID") or str(build_default_model())  # e.g. "Qwen/Qwen2.5-VL-7B-Instruct"
NUM_CALIBRATION_SAMPLES = int(os.environ.get("NUM_CALIBRATION_SAMPLES", "16"))
SAVE_DIR = os.environ.get("SAVE_DIR", os.path.basename(MODEL_ID.rstrip("/")) + "-QIG-SQ-GPTQ-W8A8")

model = AutoModelForImageTextToText.from_pretrained(MODEL_ID, dtype="auto")
processor = auto_processor(MODEL_ID)

records = shipped_records("calibration")[:NUM_CALIBRATION_SAMPLES]
dataset = build_calibration_dataset(records, processor, max_length=2048)

# Recipe: QIG-SmoothQuant (mappings: the model's own, scoped to the language model), then stock GPTQ at W8A8
# (use QIGGPTQModifier to weight GPTQ's Hessian by QIG too).
recipe = [
    QIGSmoothQuantModifier(smoothing_strength=0.8),
    GPTQModifier(
        targets="Linear",
        scheme="W8A8",
        ignore=["re:.*lm_head", "re:.*vision_model.*", "re:.*vision_tower.*", "re:.*visual.*", "re:.*connector.*",
                "re:.*multi_modal_projector.*"],
    ),
]

oneshot(
    model=model,
    processor=processor,
    dataset=dataset,
    recipe=recipe,
    num_calibration_samples=len(dataset),
    data_collator=batch_one_collator,
    sequential_targets=[decoder_layer_class(model)],
    pipeline="sequential",
)

print("========== SAMPLE GENERATION ==============")
sample = shipped_records("heldout")[0]
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[prompt], images=[[sample.image]], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(sample.prompt, "->", processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print("==========================================")

model.save_pretrained(SAVE_DIR, save_compressed=True)
processor.save_pretrained(SAVE_DIR)
if hasattr(processor, "image_processor"):
    processor.image_processor.save_pretrained(SAVE_DIR)  # preprocessor_config.json, which vLLM reads
print(f"saved {SAVE_DIR}")
