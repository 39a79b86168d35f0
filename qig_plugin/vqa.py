"""Held-out visual question answering: the accuracy of a model (full precision or quantized) on easy-VQA.

Each question is asked plainly: one user turn in the model's chat template with the image then the question as
easy-VQA words it, greedy decoding, and the first word of the answer compared with the true answer
(``easy_vqa.first_word``). The TEST split is never used in training or calibration.

    python -m qig_plugin.vqa [MODEL_DIR] [--split test] [--limit N] [--engine hf|vllm] [--json OUT]

``--engine hf`` runs transformers here (quantize environment); ``--engine vllm`` serves the folder with vLLM in the
serve environment (any checkpoint vLLM loads, e.g. a compressed-tensors one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from qig_plugin.data import easy_vqa

MAX_NEW_TOKENS = 4  # the longest answer ("rectangle", "triangle") is 2 tokens, then <|im_end|>


def chat_text(processor, question: str) -> str:
    """The user turn (image, then the question) and the assistant's opening, in the processor's chat template."""
    return processor.apply_chat_template(easy_vqa.conversation(question), add_generation_prompt=True)


def hf_answers(
    model, processor, questions: list[easy_vqa.Question], batch_size: int = 16, progress: bool = False
) -> list[str]:
    """Greedy answers (decoded text, special tokens dropped) of a transformers model, batched with left padding."""
    import torch
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        starts = range(0, len(questions), batch_size)
        for start in tqdm(starts, desc="answering", disable=not progress):
            chunk = questions[start : start + batch_size]
            inputs = processor(
                text=[chat_text(processor, q.question) for q in chunk],
                images=[[q.image()] for q in chunk],
                padding=True,
                return_tensors="pt",
            )
            with torch.no_grad():
                generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return answers


def vllm_answers(
    checkpoints: list[str | Path], questions: list[easy_vqa.Question], timeout: float | None = None
) -> dict[str, dict]:
    """Greedy answers of each checkpoint served by vLLM in the serve environment, one engine after another.

    Returns ``{checkpoint: {"answers": [...], "load_s", "generate_s", "linear_kernels"}}``, or ``{"error": ...}``
    for a checkpoint vLLM could not load or run.
    """
    from qig_plugin.serve_env import run_in_serve_env

    with tempfile.TemporaryDirectory(prefix="qig-vqa-") as scratch:
        prompts_path = Path(scratch) / "prompts.json"
        prompts_path.write_text(json.dumps([{"image": str(q.image_path), "prompt": q.question} for q in questions]))
        results_path = Path(scratch) / "results.json"
        completed = run_in_serve_env(
            ["generate", *map(str, checkpoints), "--prompts", str(prompts_path),
             "--max-tokens", str(MAX_NEW_TOKENS), "--json", str(results_path)],
            timeout=timeout,
        )
        if not results_path.exists():
            raise RuntimeError(f"vLLM generation failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
        results = json.loads(results_path.read_text())
    by_checkpoint: dict[str, dict] = {}
    for result in results:
        entry = by_checkpoint.setdefault(result["checkpoint"], {"answers": []})
        if "error" in result:
            entry["error"] = result["error"]
            continue
        entry["answers"].append(result["text"])
        entry.update(load_s=result["load_s"], generate_s=result["generate_s"], linear_kernels=result["linear_kernels"])
    return {str(checkpoint): by_checkpoint.get(str(checkpoint), {"error": "no result"}) for checkpoint in checkpoints}


def format_accuracy(accuracy: dict[str, float], count: int) -> str:
    """``"91.2% of 500 (shape 88.0%, color 97.1%, yes/no 90.3%)"``."""
    per_type = ", ".join(f"{kind} {accuracy[kind]:.1%}" for kind in easy_vqa.QUESTION_TYPES if kind in accuracy)
    return f"{accuracy['all']:.1%} of {count} ({per_type})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qig_plugin.vqa", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="model folder (default: the default model)")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--limit", type=int, help="a seeded sample of this many questions (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="sample seed")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write the questions, answers and accuracies here")
    args = parser.parse_args(argv)

    if args.model is None:
        from qig_plugin.models import build_default_model

        args.model = build_default_model()
    if args.limit is None:
        questions = list(easy_vqa.questions(args.split))
    else:
        questions = easy_vqa.sample_questions(args.split, args.limit, args.seed)
    start = time.perf_counter()
    if args.engine == "hf":
        from qig_plugin.models import load_model, load_processor

        answers = hf_answers(
            load_model(args.model), load_processor(args.model), questions, args.batch_size, progress=True
        )
    else:
        result = vllm_answers([args.model], questions)[str(args.model)]
        if "error" in result:
            print(f"vLLM failed: {result['error']}")
            return 1
        answers = result["answers"]
    elapsed = time.perf_counter() - start
    accuracy = easy_vqa.accuracy_by_type(questions, answers)
    print(f"{args.model} ({args.engine}), easy-VQA {args.split}: {format_accuracy(accuracy, len(questions))} "
          f"in {elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "model": str(args.model), "engine": args.engine, "split": args.split, "accuracy": accuracy,
            "seconds": round(elapsed, 1),
            "questions": [
                {"image_id": q.image_id, "question": q.question, "answer": q.answer, "model_answer": a}
                for q, a in zip(questions, answers)
            ],
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
