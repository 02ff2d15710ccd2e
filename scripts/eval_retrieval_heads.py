"""Diagnostic: does a 25%-density plan that keeps passkey retrieval exist on SmolLM2? (moa_smollm2_h200.md)

Ranks the KV groups by the attention mass their answer rows put on the answer's digits in the prompt (dense model,
eager attention, ``--rank-samples`` passkey samples of the calibration split), keeps the top k groups dense and gives
every other head sink 64 + the widest window that keeps the average causal density at ``--density``, then measures
passkey accuracy and perplexity on held-out samples. The numbers in the results file came from

    python scripts/eval_retrieval_heads.py --length 2048 --ks 0 8 14

Holds N x N attention maps of one sequence at a time (eager attention): keep ``--length`` to a few thousand tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from compressor import runtime
from compressor.calibration.data import retrieval_samples
from compressor.evaluate import perplexity, retrieval_accuracy
from compressor.methods.moa import plan_from_heads
from compressor.models import load_model
from compressor.plan import DensePattern, WindowPattern, causal_window_density


def needle_attention(model, tokenizer, length: int, samples: int) -> torch.Tensor:
    """[layers, q_heads]: mean attention mass of the answer rows on prompt tokens equal to the answer's digits."""
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    score = torch.zeros(layers, heads)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for s in retrieval_samples(tokenizer, "passkey", length, samples, seed=77):
            digits = {t for t in s.input_ids[s.answer_start:].tolist() if tokenizer.decode([t]).strip().isdigit()}
            keys = [i for i, t in enumerate(s.input_ids[: s.answer_start - 32].tolist()) if t in digits]
            with torch.no_grad():
                attentions = model(s.input_ids[None].to(model.device), output_attentions=True).attentions
            for layer, a in enumerate(attentions):
                score[layer] += a[0, :, s.answer_start - 1 : -1][:, :, keys].sum(-1).mean(-1).cpu()
    finally:
        model.set_attn_implementation(previous)
    return score / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 8, 14], help="KV groups kept dense")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--rank-samples", type=int, default=12)
    parser.add_argument("--samples", type=int, default=20, help="held-out passkey samples per plan")
    parser.add_argument("--ppl-samples", type=int, default=4)
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model, tokenizer, _ = load_model("smollm2-135m", device=args.device, dtype="float32")
    n, layers = args.length, model.config.num_hidden_layers
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    group = heads // kv
    score = needle_attention(model, tokenizer, n, args.rank_samples).view(layers, kv, group).sum(-1).flatten()
    order = torch.argsort(score, descending=True).tolist()
    print("groups by needle attention (layer, kv head, score):",
          [(i // kv, i % kv, round(float(score[i]), 3)) for i in order[:20]])
    total = layers * kv
    for k in args.ks:
        dense = set(order[:k])
        fits = [w for w in range(1, n + 1)
                if k / total + (1 - k / total) * causal_window_density(args.sink, w, n) <= args.density + 1e-9]
        if not fits:
            print(f"k={k}: no window keeps the density at {args.density}")
            continue
        rule = WindowPattern(alpha=float(max(fits)), beta=0.0, sink=args.sink)
        plan = plan_from_heads(model, [[DensePattern() if layer * kv + h // group in dense else rule
                                        for h in range(heads)] for layer in range(layers)])
        t0 = time.perf_counter()
        runtime.apply(model, plan)
        try:
            acc = retrieval_accuracy(model, tokenizer, "passkey", n, args.samples, 0)
            ppl = perplexity(model, tokenizer, n, args.ppl_samples, 0)
        finally:
            runtime.remove(model)
        seconds = time.perf_counter() - t0
        print(f"| {n} | {k} | {max(fits)} | {plan.density(n):.3f} | {acc:.2f} | {ppl:.3f} | ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
