"""The real embedded model (SmolLM2-135M-Instruct) end to end at short length."""

import pytest
import torch

import compressor
from compressor import runtime
from compressor.plan import Plan

pytestmark = pytest.mark.slow


def _ask(model, tokenizer, question: str, new_tokens: int = 12) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_compress_window_then_load_answers(tmp_path):
    out = tmp_path / "smollm2-window"
    plan, _ = compressor.compress("smollm2-135m", "window", str(out), device="cpu", report=False, log=lambda m: None)
    assert 0.45 < plan.density(4096) <= 0.5
    model, tokenizer = compressor.load(str(out), device="cpu")
    assert model.config._attn_implementation == "compressor"
    # a short prompt sits inside every window (sink 64 covers it): the answer is the dense model's
    assert "Paris" in _ask(model, tokenizer, "What is the capital of France?")


def test_dense_plan_gives_identical_logits_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
        runtime.apply(model, Plan.dense(model))
        try:
            got = model(ids).logits
        finally:
            runtime.remove(model)
    assert torch.equal(got, want)


def test_plan_names_the_embedded_model_as_the_user_did():
    plan, _ = compressor.compress("smollm2-135m", "dense", None, device="cpu", report=False, log=lambda m: None)
    assert plan.model.name_or_path.startswith("smollm2-135m (") and plan.model.name_or_path.endswith(".gguf)")
    assert isinstance(plan.calibration["seconds"]["load"], float) and plan.calibration["seconds"]["load"] == round(
        plan.calibration["seconds"]["load"], 2)
