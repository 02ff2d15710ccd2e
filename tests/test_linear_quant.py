"""Linear-layer quantization: formats, QuantLinear, balancing folds, the vidit-q method, mixed precision and
compressed-tensors checkpoints, on a tiny random Llama (Llama-3-8B has hidden 4096, 32 layers; this one 256, 2)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from compressor.errors import CompressorError, PlanError
from compressor.kernels import quant_reference as ref
from compressor.linear_quant import QuantLinear, apply_linear_plan, load_quantized, save_quantized, select_linears
from compressor.linear_quant.apply import quantize_modules
from compressor.linear_quant.balance import fold_layer_balancing
from compressor.plan import Plan

NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 256) -> nn.Module:
    """``hidden=192`` mimics SmolLM2 (576 = 9 x 64): int4 groups of 128 do not fit the attention / gate / up inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=512, num_hidden_layers=2, num_attention_heads=hidden // 64,
                      num_key_value_heads=1 if hidden % 128 else 2, head_dim=64, vocab_size=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:4] = 20.0  # outlier channels
    return model


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def uniform_plan(model: nn.Module, precision: str) -> Plan:
    plan = Plan.dense(model)
    for layer in plan.layers:
        layer.linear = {n: {"precision": precision} for n in NAMES}
    return plan


IDS = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))


def test_pack_int4_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert torch.equal(ref.pack_int4(q), ct.pack_to_int32(q, 4))
    assert torch.equal(ref.unpack_int4(ref.pack_int4(q)), q)


@pytest.mark.parametrize("precision,dtype,limit", [("w8a8-int8", torch.int8, 0.02), ("w8a8-fp8", torch.float8_e4m3fn, 0.06),
                                                    ("w4a8", torch.int32, 0.15)])
def test_quant_linear_stores_low_bit_and_tracks_float(precision, dtype, limit):
    lin = nn.Linear(256, 96, bias=True)
    q = QuantLinear.from_linear(lin, precision)
    assert q.quantized_weight().dtype == dtype
    x = torch.randn(7, 256)
    err = (q(x) - lin(x)).norm() / lin(x).norm()
    assert err < limit


def test_default_excludes_keep_lm_head_and_adaln_modulation():
    class DiTBlock(nn.Module):  # adaLN-Zero DiT block: modulation linear + attention and MLP linears
        def __init__(self):
            super().__init__()
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(128, 6 * 128))
            self.qkv = nn.Linear(128, 384)
            self.proj = nn.Linear(128, 128)
            self.mlp = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128))

    block = DiTBlock()
    names = select_linears(block)
    assert names == ["qkv", "proj", "mlp.0", "mlp.2"]
    quantize_modules(block, {n: {"precision": "w8a8-int8"} for n in names})
    assert isinstance(block.adaLN_modulation[1], nn.Linear) and isinstance(block.mlp[0], QuantLinear)
    assert "lm_head" not in select_linears(tiny_llama())


def test_folds_are_exact_in_float():
    model = tiny_llama()
    layer = model.model.layers[0]
    dense = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(0)
    s_norm = (torch.rand(256, generator=g) + 0.5).tolist()
    s_o = (torch.rand(2, 1, 64, generator=g) + 0.5).expand(2, 2, 64).reshape(-1).tolist()  # tied across GQA heads
    s_down = (torch.rand(512, generator=g) + 0.5).tolist()
    settings = {n: {"precision": "bf16"} for n in NAMES}
    for n in NAMES[:3]:
        settings[n]["smooth"] = {"alpha": 0.5, "scales": s_norm, "fold": "input_layernorm"}
    settings["self_attn.o_proj"]["smooth"] = {"alpha": 0.5, "scales": s_o, "fold": "self_attn.v_proj", "head_dim": 64}
    settings["self_attn.o_proj"]["rotate"] = {"fold": "self_attn.v_proj", "block": 64}
    settings["mlp.down_proj"]["smooth"] = {"alpha": 0.5, "scales": s_down, "fold": "mlp.up_proj"}
    fold_layer_balancing(layer, settings)
    h = torch.randn(1, 10, 256)
    pos = model.model.rotary_emb(h, torch.arange(10)[None])
    out = layer(h, position_embeddings=pos)[0] if isinstance(layer(h, position_embeddings=pos), tuple) else layer(h, position_embeddings=pos)
    want = dense(h, position_embeddings=pos)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision,min_cos", [("w8a8-int8", 0.999), ("w8a8-fp8", 0.995), ("w4a8", 0.97)])
def test_apply_linear_plan_close_to_dense(precision, min_cos):
    model = tiny_llama()
    want = model(IDS).logits
    apply_linear_plan(model, uniform_plan(model, precision))
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert cosine(model(IDS).logits, want) > min_cos


def run_method(model, linear: dict):
    from compressor.methods import METHODS, CompressionContext
    from compressor.pipeline import build_plan
    from compressor.recipe import parse_recipe
    from compressor.calibration.data import RetrievalSample

    recipe = parse_recipe({"name": "t", "linear": {"method": "vidit-q", **linear}})
    samples = [RetrievalSample(IDS[i], 0, "", "corpus", 0.0, IDS.shape[1]) for i in range(2)]
    ctx = CompressionContext(model=model, tokenizer=None, recipe=recipe, device=torch.device("cpu"), cache={"samples": samples})
    result = METHODS[("linear", "vidit-q")].run(ctx, recipe.linear)
    return build_plan(model, recipe, {"linear": result}, {})


def test_smooth_and_rotate_help_w4a8_on_outliers():
    model = tiny_llama()
    want = model(IDS).logits
    plain = apply_linear_plan(copy.deepcopy(model), run_method(model, {"precision": "w4a8"}))
    plan = run_method(model, {"precision": "w4a8", "smooth": True, "rotate": True, "smooth_grid": [0.5, 0.7]})
    balanced = apply_linear_plan(copy.deepcopy(model), plan)
    assert plan.layers[0].linear["self_attn.q_proj"]["smooth"]["fold"] == "input_layernorm"
    assert plan.layers[0].linear["mlp.down_proj"]["rotate"] == {"online": 128}
    assert cosine(balanced(IDS).logits, want) > cosine(plain(IDS).logits, want)
    assert Plan.from_json(plan.to_json()).layers[0].linear == plan.layers[0].linear  # round trip


def test_mixed_precision_respects_bit_budget(monkeypatch):
    from compressor.calibration.data import RetrievalSample
    from compressor.linear_quant import method

    answers = [RetrievalSample(IDS[0], 40, "", "passkey", 0.5, 48)]
    monkeypatch.setattr(method, "sensitivity_data", lambda ctx, config: (IDS[:1, :32], answers))
    model = tiny_llama()
    plan = run_method(model, {"precision": "mixed", "budget": "bits", "budget_value": 6.0})
    chosen = plan.search["linear"]["chosen"]
    assert chosen["avg_bits"] <= 6.0 + 1e-6
    assert plan.search["linear"]["pareto"] and len(plan.search["linear"]["sensitivity"]["layers"]) == 14


def test_int4_clip_search_lowers_weight_error_on_heavy_tails():
    w = torch.distributions.StudentT(3.0).sample((64, 256))  # heavy tails: the group max stretches the int4 step
    plain = ref.dequantize_weight(*ref.quantize_weight_int4_groups(w, 64), 64)
    clipped = ref.dequantize_weight(*ref.quantize_weight_int4_groups(w, 64, [1.0, 0.9, 0.8, 0.7, 0.6]), 64)
    assert (clipped - w).pow(2).sum() < 0.9 * (plain - w).pow(2).sum()


def test_clip_search_is_planned_from_calibration_and_helps_w4a8():
    model = tiny_llama()
    want = model(IDS).logits
    base = {"precision": "w4a8", "smooth": True, "rotate": True, "smooth_grid": [0.5, 0.7]}
    plain = apply_linear_plan(copy.deepcopy(model), run_method(model, base))
    plan = run_method(model, {**base, "clip_search": True})
    clip = plan.layers[1].linear["mlp.down_proj"]["clip"]
    assert len(clip["importance"]) == 512 and clip["grid"][0] == 1.0
    clipped = apply_linear_plan(copy.deepcopy(model), plan)
    assert cosine(clipped(IDS).logits, want) > cosine(plain(IDS).logits, want)


def test_collected_inputs_are_the_layer_inputs_sampled_in_order():
    from compressor.linear_quant.calibrate import collect_linear_inputs

    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in IDS:
            model(input_ids=row[None])
    handle.remove()

    stats = collect_linear_inputs(model, [name], [IDS[0], IDS[1]], rows=10, seed=3)[name]
    gen = torch.Generator().manual_seed(3)  # 5 rows from each batch, drawn as the function draws them
    want = torch.cat([x[torch.randperm(x.shape[0], generator=gen)[:5]] for x in seen])
    torch.testing.assert_close(stats.rows, want)
    torch.testing.assert_close(stats.amax, torch.cat(seen).abs().amax(dim=0))
    many = collect_linear_inputs(model, [name], [IDS[0]] * 3, rows=2)[name]  # more batches than rows: one row each
    assert many.rows.shape == (2, seen[0].shape[-1])


def test_smoothing_search_models_the_rotated_layer_it_deploys():
    from compressor.linear_quant.balance import quantized_output_error
    from compressor.linear_quant.calibrate import collect_linear_inputs
    from compressor.linear_quant.formats import precision

    model = tiny_llama()
    plan = run_method(model, {"precision": "w4a8", "smooth": True, "rotate": True, "smooth_grid": [0.5]})
    down = plan.layers[1].linear["mlp.down_proj"]
    name = "model.layers.1.mlp.down_proj"
    rows = collect_linear_inputs(model, [name], [IDS[0], IDS[1]], 64)[name].rows
    scales, w = torch.tensor(down["smooth"]["scales"]), model.get_submodule(name).weight
    searched = quantized_output_error(rows, [w], precision("w4a8"), scales, 128)
    deployed = apply_linear_plan(copy.deepcopy(model), plan).get_submodule(name)
    want = rows @ w.t()
    applied = float((deployed(rows / scales) - want).pow(2).sum() / want.pow(2).sum())  # up_proj divides by scales
    assert deployed.hadamard_block == 128
    assert applied == pytest.approx(searched, rel=1e-4)  # rotated once, on the side the search assumed


def test_mixed_precision_budget_counts_the_bits_reported(monkeypatch):
    from compressor.calibration.data import RetrievalSample
    from compressor.linear_quant import method
    from compressor.linear_quant.apply import average_weight_bits

    answers = [RetrievalSample(IDS[0], 40, "", "passkey", 0.5, 48)]
    monkeypatch.setattr(method, "sensitivity_data", lambda ctx, config: (IDS[:1, :32], answers))
    model = tiny_llama(hidden=192)  # q/k/v/o/gate/up fall back to int4 groups of 64 (4.25 bits), down_proj keeps 128
    plan = run_method(model, {"precision": "mixed", "budget": "bits", "budget_value": 5.0})
    reported = average_weight_bits(model, plan)
    assert plan.search["linear"]["chosen"]["avg_bits"] == pytest.approx(reported, abs=1e-4)
    assert reported <= 5.0 + 1e-6


def test_weight_bits_include_scales():
    from compressor.linear_quant.formats import layer_weight_bits

    assert layer_weight_bits("w4a8", 576) == 4.25  # falls back to groups of 64: one 16-bit scale per 64 weights
    assert layer_weight_bits("w4a8", 1536) == 4.125
    assert layer_weight_bits("w8a8-int8", 512) == 8.03125  # one 16-bit scale per output channel of 512 weights
    assert layer_weight_bits("bf16", 576) == 16.0


@pytest.mark.parametrize("mix", [["w8a8-int8"] * 7, ["w8a8-fp8"] * 7, ["w4a8"] * 7,
                                 ["w8a8-int8", "w4a8", "bf16", "w8a8-fp8", "w4a8", "w8a8-int8", "w8a8-int8"]])
def test_checkpoint_reloads_in_transformers_and_ours(tmp_path, mix):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    plan = Plan.dense(model)
    for layer in plan.layers:
        layer.linear = dict(zip(NAMES, [{"precision": p} for p in mix]))
    save_quantized(model, plan, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    with torch.no_grad():
        ours = model(IDS).logits
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(IDS).logits
        loaded = load_quantized(tmp_path, plan, "cpu", torch.float32)(IDS).logits
    assert cosine(theirs, ours) >= 0.999 and cosine(loaded, ours) >= 0.999 and cosine(theirs, loaded) >= 0.999


def test_online_rotation_checkpoint_refused_by_plain_transformers(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    plan = uniform_plan(model, "w8a8-int8")
    for layer in plan.layers:
        layer.linear["mlp.down_proj"]["rotate"] = {"online": 128}
    save_quantized(model, plan, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "compressor-online-transform"
    with pytest.raises(Exception, match="compressor-online-transform"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert cosine(load_quantized(tmp_path, plan, "cpu", torch.float32)(IDS).logits, model(IDS).logits) > 0.9999


def test_checkpoint_and_plan_disagreeing_is_refused(tmp_path):
    model = tiny_llama()
    save_quantized(model, uniform_plan(model, "w8a8-int8"), tmp_path)
    with pytest.raises(PlanError, match=r"quantization_config w8a8-int8 vs plan w4a8"):
        load_quantized(tmp_path, uniform_plan(tiny_llama(), "w4a8"), "cpu", torch.float32)


def test_applying_twice_checks_instead_of_requantizing():
    model = tiny_llama()
    plan = uniform_plan(model, "w8a8-int8")
    apply_linear_plan(model, plan)
    apply_linear_plan(model, plan)  # no error, no double quantization
    with pytest.raises(CompressorError, match="plan w4a8 vs model w8a8-int8"):
        apply_linear_plan(model, uniform_plan(model, "w4a8"))


def test_fp8_refused_on_old_gpu(monkeypatch):
    from compressor.linear_quant.method import check_device_supports

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(CompressorError, match="compute capability >= 8.9"):
        check_device_supports(["w8a8-fp8"], torch.device("cuda"))


def test_rmsnorm_left_to_its_quantized_readers_gives_the_same_model(monkeypatch):
    """The deferred norm hands q/k/v and gate/up its raw input above 16 tokens and they normalise it themselves: same
    logits, same state dict; few tokens, a bf16 reader or an inference-mode tensor keep the norm where it was."""
    from compressor.linear_quant import norm_fusion

    monkeypatch.setattr(norm_fusion, "defers", lambda x: True)  # what CUDA does, through the CPU reference here
    model = tiny_llama()
    plan = uniform_plan(model, "w8a8-int8")
    plan.layers[1].linear.pop("mlp.up_proj")  # layer 1's gate/up: one bf16 reader keeps its norm in place
    fused = apply_linear_plan(copy.deepcopy(model), plan)
    plain = copy.deepcopy(fused)
    keys = list(fused.state_dict())

    assert norm_fusion.fuse_input_norms(fused) == 3
    assert norm_fusion.fuse_input_norms(fused) == 0  # idempotent
    assert isinstance(fused.model.layers[1].post_attention_layernorm, type(plain.model.layers[1].post_attention_layernorm))
    assert list(fused.state_dict()) == keys

    calls = []
    for layer in fused.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name)
            if isinstance(norm, norm_fusion.DeferredRMSNorm):
                monkeypatch.setattr(norm.original, "forward", lambda x, f=norm.original.forward: calls.append(1) or f(x))
    with torch.no_grad():
        torch.testing.assert_close(fused(IDS).logits, plain(IDS).logits, rtol=1e-4, atol=1e-4)  # 96 tokens: deferred
        assert not calls
        short = IDS[:1, :8]
        torch.testing.assert_close(fused(short).logits, plain(short).logits, rtol=1e-4, atol=1e-4)
        assert len(calls) == 3  # 8 tokens: each deferred norm ran itself once
    with torch.inference_mode():
        torch.testing.assert_close(fused(IDS).logits, plain(IDS).logits, rtol=1e-4, atol=1e-4)
        assert len(calls) == 6

    norm = fused.model.layers[0].input_layernorm
    x = torch.randn(40, norm.weight.shape[0])
    assert norm(x) is x and norm.norm_for(x) is not None
    assert norm.norm_for(x.clone()) is None  # another tensor
    x.mul_(2.0)
    assert norm.norm_for(x) is None  # written in place since


def test_only_llama_style_rmsnorms_are_deferred():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from compressor.linear_quant.norm_fusion import rms_norm_eps

    model = tiny_llama()
    assert rms_norm_eps(model.model.layers[0].input_layernorm) == model.config.rms_norm_eps
    assert rms_norm_eps(GemmaRMSNorm(8)) is None  # scales by 1 + weight
    assert rms_norm_eps(nn.LayerNorm(8)) is None
    model.config.model_type = "phi3"
    from compressor.linear_quant.norm_fusion import fuse_input_norms

    assert fuse_input_norms(apply_linear_plan(model, uniform_plan(model, "w8a8-int8"))) == 0
