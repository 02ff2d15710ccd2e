"""XAttention: the Triton scoring kernel against its reference (CPU interpreter without a GPU), the reference against
explicit antidiagonal sums, block selection, the runtime handler, threshold calibration and the method end to end."""

import importlib.util
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first built, i.e. after this line

from compressor import runtime  # noqa: E402
from compressor.calibration.block_mass import layer_ranking, true_block_mass  # noqa: E402
from compressor.kernels.reference import naive_attention  # noqa: E402
from compressor.kernels.xattention_score import xattention_scores, xattention_scores_reference  # noqa: E402
from compressor.kernels.xattention_select import select_blocks, select_blocks_reference, visible_blocks  # noqa: E402
from compressor.methods.xattention import XAttentionConfig, XAttentionPattern, budget_thresholds, calibrate  # noqa: E402
from compressor.plan import Plan, WindowPattern  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# the interpreter evaluates log2(0) = -inf (blocks with nothing visible) through numpy, which warns
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _qk(batch, q_heads, kv_heads, q_tokens, kv_tokens, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_tokens, dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_tokens, dim, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


def test_reference_scores_are_softmaxed_antidiagonal_sums():
    q, k = _qk(1, 1, 1, 64, 64, 8)
    stride, bs = 4, 64
    full = (q[0, 0].float() @ k[0, 0].float().T).cpu()  # [64, 64]
    tiles = 64 // stride
    anti = torch.zeros(tiles, tiles)
    for r in range(tiles):
        for c in range(tiles):
            anti[r, c] = sum(full[r * stride + stride - 1 - t, c * stride + t] for t in range(stride))
    anti = anti * 8**-0.5 / stride
    anti = anti.masked_fill(torch.ones(tiles, tiles, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(anti, dim=-1).sum()  # one 64-token block: every tile in it
    got = xattention_scores_reference(q, k, stride=stride, block_size=bs)
    torch.testing.assert_close(got.cpu().sum(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.cpu()[0, 0, 0, 0], torch.tensor(float(tiles)), atol=1e-4, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize(
    "shape, stride, block_size, dtype, causal",
    [
        ((2, 4, 2, 150, 150, 32), 4, 64, torch.float32, True),  # GQA, padded rows, odd length
        ((1, 2, 1, 100, 230, 16), 16, 64, torch.float16, True),  # queries after a KV prefix
        ((1, 2, 2, 130, 130, 60), 8, 128, torch.float32, True),  # head dim not a power of two
        ((2, 4, 1, 200, 260, 24), 8, 64, torch.float32, False),  # not causal: unmasked chunks with a padded dim
        ((1, 8, 1, 300, 300, 16), 4, 128, torch.float32, True),  # group of 8: heads stacked in the rows of a tile
    ],
)
def test_triton_scores_match_reference(shape, stride, block_size, dtype, causal):
    batch, kv_tokens = shape[0], shape[4]
    q, k = _qk(*shape, dtype=dtype)
    start = torch.tensor([0, 9][:batch], device=DEVICE)
    end = torch.tensor([kv_tokens - 5, kv_tokens][:batch], device=DEVICE)
    kw = dict(stride=stride, block_size=block_size, kv_start=start, kv_end=end, causal=causal)
    want = xattention_scores_reference(q, k, **kw)
    got = xattention_scores(q, k, **kw)
    tol = 1e-4 if dtype == torch.float32 or not ON_GPU else 3e-2  # on the GPU 16-bit inputs use 16-bit products
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@needs_triton
def test_triton_scores_in_scratch_sized_chunks_match_one_launch():
    q, k = _qk(2, 4, 2, 150, 150, 16, seed=1)
    kw = dict(stride=8, block_size=64, kv_start=torch.tensor([0, 20], device=DEVICE))
    whole = xattention_scores(q, k, **kw)
    chunked = xattention_scores(q, k, scratch_bytes=1, **kw)  # one launch per (batch row, head slice)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def _selection_by_loops(scores, tau, visible, forced):
    """Per row in Python: forced blocks, then by descending score (ascending index on ties) until the share >= tau."""
    batch, heads, n_qb, n_kb = scores.shape
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(n_qb):
                vis = [j for j in range(n_kb) if visible[b, i, j]]
                total = sum(float(scores[b, h, i, j]) for j in vis)
                rank = sorted(vis, key=lambda j: (not forced[b, i, j], -float(scores[b, h, i, j]), j))
                got = 0.0
                for j in rank:
                    if forced[b, i, j] or tau[h] >= 1.0 or got < tau[h] * total:
                        kept[b, h, i, j] = True
                        got += float(scores[b, h, i, j])
    return kept


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
def test_selection_keeps_exactly_the_blocks_of_the_loop_reference(use_triton):
    q, k = _qk(2, 3, 1, 600, 600, 16, seed=3)
    start, end = torch.tensor([0, 130]), torch.tensor([560, 600])
    scores = xattention_scores_reference(q, k, stride=8, block_size=64, kv_start=start, kv_end=end).cpu()
    scores[0, 0, 5, 1] = scores[0, 0, 5, 2]  # a tie
    tau = torch.tensor([0.5, 0.9, 1.0])
    kw = dict(q_tokens=600, kv_tokens=600, block_size=64, kv_start=start.to(DEVICE), kv_end=end.to(DEVICE))
    index, count = select_blocks(scores.to(DEVICE), tau.to(DEVICE), use_triton=use_triton, **kw)
    index, count = index.cpu(), count.cpu()
    got = torch.zeros_like(scores, dtype=torch.bool)
    for b, h, i in torch.cartesian_prod(*(torch.arange(n) for n in count.shape)).tolist():
        got[b, h, i, index[b, h, i, : count[b, h, i]].long()] = True
    visible, forced = visible_blocks(2, 600, 600, 64, start, end, True, "cpu")
    assert torch.equal(got, _selection_by_loops(scores, tau.tolist(), visible, forced))


@needs_triton
@pytest.mark.parametrize(
    "batch, heads, q_tokens, kv_tokens, block_size, causal",
    [(2, 3, 600, 600, 64, True), (2, 2, 300, 700, 64, True), (1, 2, 500, 500, 128, False)],
)
def test_triton_selection_matches_the_reference(batch, heads, q_tokens, kv_tokens, block_size, causal):
    gen = torch.Generator().manual_seed(4)
    n_qb, n_kb = -(-q_tokens // block_size), -(-kv_tokens // block_size)
    scores = torch.rand(batch, heads, n_qb, n_kb, generator=gen)
    scores[0, 0, 3, 1] = scores[0, 0, 3, 2]  # a tie
    scores[..., 0, :] = 0.0  # rows with nothing to share
    scores[-1, -1, 2, :2] = 5.0  # the sink holds most of a row
    kw = dict(q_tokens=q_tokens, kv_tokens=kv_tokens, block_size=block_size, causal=causal,
              kv_start=torch.tensor([0, 130][:batch]), kv_end=torch.tensor([kv_tokens - 40, kv_tokens][:batch]))
    for tau in (torch.tensor([1.0, 0.3, 0.9][:heads]), torch.rand(batch, heads, n_qb, generator=gen)):
        want = select_blocks_reference(scores, tau, **kw)
        got = select_blocks(scores.to(DEVICE), tau.to(DEVICE), use_triton=True, **kw)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_tau_one_keeps_every_causal_block():
    scores = xattention_scores_reference(*_qk(1, 2, 2, 500, 500, 16), stride=4, block_size=64)
    index, count = select_blocks(scores, torch.ones(2), q_tokens=500, kv_tokens=500, block_size=64)
    assert count.cpu().tolist() == [[list(range(1, 9))] * 2]


def _xattention_plan(model, heads):
    plan = Plan.dense(model)
    for layer in plan.layers:
        layer.attention.heads = list(heads)
    return plan


def test_layer_with_tau_one_reproduces_dense_with_padding():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 200, dtype=torch.long)
    mask[1, :13] = 0  # left padding
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        runtime.apply(model, _xattention_plan(model, [XAttentionPattern(tau=1.0, stride=8, block_size=64)] * 4))
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 13:], want[1, 13:], atol=2e-5, rtol=1e-5)


def test_mixed_layer_keeps_window_heads_rule_and_decode_works():
    model = tiny_model("llama")
    window = WindowPattern(alpha=16.0, beta=0.0, sink=4)
    heads = [XAttentionPattern(tau=0.5, stride=4, block_size=64), window, XAttentionPattern(tau=1.0, stride=4, block_size=64), window]
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        runtime.apply(model, _xattention_plan(model, [window] * 4))
        want = model(ids).logits
        runtime.apply(model, _xattention_plan(model, heads))
        got = model(ids).logits
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(got).all() and generated.shape == (1, 153)
    assert not torch.allclose(got, want)  # xattention heads differ from the window heads


def test_calibration_needs_a_smaller_tau_for_concentrated_attention():
    gen = torch.Generator().manual_seed(0)
    tokens, dim = 1024, 32
    k = torch.randn(1, 1, tokens, dim, generator=gen)
    q_sharp = k[0, 0, torch.randint(0, 64, (tokens,), generator=gen)] * 4  # every query looks at the first block
    q_sharp = q_sharp[None, None]
    q_flat = torch.zeros(1, 1, tokens, dim)  # uniform attention over all causal keys
    q = torch.cat([q_sharp, q_flat], dim=1)
    k2 = torch.cat([k, k], dim=1)
    ranking = layer_ranking(q, k2, dim**-0.5, stride=8, block_size=64)
    tau = ranking.smallest_tau(0.95)
    assert tau[0] < 0.5 < tau[1]


def test_true_block_mass_rows_sum_to_their_queries():
    q, k = _qk(1, 2, 1, 200, 200, 16)
    mass = true_block_mass(q[0], k[0], 64, 0.25)
    torch.testing.assert_close(mass.sum(-1).cpu(), torch.tensor([[64.0, 64, 64, 8]] * 2))
    want = naive_attention(q, k, torch.eye(200, device=DEVICE)[None, None].expand(1, 1, 200, 200), torch.tril(
        torch.ones(200, 200, dtype=torch.bool, device=DEVICE)), scale=0.25)  # attention matrix itself, V = identity
    torch.testing.assert_close(mass[0, 1, 0].cpu(), want[0, 0, 64:128, :64].sum().cpu(), atol=1e-4, rtol=1e-5)


def test_density_budget_lowers_thresholds_within_the_budget():
    model = tiny_model("llama")
    config = XAttentionConfig(stride=4, block_size=64, coverage=0.99)
    stats = calibrate(model, [torch.randint(0, 128, (320,), generator=torch.Generator().manual_seed(2))], config)
    tau, info = budget_thresholds(stats, config.tau_grid, budget=0.8)
    assert info["grid_density"] <= 0.8 and bool((tau <= stats.tau + 1e-6).all())


def test_xattention_recipe_end_to_end(tiny_model_dir, tmp_path):
    import compressor

    recipe = tmp_path / "xattention.yaml"
    recipe.write_text(
        "name: xattention-tiny\ncalibration: {source: corpus, samples: 1, lengths: [256]}\n"
        "attention: {method: xattention, coverage: 0.9, stride: 8, block_size: 64}\n"
    )
    out = tmp_path / "out"
    plan, _ = compressor.compress(str(tiny_model_dir), str(recipe), str(out), report=False, log=lambda m: None)
    assert all(isinstance(h, XAttentionPattern) for layer in plan.layers for h in layer.attention.heads)
    assert plan.search["attention"]["coverage_target"] == 0.9
    model, tokenizer = compressor.load(str(out), device="cpu", dtype="float32")
    ids = torch.randint(0, len(tokenizer), (1, 130))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 130, len(tokenizer)) and torch.isfinite(logits).all()
