"""QIG-GPTQ on a vision-language model at W4A16: int4 weights, 16-bit activations; the vision tower, the projector
and lm_head stay in full precision. GPTQ's Hessian weights every calibration token by its QIG score.

    python examples/qig_gptq_vlm_w4a16.py          # quantize environment

MODEL_ID: this project's offline default VLM (built into ~/.cache/qig-plugin on first use), or set it to a hub id
such as Qwen/Qwen2.5-VL-7B-Instruct or a local folder. NUM_CALIBRATION_SAMPLES and SAVE_DIR can be set in the
environment too (CI runs every example that way, on tiny models). vLLM serves W4A16 on a GPU or on a CPU with
AVX-512 (vllm_offline.py).
"""

import os

from llmcompressor import oneshot
from transformers import AutoModelForImageTextToText

from qig_plugin.data import batch_one_collator, build_calibration_dataset, shipped_records
from qig_plugin.loading import auto_processor
from qig_plugin.models import build_default_model
from qig_plugin.modifiers import QIGGPTQModifier
from qig_plugin.quantize import decoder_layer_class

MODEL_ID = os.environ.get("MODEL_ID") or str(build_default_model())  # e.g. "Qwen/Qwen2.5-VL-7B-Instruct"
NUM_CALIBRATION_SAMPLES = int(os.environ.get("NUM_CALIBRATION_SAMPLES", "16"))
MAX_SEQUENCE_LENGTH = 2048
SAVE_DIR = os.environ.get("SAVE_DIR", os.path.basename(MODEL_ID.rstrip("/")) + "-QIG-GPTQ-W4A16")

# Load the model and its processor.
model = AutoModelForImageTextToText.from_pretrained(MODEL_ID, dtype="auto")
processor = auto_processor(MODEL_ID)  # AutoProcessor (SmolVLM's without torchvision)

# Calibration data: the shipped photo + prompt + answer records (use your own CalibrationRecords the same way),
# each rendered with the model's chat template into one tokenized conversation.
records = shipped_records("calibration")[:NUM_CALIBRATION_SAMPLES]
dataset = build_calibration_dataset(records, processor, max_length=MAX_SEQUENCE_LENGTH)

# Recipe: QIG-GPTQ, int4 symmetric groups (128, or 64 for a width such as the default model's 576).
width = model.config.get_text_config().hidden_size
recipe = QIGGPTQModifier(
    ignore=["re:.*lm_head", "re:.*vision_model.*", "re:.*vision_tower.*", "re:.*visual.*", "re:.*connector.*",
            "re:.*multi_modal_projector.*"],
    config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128 if width % 128 == 0 else 64,
    }}},
)

# Calibrate with llm-compressor's sequential pipeline, one text decoder layer at a time.
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

# Confirm generations of the quantized model look sane.
print("========== SAMPLE GENERATION ==============")
sample = shipped_records("heldout")[0]
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[prompt], images=[[sample.image]], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(sample.prompt, "->", processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print("==========================================")

# Save to disk compressed.
model.save_pretrained(SAVE_DIR, save_compressed=True)
processor.save_pretrained(SAVE_DIR)
if hasattr(processor, "image_processor"):
    processor.image_processor.save_pretrained(SAVE_DIR)  # preprocessor_config.json, which vLLM reads
print(f"saved {SAVE_DIR}")
