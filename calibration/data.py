"""Calibration and evaluation data: a built-in corpus, synthetic retrieval tasks and user data.

Everything here is deterministic for a given seed and every sequence has exactly the requested number
of tokens. Retrieval samples carry the answer inside `input_ids`, so a single teacher-forced forward pass
scores them (see `compressor.evaluate`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

SPLITS = ("calibration", "heldout")
RETRIEVAL_TASKS = ("passkey", "lines", "needle")
BUILTIN_SOURCES = ("corpus",) + RETRIEVAL_TASKS
# datasets' builder for each local file type a user may pass.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}

_CALIBRATION_FRACTION = 0.8
_CONTEXT_MARK = "\u27e6CONTEXT\u27e7"  # stand-ins the chat template copies verbatim
_ANSWER_MARK = "\u27e6ANSWER\u27e7"
_PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_CITIES = (
    "Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Hanoi", "Quito", "Dublin", "Lagos", "Kyiv",
    "Seoul", "Madrid", "Ottawa", "Jakarta", "Lisbon", "Manila", "Santiago", "Vienna", "Accra", "Havana",
    "Prague", "Bogota", "Helsinki", "Mumbai", "Sydney", "Warsaw", "Dakar", "Tunis", "Montreal",
)


class DataSourceError(ValueError):
    """A calibration or evaluation data source that cannot be used."""


@dataclass
class RetrievalSample:
    """One scored sequence: `input_ids: [tokens]` = prompt + answer; answer tokens are `input_ids[answer_start:]`."""

    input_ids: torch.Tensor
    answer_start: int
    answer: str
    task: str
    depth: float
    length: int

    @property
    def answer_ids(self) -> torch.Tensor:
        """The answer tokens, `[tokens - answer_start]`."""
        return self.input_ids[self.answer_start :]

    def __repr__(self) -> str:
        return (
            f"RetrievalSample(task={self.task!r}, length={self.length}, depth={self.depth:.2f}, "
            f"answer={self.answer!r}, answer_start={self.answer_start})"
        )


# ---------------------------------------------------------------------------------------------- corpus


@lru_cache(maxsize=1)
def _corpus_and_cut() -> tuple[str, int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    cut = int(len(text) * _CALIBRATION_FRACTION)
    newline = text.find("\n", cut)  # end the calibration part at a line end, not mid-word
    return text, (newline if newline != -1 else cut)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataSourceError(f"Unknown corpus split {split!r}; choose one of {SPLITS}.")


def corpus_text(split: str) -> str:
    """The built-in English corpus (`pydoc_data.topics`): the first ~80% is "calibration", the rest "heldout"."""
    _check_split(split)
    text, cut = _corpus_and_cut()
    return text[:cut] if split == "calibration" else text[cut:]


@lru_cache(maxsize=8)
def _corpus_ids(tokenizer: PreTrainedTokenizerBase, split: str) -> torch.Tensor:
    return _encode_long(tokenizer, corpus_text(split))


def _encode_long(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    # verbose=False: the text is far longer than model_max_length on purpose, we only cut windows from it.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _random_windows(ids: torch.Tensor, length: int, samples: int, seed: int, what: str) -> torch.Tensor:
    """`samples` seeded windows of exactly `length` tokens of `ids`, as `[samples, length]`."""
    if length < 1 or samples < 0:
        raise DataSourceError(f"Need length >= 1 and samples >= 0, got length={length}, samples={samples}.")
    if ids.numel() < length:
        raise DataSourceError(
            f"{what} has only {ids.numel()} tokens, fewer than the requested length {length}; use shorter sequences."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (samples,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()]) if samples else ids.new_empty(0, length)


def corpus_token_batches(
    tokenizer: PreTrainedTokenizerBase, length: int, samples: int, seed: int, split: str = "calibration"
) -> torch.Tensor:
    """Seeded random windows of the tokenized corpus split: `[samples, length]` int64."""
    return _random_windows(_corpus_ids(tokenizer, split), length, samples, seed, f"The {split} corpus")


# -------------------------------------------------------------------------------------- retrieval tasks


@dataclass(frozen=True)
class _Prompt:
    """The text around the context of one retrieval sample; the context goes between intro and question."""

    intro: str
    question: str
    answer_prefix: str
    answer: str


# A filler makes `count` haystack tokens and the positions a needle may go (None: after any sentence end).
_Filler = Callable[[int], tuple[list[int], list[int] | None]]
# What a task makes for one sample: the prompt text, the needle's tokens and the haystack filler.
_Task = tuple[_Prompt, list[int], _Filler]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The BOS token when the tokenizer adds one to plain text, else nothing."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids[:1] == [bos] else []


def _frame(tokenizer: PreTrainedTokenizerBase, prompt: _Prompt, chat: bool) -> tuple[list[int], str]:
    """Token ids before the context, and the text after it up to (not including) the answer."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return _bos(tokenizer) + _encode(tokenizer, prompt.intro), f"\n\n{prompt.question}\n{prompt.answer_prefix}"
    messages = [
        {"role": "user", "content": f"{prompt.intro}{_CONTEXT_MARK}\n\n{prompt.question}"},
        {"role": "assistant", "content": f"{prompt.answer_prefix}{_ANSWER_MARK}"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    head, rest = rendered.split(_CONTEXT_MARK)
    # The chat template spells out its special tokens (BOS included), so no tokenizer extras here.
    return _encode(tokenizer, head), rest[: rest.index(_ANSWER_MARK)]


def _split_answer(tokenizer: PreTrainedTokenizerBase, tail: str, answer: str) -> tuple[list[int], list[int]]:
    """Tokenize `tail + answer` together and split it where the answer's characters begin."""
    try:
        encoded = tokenizer(tail + answer, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow tokenizers have no offsets: tokenize the parts apart
        return _encode(tokenizer, tail), _encode(tokenizer, answer)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    start = next(i for i, (_, end) in enumerate(offsets) if end > len(tail))
    return ids[:start], ids[start:]


def _sentence_boundary(tokenizer: PreTrainedTokenizerBase, ids: list[int], target: int, radius: int = 256) -> int:
    """The position nearest `target` between a sentence or line end and whitespace (0 and len(ids) qualify)."""
    for step in range(radius + 1):
        for position in (target - step, target + step):
            if position in (0, len(ids)):
                return position
            if 0 < position < len(ids):
                before, after = tokenizer.decode([ids[position - 1]]), tokenizer.decode([ids[position]])
                if before.endswith((".", "\n")) and after[:1].isspace():
                    return position
    return target


def _passkey(rng: random.Random, tokenizer: PreTrainedTokenizerBase, split: str) -> _Task:
    key = str(rng.randint(10000, 99999))
    prompt = _Prompt(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.",
        "What is the pass key?",
        "The pass key is ",
        key,
    )
    needle = _encode(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key.")
    unit = _encode(tokenizer, _PASSKEY_FILLER)

    def filler(count: int) -> tuple[list[int], list[int] | None]:
        return (unit * (count // len(unit) + 1))[:count], None

    return prompt, needle, filler


def _needle(rng: random.Random, tokenizer: PreTrainedTokenizerBase, split: str) -> _Task:
    city, number = rng.choice(_CITIES), str(rng.randint(1_000_000, 9_999_999))
    prompt = _Prompt(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n\n",
        f"What is the special magic number for {city} mentioned in the provided text?",
        f"The special magic number for {city} mentioned in the provided text is ",
        number,
    )
    needle = _encode(tokenizer, f" The special magic number for {city} is: {number}.")
    offset_seed = rng.randrange(2**31)

    def filler(count: int) -> tuple[list[int], list[int] | None]:
        ids = _corpus_ids(tokenizer, split)
        return _random_windows(ids, count, 1, offset_seed, f"The {split} corpus")[0].tolist(), None

    return prompt, needle, filler


@lru_cache(maxsize=1)
def _line_words() -> tuple[str, ...]:
    text, _ = _corpus_and_cut()
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", text))))


def _lines(rng: random.Random, tokenizer: PreTrainedTokenizerBase, split: str) -> _Task:
    words = _line_words()
    used: set[str] = set()

    def new_line() -> str:
        while (name := f"{rng.choice(words)}-{rng.choice(words)}") in used:
            pass
        used.add(name)
        return f"line {name}: REGISTER_CONTENT is <{rng.randint(10000, 99999)}>\n"

    line = new_line()
    name, number = line[5 : line.index(":")], line[line.index("<") + 1 : line.index(">")]
    prompt = _Prompt(
        "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
        "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
        "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
        "the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n",
        f"Now the record is over. Tell me what is the <REGISTER_CONTENT> in line {name}? I need the number.",
        f"The <REGISTER_CONTENT> in line {name} is <",
        number,
    )

    def filler(count: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        starts: list[int] = []
        while len(ids) < count:
            batch = tokenizer([new_line() for _ in range((count - len(ids)) // 12 + 1)], add_special_tokens=False)
            for line_ids in batch["input_ids"]:
                starts.append(len(ids))
                ids.extend(line_ids)
        cut = len(ids) - count  # drop the surplus from the front: the record starts mid-line, like a window
        return ids[cut:], [0] + [s - cut for s in starts if s > cut] + [count]

    return prompt, _encode(tokenizer, line), filler


_TASKS: dict[str, Callable[[random.Random, PreTrainedTokenizerBase, str], _Task]] = {
    "passkey": _passkey,
    "lines": _lines,
    "needle": _needle,
}


def _retrieval_sample(
    tokenizer: PreTrainedTokenizerBase, task: str, length: int, depth: float, rng: random.Random, chat: bool, split: str
) -> RetrievalSample:
    prompt, needle, filler = _TASKS[task](rng, tokenizer, split)
    head, tail_text = _frame(tokenizer, prompt, chat)
    tail, answer = _split_answer(tokenizer, tail_text, prompt.answer)
    count = length - len(head) - len(tail) - len(answer) - len(needle)
    if count < 0:
        raise DataSourceError(
            f"length {length} is too short for the {task!r} task: its prompt alone takes {length - count} tokens."
        )
    hay, boundaries = filler(count)
    target = round(depth * count)
    if boundaries is None:
        at = _sentence_boundary(tokenizer, hay, target)
    else:
        at = min(boundaries, key=lambda b: abs(b - target))
    ids = head + hay[:at] + needle + hay[at:] + tail + answer
    assert len(ids) == length, (len(ids), length)
    return RetrievalSample(
        input_ids=torch.tensor(ids, dtype=torch.long),
        answer_start=length - len(answer),
        answer=prompt.answer,
        task=task,
        depth=at / count if count else 0.0,
        length=length,
    )


def retrieval_samples(
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    length: int,
    samples: int,
    seed: int,
    depths: Sequence[float] | None = None,
    chat: bool = True,
    split: str = "calibration",
) -> list[RetrievalSample]:
    """`samples` synthetic retrieval sequences of exactly `length` tokens for `task` ("passkey", "lines", "needle").

    Needle depths spread evenly over 0..1 unless `depths` is given (cycled when shorter than `samples`).
    `chat` wraps the prompt in the tokenizer's chat template when it has one; `split` picks the corpus part
    that "needle" hides its needle in.
    """
    if task not in _TASKS:
        raise DataSourceError(f"Unknown retrieval task {task!r}; choose one of {RETRIEVAL_TASKS}.")
    _check_split(split)
    if depths is None:
        depths = [0.5] if samples == 1 else [i / (samples - 1) for i in range(samples)]
    if samples and not depths:
        raise DataSourceError("depths is empty; give at least one needle depth in 0..1, or None.")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise DataSourceError(f"Needle depths must lie in 0..1, got {list(depths)}.")
    return [
        _retrieval_sample(
            tokenizer, task, length, depths[i % len(depths)], random.Random(f"{task}|{length}|{seed}|{i}"), chat, split
        )
        for i in range(samples)
    ]


# ------------------------------------------------------------------------------------------- user data


def _load_user_dataset(source: str):
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataSourceError(
                f"Cannot read {source!r}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}."
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    try:
        return datasets.load_dataset(source, split="train")
    except (ConnectionError, OSError, ValueError) as error:  # offline, unknown name, or no "train" split
        raise DataSourceError(
            f"Could not load {source!r} as a local file or a Hugging Face Hub dataset (offline, or no such dataset)."
        ) from error


def user_text_batches(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    samples: int,
    seed: int,
    text_field: str = "text",
) -> torch.Tensor:
    """Seeded windows of `length` tokens from a local .json/.jsonl/.txt/.parquet/.csv file or a Hub dataset.

    The `text_field` column of every record is joined with blank lines and tokenized; returns `[samples, length]`.
    """
    dataset = _load_user_dataset(source)
    if text_field not in dataset.column_names:
        raise DataSourceError(
            f"{source!r} has no column {text_field!r}; its columns are {dataset.column_names}. Pass text_field=..."
        )
    text = "\n\n".join(t for t in dataset[text_field] if t)
    return _random_windows(_encode_long(tokenizer, text), length, samples, seed, f"{source!r}")


# ----------------------------------------------------------------------------------------- entry point


def _text_samples(batch: torch.Tensor, task: str) -> list[RetrievalSample]:
    length = batch.shape[1]
    return [RetrievalSample(row, 0, "", task, 0.0, length) for row in batch]


def _parse_source(source: str) -> list[str]:
    parts = [part.strip() for part in source.split(",")]
    if all(part in BUILTIN_SOURCES for part in parts):
        return parts
    path = Path(source).expanduser()
    if path.exists():
        return [source]
    if path.suffix.lower() in FILE_BUILDERS:
        problem = f"Calibration source {source!r} looks like a file but does not exist"
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return [source]  # a Hub dataset "owner/name"
    else:
        problem = f"Unknown calibration source {source!r}"
    raise DataSourceError(
        f"{problem}: use one of {BUILTIN_SOURCES}, a comma-separated mix of them (e.g. 'corpus,passkey'), "
        f"a local {'/'.join(sorted(FILE_BUILDERS))} file, or a Hub dataset 'owner/name'."
    )


def calibration_samples(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    lengths: list[int],
    samples: int,
    seed: int,
    chat: bool = True,
) -> list[RetrievalSample]:
    """Calibration sequences from `source`: "corpus", "passkey", "lines", "needle", a comma-separated mix, or user data.

    `samples` sequences per length, shared round-robin among the parts of a mix. Plain text has answer_start=0
    (the whole sequence is scored); retrieval tasks score their answer.
    """
    parts = _parse_source(source)
    result: list[RetrievalSample] = []
    for length in lengths:
        for index, part in enumerate(parts):
            count = samples // len(parts) + (index < samples % len(parts))
            if part == "corpus":
                result += _text_samples(corpus_token_batches(tokenizer, length, count, seed, "calibration"), part)
            elif part in RETRIEVAL_TASKS:
                result += retrieval_samples(tokenizer, part, length, count, seed, chat=chat, split="calibration")
            else:
                result += _text_samples(user_text_batches(part, tokenizer, length, count, seed), "text")
    return result
