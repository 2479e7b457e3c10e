"""Analytic FLOPs of full-depth LLaVA-1.5-7B / 13B under each method (no model is built).

    python benchmarks/analytic_flops.py [--visual-tokens 576] [--text-tokens 60] [--keep-tokens 64]
"""

from __future__ import annotations

import argparse

from divico.efficiency import PromptShape, build_config, count_flops


def table(preset: str, visual: int, text: int, keep: int, layer: int) -> str:
    config = build_config(preset)
    prompt = PromptShape(visual_tokens=visual, text_tokens=text)
    rows = [("none", {}, "sdpa"), ("fastv", {"keep_tokens": keep}, "sdpa"),
            ("fastv", {"keep_tokens": keep}, "full_attention"), ("divico", {"keep_tokens": keep}, "sdpa"),
            ("deco", {"keep_tokens": keep}, "sdpa")]
    base = count_flops(config, prompt, method="none")
    lines = [f"{preset}: {visual} visual + {text} text tokens, keep {keep}, K={layer} (causal attention)",
             "| method | scoring | total TFLOPs | ratio | LLM prefill TFLOPs | ratio | overhead share | Eq.10 ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for method, keep_kwargs, scoring in rows:
        flops = count_flops(config, prompt, method=method, layer=layer, scoring=scoring, **keep_kwargs)
        lines.append(f"| {method} | {scoring} | {flops.total / 1e12:.3f} | {flops.total / base.total:.3f} | "
                     f"{flops.llm_prefill / 1e12:.3f} | {flops.llm_prefill / base.llm_prefill:.3f} | "
                     f"{flops.overhead / flops.total:.2%} | {flops.paper_eq10 / base.paper_eq10:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visual-tokens", type=int, default=576)
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--keep-tokens", type=int, default=64)
    parser.add_argument("--layer-k", type=int, default=2)
    args = parser.parse_args()
    for preset in ("llava-1.5-7b", "llava-1.5-13b"):
        print(table(preset, args.visual_tokens, args.text_tokens, args.keep_tokens, args.layer_k))
        print()
