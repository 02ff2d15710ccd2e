"""Evaluate any Hugging Face causal LM: perplexity on held-out text and long-context retrieval accuracy.

Works on any model whose forward returns `.logits`; nothing here knows about compression plans.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from compressor.calibration.data import (
    RETRIEVAL_TASKS,
    RetrievalSample,
    corpus_token_batches,
    retrieval_samples,
)

EVAL_TASKS = ("perplexity",) + RETRIEVAL_TASKS
# Tokens per forward pass when batching equal-length sequences: logits alone are tokens x vocab floats.
_TOKENS_PER_BATCH = 4096


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """eval() and no_grad() for the duration, restoring the model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _last_logits(model: torch.nn.Module, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Float32 logits of the last `keep` positions, `[batch, keep, vocab]`; asks HF models to skip the rest."""
    if keep < input_ids.shape[1] and "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids, logits_to_keep=keep).logits
    else:
        logits = model(input_ids).logits
    return logits[:, -keep:].float()


def _batches(samples: list[RetrievalSample], desc: str) -> Iterator[list[RetrievalSample]]:
    """Equal-length samples grouped into batches of about `_TOKENS_PER_BATCH` tokens, with a progress bar."""
    by_length: dict[int, list[RetrievalSample]] = {}
    for sample in samples:
        by_length.setdefault(sample.input_ids.numel(), []).append(sample)
    batches = []
    for length, group in by_length.items():
        size = max(1, _TOKENS_PER_BATCH // length)
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    with tqdm(total=len(samples), desc=desc, leave=False) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


def _answer_predictions(
    model: torch.nn.Module, samples: list[RetrievalSample], desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: logits `[answer_tokens, vocab]` at the positions that predict the answer, and the answer ids.

    A sample with answer_start=0 scores every token but the first, which nothing predicts.
    """
    device = _device(model)
    for batch in _batches(samples, desc):
        input_ids = torch.stack([s.input_ids for s in batch]).to(device)
        length = input_ids.shape[1]
        starts = [max(s.answer_start, 1) for s in batch]
        keep = length - min(starts) + 1  # position t predicts token t + 1
        logits = _last_logits(model, input_ids, keep)
        for row, start in enumerate(starts):
            offset = start - 1 - (length - keep)
            yield logits[row, offset : keep - 1], input_ids[row, start:]


def _mean_answer_nll(model: torch.nn.Module, samples: list[RetrievalSample], desc: str) -> float:
    total, count = 0.0, 0
    with _inference(model):
        for logits, answer in _answer_predictions(model, samples, desc):
            total += F.cross_entropy(logits, answer, reduction="sum").item()
            count += answer.numel()
    if count == 0:
        raise ValueError("No answer tokens to score; pass at least one sample with an answer.")
    return total / count


def answer_loss(model: torch.nn.Module, samples: list[RetrievalSample]) -> float:
    """Mean cross-entropy over all answer tokens of `samples` (all tokens but the first where answer_start=0)."""
    return _mean_answer_nll(model, samples, "answer loss")


def perplexity(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, length: int, samples: int, seed: int = 0
) -> float:
    """exp(mean token NLL) over `samples` windows of `length` tokens of the held-out corpus split."""
    if length < 2 or samples < 1:
        raise ValueError(f"perplexity needs length >= 2 and samples >= 1, got length={length}, samples={samples}.")
    windows = corpus_token_batches(tokenizer, length, samples, seed, split="heldout")
    texts = [RetrievalSample(row, 0, "", "corpus", 0.0, length) for row in windows]
    return math.exp(_mean_answer_nll(model, texts, f"perplexity@{length}"))


def retrieval_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    length: int,
    samples: int,
    seed: int = 0,
    chat: bool = True,
) -> float:
    """Fraction of held-out `task` samples whose whole answer greedy decoding would reproduce (teacher-forced).

    With `chat`, prompts use the tokenizer's chat template when it has one.
    """
    items = retrieval_samples(tokenizer, task, length, samples, seed, chat=chat, split="heldout")
    correct = 0
    with _inference(model):
        for logits, answer in _answer_predictions(model, items, f"{task}@{length}"):
            correct += bool((logits.argmax(dim=-1) == answer).all())
    return correct / max(len(items), 1)


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    lengths: list[int],
    samples: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Each of `tasks` ("perplexity", "passkey", "lines", "needle") at each length: `{task: {str(length): value}}`."""
    unknown = [task for task in tasks if task not in EVAL_TASKS]
    if unknown:
        raise ValueError(f"Unknown evaluation task(s) {unknown}; choose from {EVAL_TASKS}.")
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        for length in lengths:
            if task == "perplexity":
                value = perplexity(model, tokenizer, length, samples, seed)
            else:
                value = retrieval_accuracy(model, tokenizer, task, length, samples, seed)
            results.setdefault(task, {})[str(length)] = value
    return results
