"""The demo's shared vision-tower cache on the trained default model: the same answers, and how much faster.

Answers the first MMBench and MME scoring groups of the demo's test split twice per configuration (baseline, then
FastV at 11.1%), without and with :class:`divico_testbed.vision_cache.VisionFeatureCache` (one cache shared by both
configurations, as in the demo), side by side in one process, and prints the wall times, their ratio and whether
the answers and first-token log-probabilities are identical.

    python benchmarks/demo_vision_cache.py [--mmbench-groups 12] [--mme-groups 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import time

import divico
import torch

from divico_testbed.data.benchmarks import load_eval_records
from divico_testbed.default_model import default_cache_root
from divico_testbed.evaluation import iter_answer_batches, select_slice
from divico_testbed.recipe import load_trained_default
from divico_testbed.vision_cache import VisionFeatureCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mmbench-groups", type=int, default=12)
    parser.add_argument("--mme-groups", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = default_cache_root() / "demo-data"  # written by `divico demo`
    base, processor = load_trained_default()
    records = (select_slice(load_eval_records(data, "mmbench", "test"), args.mmbench_groups)
               + select_slice(load_eval_records(data, "mme", "test"), args.mme_groups))
    cache = VisionFeatureCache()
    print(f"{len(records)} records, {args.threads} thread(s)")
    print("| configuration | uncached (s) | cached (s) | ratio | answers equal | max abs diff of log-probs |")
    print("|---|---|---|---|---|---|")
    for name in ("baseline", "fastv"):
        runs = {}
        for cached in (False, True):
            model = copy.deepcopy(base)
            if name == "fastv":
                divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=1 / 9, layer=2))
            if cached:
                cache.attach(model)
            tic = time.perf_counter()
            batches = list(iter_answer_batches(model.eval(), processor, records, data, 16, 8, first_token=True,
                                               show_progress=False))
            runs[cached] = (time.perf_counter() - tic, [a for b in batches for a in b.answers],
                            torch.cat([b.first_token_logprobs for b in batches]))
        (plain_s, plain_answers, plain_lp), (cached_s, cached_answers, cached_lp) = runs[False], runs[True]
        print(f"| {name} | {plain_s:.1f} | {cached_s:.1f} | {cached_s / plain_s:.2f} | "
              f"{plain_answers == cached_answers} | {(plain_lp - cached_lp).abs().max().item():.1e} |")
    print(f"cache: {cache.misses} images encoded, {cache.hits} served from the cache")


if __name__ == "__main__":
    main()
