"""Train the default model's vision tower and connector on easy-VQA's TRAIN split, the language model frozen.

    python -m qig_plugin.models.train_vision [--output FILE] [--work-dir DIR] [--seed 0] [--threads 2] ...

The language model (SmolLM2-135M-Instruct), its embeddings and ``lm_head`` stay frozen: only the Idefics3 vision
tower and connector learn, so the trained model is still an ordinary SmolVLM that llm-compressor traces and vLLM
serves. Two stages, both seeded:

1. **prompts** (``prompt_steps``): one soft prompt per (colour, shape) pair, ``[IMAGE_SEQ_LEN, hidden]`` image-token
   embeddings started from the language model's own embeddings of the words (" red circle", tiled), learns to make
   the frozen language model answer every question about an image of that pair. Each example is one easy-VQA
   question in the model's chat template (system prompt, user turn with the image then the question as easy-VQA
   words it, assistant turn with the answer word); the loss is the cross-entropy of the answer tokens and the
   closing ``<|im_end|>``, back-propagated through the frozen language model into the prompt. The image's pair comes
   from what its questions say (``easy_vqa.image_labels``), so this stage needs no vision at all.
2. **vision** (``vision_steps``): the vision tower and connector learn to emit the prompt of the image's pair (squared
   error relative to the prompt's power), with two linear heads on every output token of the tower naming the
   shape and the colour (a training aid, not shipped: the dense classification loss learns shapes far faster than
   the regression alone). No language-model pass: this stage is cheap.

Splitting the work this way keeps the expensive passes through the language model off the vision tower, and the
vision tower's mistakes off the prompts. Training images are mirrored left-right at random (shape and colour do not
change). Images of ``easy_vqa.validation_image_ids()`` are never trained on: they measure first-token accuracy
(overall, per type, and balanced over the yes/no groups) every ``eval_every`` steps. The TEST split is not touched
here. The state is checkpointed to ``--work-dir`` (default ``$QIG_CACHE/train/<settings hash>``) every
``checkpoint_every`` steps, so an interrupted run resumes where it stopped; ``train.log`` there has one JSON line
per evaluation. The result (bfloat16 safetensors with the settings and validation accuracy in its metadata) goes
to ``--output``, by default the file the package ships (``default_model.VISION_WEIGHTS_FILE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
)

from qig_plugin.data import easy_vqa
from qig_plugin.models.default_model import (
    IMAGE_SEQ_LEN,
    IMAGE_TOKEN,
    VISION_CONFIG,
    VISION_WEIGHTS_FILE,
    cache_root,
    assemble_default_model,
    save_vision_weights,
)

PAIRS = tuple((color, shape) for color in easy_vqa.COLORS for shape in easy_vqa.SHAPES)
PAIRS_COLOR_ROW = tuple(easy_vqa.COLORS.index(color) for color, _ in PAIRS)
PAIRS_SHAPE_ROW = tuple(easy_vqa.SHAPES.index(shape) for _, shape in PAIRS)


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    # stage 1: a soft prompt per (colour, shape) pair, through the frozen language model
    prompt_steps: int = 500
    prompt_batch: int = 16  # questions per step, each about its own image
    prompt_lr: float = 1e-2
    # stage 2: the vision tower and connector regress the prompt of their image's pair (no language model)
    vision_steps: int = 2000
    vision_batch: int = 32
    vision_lr: float = 2e-3
    head_weight: float = 1.0  # of the shape/colour heads' loss beside the prompt regression
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05  # of each stage's steps: linear LR warm-up, then cosine decay to 2%
    eval_every: int = 100
    eval_questions: int = 400  # validation questions (train images held out) per evaluation
    checkpoint_every: int = 50

    def digest(self) -> str:
        """A short hash of the settings and the vision architecture: names the work folder."""
        text = json.dumps([dataclasses.asdict(self), VISION_CONFIG, IMAGE_SEQ_LEN], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# Inputs: images as pixel tensors, questions as token ids around the image


def pixel_values(processor: Idefics3Processor, images: list[Image.Image], batch: int = 256) -> torch.Tensor:
    """The processor's own pixel values of each image: ``[len(images), 3, H, W]`` float32."""
    chunks = []
    for start in range(0, len(images), batch):
        encoded = processor.image_processor([[image] for image in images[start : start + batch]], return_tensors="pt")
        values = encoded["pixel_values"]  # [n, 1, 3, H, W]: one image, no splitting
        if values.shape[1] != 1:
            raise RuntimeError(f"expected one image tile per image, got {values.shape[1]}")
        chunks.append(values[:, 0].float())
    return torch.cat(chunks)


def load_split_pixels(processor: Idefics3Processor, split: str) -> tuple[torch.Tensor, dict[int, int]]:
    """Pixel values of every image of an easy-VQA split and ``{image id: row}``."""
    paths = easy_vqa.image_paths(split)
    ids = sorted(paths)
    images = []
    for image_id in ids:
        with Image.open(paths[image_id]) as image:
            images.append(image.convert("RGB"))
    return pixel_values(processor, images), {image_id: row for row, image_id in enumerate(ids)}


class ChatLayout:
    """Token ids of easy-VQA conversations in the model's chat template, split as the training forward needs.

    Every conversation is ``prefix + suffix``: ``prefix`` (the system turn and ``<|im_start|>user\\n``) is the same
    for all and is run once into a KV cache; ``suffix`` starts with the image's tokens (``<fake_token_around_image>
    <global-img>`` + ``IMAGE_SEQ_LEN`` x ``<image>`` + ``<fake_token_around_image>``), then the question, the end of
    the user turn, ``<|im_start|>assistant\\n``, the answer and ``<|im_end|>``.
    """

    def __init__(self, processor: Idefics3Processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id = self.tokenizer.pad_token_id
        self._dummy = Image.new("RGB", (8, 8))
        full = self._ids("what color is the shape?", "red")
        first_image = full.index(self.image_token_id)
        self.prefix_ids = full[: first_image - 2]  # before <fake_token_around_image><global-img>
        self.image_offset = 2  # the <image> tokens' start inside the suffix
        self.image_seq_len = processor.image_seq_len
        self._cache: dict[tuple[str, str | None], tuple[list[int], int]] = {}

    def _ids(self, question: str, answer: str | None) -> list[int]:
        text = self.processor.apply_chat_template(
            easy_vqa.conversation(question, answer), add_generation_prompt=answer is None
        )
        encoded = self.processor(text=text, images=[[self._dummy]], add_special_tokens=False)
        return list(encoded["input_ids"][0])

    def suffix(self, question: str, answer: str | None = None) -> tuple[list[int], int]:
        """``(suffix ids, answer start)``: with an answer, the ids end with the answer's ``<|im_end|>`` (the
        template's trailing newline dropped) and ``answer start`` indexes the answer's first token; without one,
        the ids end with ``<|im_start|>assistant\\n`` and ``answer start`` is their length."""
        key = (question, answer)
        if key not in self._cache:
            prompt = self._ids(question, None)
            if prompt[: len(self.prefix_ids)] != self.prefix_ids:
                raise RuntimeError(f"the chat template's prefix differs for {question!r}")
            suffix_prompt = prompt[len(self.prefix_ids) :]
            image_positions = [i for i, t in enumerate(suffix_prompt) if t == self.image_token_id]
            if image_positions != list(range(self.image_offset, self.image_offset + self.image_seq_len)):
                raise RuntimeError(f"unexpected image token positions {image_positions}")
            if answer is None:
                self._cache[key] = (suffix_prompt, len(suffix_prompt))
            else:
                full = self._ids(question, answer)[len(self.prefix_ids) :]
                end = full.index(self.tokenizer.convert_tokens_to_ids("<|im_end|>"), len(suffix_prompt))
                if full[: len(suffix_prompt)] != suffix_prompt:
                    raise RuntimeError(f"the answer changes the prompt's tokens for {question!r}")
                self._cache[key] = (full[: end + 1], len(suffix_prompt))
        return self._cache[key]


# ---------------------------------------------------------------------------------------------------------------
# The model pieces


class VisionHeads(torch.nn.Module):
    """Shape and colour classifiers applied to every output token of the vision tower (a training aid, not shipped).

    Every token must name the image's shape and colour, so each one learns to gather them from the whole image
    through attention: this dense loss learns shapes several times faster than one on the mean-pooled output.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.shape = torch.nn.Linear(hidden, len(easy_vqa.SHAPES))
        self.color = torch.nn.Linear(hidden, len(easy_vqa.COLORS))

    def forward(self, vision_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token logits ``[n, tokens, 3]`` and ``[n, tokens, 8]``."""
        return self.shape(vision_hidden), self.color(vision_hidden)

    def loss(self, vision_hidden: torch.Tensor, shapes: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every token's shape and colour (-100: unknown, ignored)."""
        shape_logits, color_logits = self(vision_hidden)
        tokens = vision_hidden.shape[1]
        return F.cross_entropy(
            shape_logits.flatten(0, 1), shapes.repeat_interleave(tokens), ignore_index=-100
        ) + F.cross_entropy(color_logits.flatten(0, 1), colors.repeat_interleave(tokens), ignore_index=-100)

    def predict(self, vision_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape and colour class of each image from its tokens' mean logits."""
        shape_logits, color_logits = self(vision_hidden)
        return shape_logits.mean(1).argmax(-1), color_logits.mean(1).argmax(-1)


def vision_forward(model: Idefics3ForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower's last hidden state ``[n, patches, vision hidden]`` for pixel values ``[n, 3, H, W]``."""
    vision = model.config.vision_config
    patches_per_side = vision.image_size // vision.patch_size
    mask = torch.ones(pixels.shape[0], patches_per_side, patches_per_side, dtype=torch.bool)
    return model.model.vision_model(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image ``[n, 3, H, W]`` mirrored left-right at random (shape and colour do not change).

    Triangles stay upright, as in the data: no vertical flips or rotations. Random shifts slowed the shape heads'
    learning down (measured), so there are none.
    """
    mirrored = torch.rand(pixels.shape[0], generator=generator) < 0.5
    return torch.where(mirrored[:, None, None, None], pixels.flip(3), pixels)


def label_tensors(image_ids: list[int], labels: dict[int, dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape and colour class indices (-100 where the questions leave it unknown)."""
    shapes = [easy_vqa.SHAPES.index(labels[i]["shape"]) if "shape" in labels[i] else -100 for i in image_ids]
    colors = [easy_vqa.COLORS.index(labels[i]["color"]) if "color" in labels[i] else -100 for i in image_ids]
    return torch.tensor(shapes), torch.tensor(colors)


class FrozenLanguageModel:
    """Runs the frozen language model on chat suffixes after the cached shared prefix."""

    def __init__(self, model: Idefics3ForConditionalGeneration, layout: ChatLayout):
        self.model = model
        self.layout = layout
        self.text_model = model.model.text_model
        with torch.no_grad():
            prefix = torch.tensor([layout.prefix_ids])
            cache = self.text_model(input_ids=prefix, use_cache=True).past_key_values
        self.prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]

    def _cache(self, batch: int) -> DynamicCache:
        cache = DynamicCache()
        for index, (keys, values) in enumerate(self.prefix_kv):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)
        return cache

    def hidden_states(self, suffixes: list[list[int]], image_embeddings: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[batch, longest suffix, hidden]`` of right-padded suffixes.

        ``image_embeddings`` ``[batch, IMAGE_SEQ_LEN, hidden]`` replace the ``<image>`` token embeddings. Padding
        sits after each suffix's last token, so under the causal mask it changes nothing before it.
        """
        start, end = self.layout.image_offset, self.layout.image_offset + self.layout.image_seq_len
        if image_embeddings.shape[1] != end - start:
            raise ValueError(f"{image_embeddings.shape[1]} image embeddings for {end - start} <image> tokens")
        length = max(len(ids) for ids in suffixes)
        ids = torch.tensor([row + [self.layout.pad_id] * (length - len(row)) for row in suffixes])
        embeddings = self.text_model.embed_tokens(ids)
        embeddings = torch.cat(
            [embeddings[:, :start], image_embeddings.to(embeddings.dtype), embeddings[:, end:]],
            dim=1,
        )
        output = self.text_model(inputs_embeds=embeddings, past_key_values=self._cache(len(suffixes)), use_cache=True)
        return output.last_hidden_state

    def logits_at(self, hidden: torch.Tensor, rows: list[int], positions: list[int]) -> torch.Tensor:
        """``lm_head`` logits at the given (row, position) pairs only: ``[len(rows), vocab]``."""
        return self.model.lm_head(hidden[torch.tensor(rows), torch.tensor(positions)])


def answer_loss(lm: FrozenLanguageModel, questions: list[easy_vqa.Question], image_embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (and the closing ``<|im_end|>``) of each question, given its image
    tokens ``[len(questions), IMAGE_SEQ_LEN, hidden]``."""
    layout = lm.layout
    suffixes, rows, positions, targets = [], [], [], []
    for row, q in enumerate(questions):
        ids, answer_start = layout.suffix(q.question, q.answer)
        suffixes.append(ids)
        for position in range(answer_start, len(ids)):
            rows.append(row)
            positions.append(position - 1)  # the logits at position t - 1 predict token t
            targets.append(ids[position])
    # the last token (<|im_end|>) is only a target: drop it from the inputs
    hidden = lm.hidden_states([ids[:-1] for ids in suffixes], image_embeddings)
    return F.cross_entropy(lm.logits_at(hidden, rows, positions), torch.tensor(targets))


@torch.no_grad()
def first_token_answers(
    lm: FrozenLanguageModel,
    questions: list[easy_vqa.Question],
    image_embeddings: Callable[[list[easy_vqa.Question]], torch.Tensor],
    batch: int = 32,
) -> list[str]:
    """The easy-VQA answer whose first token is each question's greedy first answer token ("" if none is).

    ``image_embeddings(questions)`` gives the ``[len(questions), IMAGE_SEQ_LEN, hidden]`` image tokens of a chunk.
    The 13 answers start with 13 different tokens, so this is the greedy answer's first word unless the model
    stops inside a word; the final figures use real greedy generation (``qig_plugin.vqa``).
    """
    layout = lm.layout
    first_ids = {}
    for answer in easy_vqa.ANSWERS:
        ids, start = layout.suffix("what color is the shape?", answer)
        first_ids[ids[start]] = answer
    predicted = []
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        suffixes = [layout.suffix(q.question)[0] for q in chunk]
        hidden = lm.hidden_states(suffixes, image_embeddings(chunk))
        logits = lm.logits_at(hidden, list(range(len(chunk))), [len(ids) - 1 for ids in suffixes])
        predicted += [first_ids.get(token, "") for token in logits.argmax(-1).tolist()]
    return predicted
# ---------------------------------------------------------------------------------------------------------------
# Training


def pair_index(label: dict[str, str]) -> int | None:
    """The row of an image's (colour, shape) pair in :data:`PAIRS`, or None when its questions leave one unknown."""
    if "color" not in label or "shape" not in label:
        return None
    return PAIRS.index((label["color"], label["shape"]))


def initial_prompts(model: Idefics3ForConditionalGeneration, processor: Idefics3Processor) -> torch.Tensor:
    """``[len(PAIRS), image tokens, hidden]``: the language model's embeddings of " red circle" etc., tiled."""
    embeddings = model.model.text_model.embed_tokens.weight
    tokens = processor.image_seq_len
    prompts = []
    for color, shape in PAIRS:
        ids = processor.tokenizer(f" {color} {shape}", add_special_tokens=False)["input_ids"]
        prompts.append(embeddings[(ids * tokens)[:tokens]])
    return torch.stack(prompts).detach().clone()


class PairPrompts(torch.nn.Module):
    """The soft prompt (image-token embeddings ``[IMAGE_SEQ_LEN, hidden]``) of each (colour, shape) pair.

    ``prompt(pair) = start[pair] + shared + color[c] + shape[s] + own[pair]``: the learned parts start at zero, and
    the shared and per-attribute ones learn from every question about an image that has them, so what all images
    have in common (the form of the questions and answers) is learned from all of them at once.
    """

    def __init__(self, start: torch.Tensor):
        super().__init__()
        pairs, tokens, hidden = start.shape
        self.register_buffer("start", start)
        self.shared = torch.nn.Parameter(torch.zeros(tokens, hidden))
        self.color = torch.nn.Parameter(torch.zeros(len(easy_vqa.COLORS), tokens, hidden))
        self.shape = torch.nn.Parameter(torch.zeros(len(easy_vqa.SHAPES), tokens, hidden))
        self.own = torch.nn.Parameter(torch.zeros(pairs, tokens, hidden))

    def forward(self, pairs: list[int]) -> torch.Tensor:
        """``[len(pairs), IMAGE_SEQ_LEN, hidden]`` prompts of rows of :data:`PAIRS`."""
        colors = [PAIRS_COLOR_ROW[p] for p in pairs]
        shapes = [PAIRS_SHAPE_ROW[p] for p in pairs]
        return self.start[pairs] + self.shared + self.color[colors] + self.shape[shapes] + self.own[pairs]


def relative_squared_error(image_embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over images and tokens of ``|e - t|^2 / |t|^2`` for ``[n, tokens, hidden]`` embeddings and targets."""
    return ((image_embeddings - targets).pow(2).sum(-1) / targets.pow(2).sum(-1)).mean()


def _schedule(step: int, total: int, warmup_fraction: float) -> float:
    """LR factor: linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to 0.02."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batch_indices(seed: int, stage: str, step: int, batch: int, population: int) -> list[int]:
    """Rows of the step's batch: consecutive slices of a seeded permutation per epoch (the same after a resume)."""
    indices = []
    position = step * batch
    while len(indices) < batch:
        epoch, offset = divmod(position, population)
        order = list(range(population))
        random.Random(f"{seed}-{stage}-{epoch}").shuffle(order)
        take = min(batch - len(indices), population - offset)
        indices += order[offset : offset + take]
        position += take
    return indices


STAGES = ("prompts", "vision")


class Trainer:
    """The two stages, with checkpoints in ``work_dir``.

    ``model``/``processor`` default to the default model with its seeded random vision initialization
    (``assemble_default_model()``); pass others (an Idefics3 model and its processor) to train those instead.
    """

    def __init__(
        self,
        settings: TrainSettings,
        work_dir: Path,
        model: Idefics3ForConditionalGeneration | None = None,
        processor: Idefics3Processor | None = None,
    ):
        self.settings = settings
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        if model is None:
            model, processor = assemble_default_model()  # the seeded random vision init
        self.model = model.float()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.trained = torch.nn.ModuleDict(
            {"vision_model": self.model.model.vision_model, "connector": self.model.model.connector}
        )
        for parameter in self.trained.parameters():
            parameter.requires_grad_(True)
        torch.manual_seed(settings.seed)
        self.heads = VisionHeads(self.model.config.vision_config.hidden_size)
        self.lm = FrozenLanguageModel(self.model, ChatLayout(processor))
        self.prompts = PairPrompts(initial_prompts(self.model, processor))

        print("[qig] reading easy-VQA train images")
        self.pixels, self.rows_of = load_split_pixels(processor, "train")
        self.labels = easy_vqa.image_labels("train")
        held = easy_vqa.validation_image_ids()
        self.train_images = sorted(i for i in self.rows_of if i not in held)
        self.prompt_questions = [q for q in easy_vqa.training_questions() if self._pair(q) is not None]
        self.eval_questions = random.Random(settings.seed).sample(
            easy_vqa.validation_questions(), settings.eval_questions
        )
        self.stage, self.step = STAGES[0], 0
        self.optimizer = self._optimizer(self.stage)
        self._resume()

    def _pair(self, q: easy_vqa.Question) -> int | None:
        return pair_index(self.labels[q.image_id])

    # -- state

    def _optimizer(self, stage: str) -> torch.optim.Optimizer:
        s = self.settings
        if stage == "prompts":
            groups = [{"params": list(self.prompts.parameters()), "lr": s.prompt_lr, "weight_decay": 0.0}]
        else:
            groups = [{"params": [*self.trained.parameters(), *self.heads.parameters()], "lr": s.vision_lr}]
        for group in groups:
            group["base_lr"] = group["lr"]
        return torch.optim.AdamW(groups, weight_decay=s.weight_decay)

    def _stage_steps(self, stage: str) -> int:
        return {"prompts": self.settings.prompt_steps, "vision": self.settings.vision_steps}[stage]

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    def _save(self) -> None:
        state = {
            "settings": dataclasses.asdict(self.settings),
            "stage": self.stage,
            "step": self.step,
            "prompts": self.prompts.state_dict(),
            "trained": self.trained.state_dict(),
            "heads": self.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        staging = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, staging)
        staging.replace(self.checkpoint_path)

    def _resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        state = torch.load(self.checkpoint_path, weights_only=True)
        if state["settings"] != dataclasses.asdict(self.settings):
            raise RuntimeError(f"{self.checkpoint_path} was written with other settings; pass another --work-dir")
        self.prompts.load_state_dict(state["prompts"])
        self.trained.load_state_dict(state["trained"])
        self.heads.load_state_dict(state["heads"])
        self.stage, self.step = state["stage"], state["step"]
        self.optimizer = self._optimizer(self.stage)
        self.optimizer.load_state_dict(state["optimizer"])
        print(f"[qig] resumed from {self.checkpoint_path}: stage {self.stage}, step {self.step}")

    def log(self, record: dict) -> None:
        record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **record}
        with open(self.work_dir / "train.log", "a") as log:
            log.write(json.dumps(record) + "\n")
        tqdm.write(json.dumps(record))

    # -- steps

    def start_stage(self, stage: str) -> None:
        """Step 0 of ``stage``, with its optimizer."""
        self.stage, self.step = stage, 0
        self.optimizer = self._optimizer(stage)

    def _set_lr(self, total: int) -> None:
        factor = _schedule(self.step, total, self.settings.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def _optimize(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        self.optimizer.step()

    def prompt_step(self, questions: list[easy_vqa.Question] | None = None) -> dict[str, float]:
        """One step of the answer loss on the step's questions (or ``questions``), through the pairs' prompts."""
        s = self.settings
        if questions is None:
            rows = _batch_indices(s.seed, "prompts", self.step, s.prompt_batch, len(self.prompt_questions))
            questions = [self.prompt_questions[r] for r in rows]
        loss = answer_loss(self.lm, questions, self.prompts([self._pair(q) for q in questions]))
        self._optimize(loss)
        return {"loss": loss.item()}

    def vision_step(self) -> dict[str, float]:
        """One step of the prompt regression and the heads' loss on a batch of augmented training images."""
        s = self.settings
        rows = _batch_indices(s.seed, "vision", self.step, s.vision_batch, len(self.train_images))
        image_ids = [self.train_images[r] for r in rows]
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + self.step)
        pixels = augment(self.pixels[[self.rows_of[i] for i in image_ids]], generator)
        vision_hidden = vision_forward(self.model, pixels)
        pairs = [pair_index(self.labels[i]) for i in image_ids]
        known = [row for row, pair in enumerate(pairs) if pair is not None]
        image_embeddings = self.model.model.connector(vision_hidden[known])
        with torch.no_grad():
            targets = self.prompts([pairs[r] for r in known])
        regression = relative_squared_error(image_embeddings, targets)
        heads = self.heads.loss(vision_hidden, *label_tensors(image_ids, self.labels))
        self._optimize(regression + s.head_weight * heads)
        return {"loss": regression.item(), "heads": heads.item()}

    def image_embeddings(self, questions: list[easy_vqa.Question]) -> torch.Tensor:
        """The trained tower and connector's image tokens for each question's (unaugmented) image."""
        return self.model.model.connector(
            vision_forward(self.model, self.pixels[[self.rows_of[q.image_id] for q in questions]])
        )

    @torch.no_grad()
    def head_accuracy(self) -> dict[str, float]:
        held = sorted(easy_vqa.validation_image_ids())
        hidden = vision_forward(self.model, self.pixels[[self.rows_of[i] for i in held]])
        shape_predicted, color_predicted = self.heads.predict(hidden)
        shapes, colors = label_tensors(held, self.labels)
        known_shape, known_color = shapes >= 0, colors >= 0
        return {
            "shape_head": round((shape_predicted == shapes)[known_shape].float().mean().item(), 4),
            "color_head": round((color_predicted == colors)[known_color].float().mean().item(), 4),
        }

    def evaluate(self, stage: str) -> dict[str, float]:
        """First-token accuracy on the validation questions: overall, per type and balanced over the yes/no groups.

        After the prompts stage, through the prompts of the images' true pairs (``val_prompt_*``: what the frozen
        language model can do with a perfect vision tower); after the vision stage, through the tower (``val_*``).
        """
        self.model.eval()
        if stage == "prompts":
            questions = [q for q in self.eval_questions if self._pair(q) is not None]
            answers = first_token_answers(self.lm, questions, lambda qs: self.prompts([self._pair(q) for q in qs]))
            prefix = "val_prompt_"
        else:
            questions = self.eval_questions
            answers = first_token_answers(self.lm, questions, self.image_embeddings)
            prefix = "val_"
        self.model.train()
        accuracy = easy_vqa.accuracy_by_type(questions, answers)
        accuracy["yes/no_balanced"] = easy_vqa.balanced_yes_no_accuracy(questions, answers)
        return {f"{prefix}{kind}": round(value, 4) for kind, value in accuracy.items() if value is not None}

    def run(self) -> dict:
        """Run (or finish) every stage; returns the final validation measures."""
        s = self.settings
        steps = {"prompts": self.prompt_step, "vision": self.vision_step}
        titles = {"prompts": "prompts (language model frozen)", "vision": "vision tower -> prompts"}
        for stage in STAGES[STAGES.index(self.stage) :]:
            if stage != self.stage:
                self.start_stage(stage)
                self._save()
            total = self._stage_steps(stage)
            bar = tqdm(total=total, initial=self.step, desc=titles[stage])
            running: dict[str, float] = {}
            while self.step < total:
                self._set_lr(total)
                measures = steps[stage]()
                running = {k: v if k not in running else 0.95 * running[k] + 0.05 * v for k, v in measures.items()}
                self.step += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
                if self.step % s.eval_every == 0 or self.step == total:
                    record = {"stage": stage, "step": self.step, **{k: round(v, 4) for k, v in running.items()}}
                    if stage == "vision":
                        record.update(self.head_accuracy())
                    if stage == "prompts" or self.step == total:
                        record.update(self.evaluate(stage))
                    self.log(record)
                if self.step % s.checkpoint_every == 0:
                    self._save()
            bar.close()
        self._save()
        final = {"stage": "done", **self.evaluate("prompts"), **self.evaluate("vision"), **self.head_accuracy()}
        self.log(final)
        return final

    def vision_weights(self) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": t for prefix, module in self.trained.items() for name, t in module.state_dict().items()}


def train(settings: TrainSettings, output: Path, work_dir: Path | None = None) -> Path:
    """Train (or resume) and write the vision weights to ``output``; returns ``output``."""
    work_dir = work_dir or cache_root() / "train" / settings.digest()
    trainer = Trainer(settings, work_dir)
    final = trainer.run()
    metadata = {
        "training": json.dumps(dataclasses.asdict(settings), sort_keys=True),
        "validation": json.dumps({k: v for k, v in final.items() if k.startswith("val_") or k.endswith("_head")}),
        "data": "easy-vqa 1.0 TRAIN split (validation images held out); TEST never used",
        "language_model": "SmolLM2-135M-Instruct (frozen)",
    }
    save_vision_weights(output, trainer.vision_weights(), metadata)
    print(f"[qig] vision weights written to {output} (work folder {work_dir})")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qig_plugin.models.train_vision", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--output", type=Path, default=VISION_WEIGHTS_FILE, help="safetensors file to write")
    parser.add_argument("--work-dir", type=Path, help="checkpoint and log folder (default $QIG_CACHE/train/<hash>)")
    defaults = TrainSettings()
    for field in dataclasses.fields(TrainSettings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
    start = time.perf_counter()
    train(settings, args.output, args.work_dir)
    print(f"[qig] trained in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
