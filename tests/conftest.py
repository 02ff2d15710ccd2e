"""Shared fixtures: tiny random-weight models of each supported family (real config classes, shrunken sizes),
and the embedded SmolLM2 tokenizer/model, loaded once per session."""

from __future__ import annotations

import os
import shutil

# Without a GPU, Triton kernels run in its CPU interpreter. The variable must be set before anything imports triton
# (transformers may, through torch), so it is set here, before the imports below.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_config(family: str, vocab_size: int = 128):
    """A shrunken config of a real family (the original sizes live in the families' hub configs)."""
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512)
    if family == "llama":  # Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if family == "mistral":  # Mistral's own sliding window, shrunk so that it bites at test lengths
        return tf.MistralConfig(**common, sliding_window=12)
    if family == "gemma2":  # alternating sliding/full layers, logit soft-capping
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=12, query_pre_attn_scalar=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=12, query_pre_attn_scalar=16)
    if family == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]


def tiny_model(family: str = "llama", vocab_size: int = 128, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight causal LM of ``family`` in float32, eval mode, on the attention path our loader uses."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size)
    attn = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The embedded model's tokenizer, saved once as a plain HF tokenizer folder (fast to reload)."""
    from transformers import AutoTokenizer

    from compressor.models import resolve_model

    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local HF model folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.config.max_position_embeddings = 4096
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real embedded SmolLM2-135M-Instruct, float32 on CPU (about 20 s)."""
    from compressor.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m", device="cpu", dtype="float32")
    return model, tokenizer
