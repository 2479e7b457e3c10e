"""Mutation check: do the tests notice when a core line is broken?

Each entry of :data:`MUTATIONS` replaces one exact line of the library (selection, scoring, DiViCo's pooled rest,
gap and KL, DeCo's pooling, mask rebuild, position gather, train/eval mode of added modules, checkpoint config
check, answer normalisation and parsing) and names the test files that must catch it. The script copies ``src/``,
``tests/`` and the files the tests read into a temporary folder, applies one mutation at a time there (never in
the working tree), runs those tests with ``-x`` and ``PYTHONPATH`` pointing at the copy, and reports each mutation
as *caught* (a test failed) or *survived* (all passed).

First the selected test files run unmutated: a test that already fails would "catch" every mutation, so such
tests are listed and left out of the mutated runs (and the check counts as incomplete).

Exit status: 0 when every mutation is caught and no test failed unmutated; 1 when one survives or a test failed
unmutated; 2 when an entry's original line is no longer found exactly once in its file (the list must follow the
code: fix the entry, never drop it silently) or the unmutated tests do not run.

    nice -n 15 python benchmarks/mutations.py            # all entries (about 5-10 min on 2 cores)
    python benchmarks/mutations.py --list                # entries and their test files
    python benchmarks/mutations.py --only deco --only kl # entries whose name contains a pattern
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Copied into the scratch tree (what the tests import or read); testbed/src is only read, so it stays in place.
COPIED = ("src", "tests", "pyproject.toml", "README.md", "docs")
READ_IN_PLACE = ("testbed/src",)


@dataclass(frozen=True)
class Mutation:
    """One deliberate break of one line.

    Attributes
    ----------
    name
        Short id (``--only`` matches a substring of it).
    path
        File relative to the repository root.
    original
        The exact line as it stands in the file, without its indentation (must occur exactly once).
    replacement
        What the line becomes (indentation is kept).
    tests
        Test files (relative to the root; globs allowed) that must catch it.
    """

    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]


PINNED = "tests/test_pinned_values.py"
ENGINE = ("tests/test_pinned_values.py", "tests/test_engine.py", "tests/test_contract.py")
METRICS = ("tests/test_metrics*.py",)

MUTATIONS: tuple[Mutation, ...] = (
    # --- selection ---------------------------------------------------------------------------------------------
    Mutation("selection-keeps-one-more", "src/divico/selection.py",
             "return ~visual | (rank < keep.unsqueeze(1))",
             "return ~visual | (rank <= keep.unsqueeze(1))",
             ("tests/test_error_paths.py", *ENGINE)),
    Mutation("selection-keeps-lowest-scores", "src/divico/selection.py",
             'masked = scores.float().masked_fill(~visual, float("-inf"))',
             'masked = (-scores.float()).masked_fill(~visual, float("-inf"))',
             ("tests/test_error_paths.py", *ENGINE)),
    # --- scoring -----------------------------------------------------------------------------------------------
    Mutation("scoring-without-scaling", "src/divico/scoring.py",
             "logits = torch.matmul(query, key.transpose(-1, -2)) * layout.scaling  # (B, H, Q, N)",
             "logits = torch.matmul(query, key.transpose(-1, -2))  # (B, H, Q, N)",
             ("tests/test_contract.py", "tests/test_engine.py")),
    Mutation("scoring-max-over-heads", "src/divico/scoring.py",
             "return probs[:, :, 0, :].mean(dim=1).nan_to_num(0.0)",
             "return probs[:, :, 0, :].amax(dim=1).nan_to_num(0.0)",
             ("tests/test_contract.py", "tests/test_engine.py")),
    Mutation("scoring-from-the-first-answer-token", "src/divico/runtime.py",
             "return (first - 1).clamp(min=0).long()",
             "return first.clamp(max=length - 1).long()",
             ("tests/test_engine.py", "tests/test_error_paths.py")),
    # --- DiViCo ------------------------------------------------------------------------------------------------
    Mutation("pooled-rest-sum-not-mean", "src/divico/methods/divico.py",
             "return total / counts",
             "return total",
             (PINNED, "tests/test_divico_method.py")),
    Mutation("gap-replaces-instead-of-adding", "src/divico/methods/divico.py",
             "return kept.index_put((sample, slot), gap.to(kept.dtype), accumulate=True)",
             "return kept.index_put((sample, slot), gap.to(kept.dtype), accumulate=False)",
             (PINNED, "tests/test_divico_method.py")),
    Mutation("kl-without-the-log-sigma-term", "src/divico/methods/divico.py",
             "per_dimension = 0.5 * (mu.square().mean() + (2 * log_sigma).exp().mean() - 1.0 - 2 * log_sigma.mean())",
             "per_dimension = 0.5 * (mu.square().mean() + (2 * log_sigma).exp().mean() - 1.0)",
             (PINNED, "tests/test_divico_method.py")),
    Mutation("kl-mean-over-dimensions-not-eq8-sum", "src/divico/methods/divico.py",
             'return per_dimension * mu.shape[-1] if reduction == "sum" else per_dimension',
             "return per_dimension",
             (PINNED, "tests/test_divico_method.py")),
    Mutation("g-theta-samples-in-eval-mode", "src/divico/methods/divico.py",
             "gap = mu + torch.randn_like(mu) * log_sigma.exp() if self.training else mu",
             "gap = mu + torch.randn_like(mu) * log_sigma.exp()",
             (PINNED, "tests/test_determinism.py")),
    # --- DeCo --------------------------------------------------------------------------------------------------
    Mutation("deco-max-pooling", "src/divico/methods/deco.py",
             "pooled = F.adaptive_avg_pool2d(cells.permute(0, 3, 1, 2), target)",
             "pooled = F.adaptive_max_pool2d(cells.permute(0, 3, 1, 2), target)",
             (PINNED, "tests/test_contract.py")),
    # --- runtime: masks and positions --------------------------------------------------------------------------
    Mutation("mask-rebuild-ignores-padding", "src/divico/runtime.py",
             "self._build_masks(step, compressed, mask_for_layers, cache)",
             "self._build_masks(step, compressed, None, cache)",
             ENGINE),
    Mutation("decode-mask-drops-the-compressed-prefix", "src/divico/runtime.py",
             "return torch.cat([state.compressed_mask_2d, tail.to(state.compressed_mask_2d.dtype)], dim=1)",
             "return torch.cat([torch.ones_like(state.compressed_mask_2d), "
             "tail.to(state.compressed_mask_2d.dtype)], dim=1)",
             ("tests/test_contract.py",)),
    Mutation("positions-renumbered-after-compression", "src/divico/adapters/base.py",
             "return gather(cos, seq_dim=-2), gather(sin, seq_dim=-2)",
             "return cos[..., : gather(cos, seq_dim=-2).shape[-2], :], sin[..., : gather(sin, seq_dim=-2).shape[-2], :]",
             ENGINE),
    # --- train/eval mode and checkpoints -----------------------------------------------------------------------
    Mutation("lora-left-in-training-mode", "src/divico/lora.py",
             "module.train(base.training)",
             "pass  # mutation: new LoRA layers keep nn.Module's default (training) mode",
             ("tests/test_determinism.py",)),
    Mutation("compressor-always-training", "src/divico/runtime.py",
             "self.compressor.train(self.model.training)",
             "self.compressor.train(True)",
             ("tests/test_determinism.py", PINNED)),
    Mutation("load-keeps-another-config-silently", "src/divico/checkpoint.py",
             "if differences and not override_config:",
             "if False:",
             ("tests/test_error_paths.py",)),
    # --- metrics -----------------------------------------------------------------------------------------------
    Mutation("vqa-references-not-normalised", "src/divico/metrics.py",
             "references = [normalize_vqa_answer(answer, rules=rules) for answer in reference_answers]",
             "references = list(reference_answers)",
             METRICS),
    Mutation("vqa-soft-accuracy-over-two", "src/divico/metrics.py",
             "subset_scores = [min(1.0, (total_matches - (reference == predicted)) / 3.0)",
             "subset_scores = [min(1.0, (total_matches - (reference == predicted)) / 2.0)",
             METRICS),
    Mutation("vqa-articles-kept", "src/divico/metrics.py",
             "if word not in _VQA_ARTICLES:",
             "if True:",
             METRICS),
    Mutation("textvqa-possessive-not-split", "src/divico/metrics.py",
             """text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()""",
             """text = text.lower().replace(",", "").replace("?", "").strip()""",
             METRICS),
    Mutation("pope-reads-every-sentence", "src/divico/metrics.py",
             'first_sentence = text.split(".")[0]',
             "first_sentence = text",
             METRICS),
    Mutation("pope-unparseable-counts-as-no", "src/divico/metrics.py",
             'return "no" if any(word in _POPE_NO_WORDS for word in words) else "yes"',
             'return "yes" if any(word in ("Yes", "yes") for word in words) else "no"',
             METRICS),
    Mutation("mme-reads-the-whole-answer", "src/divico/metrics.py",
             "prefix = answer[:4]",
             "prefix = answer",
             METRICS),
    Mutation("mme-acc-plus-any-instead-of-all", "src/divico/metrics.py",
             "image_correct[subtask][image] = image_correct[subtask].get(image, True) and correct",
             "image_correct[subtask][image] = image_correct[subtask].get(image, False) or correct",
             METRICS),
)


def locate(mutation: Mutation, root: Path) -> tuple[str, int] | str:
    """``(file text, line index)`` of the mutation's original line in ``root``, or why it cannot be applied."""
    path = root / mutation.path
    if not path.is_file():
        return f"{mutation.path} does not exist"
    lines = path.read_text().split("\n")
    hits = [index for index, line in enumerate(lines) if line.strip() == mutation.original]
    if len(hits) != 1:
        return f"{mutation.path}: the original line occurs {len(hits)} times (expected once): {mutation.original!r}"
    return path.read_text(), hits[0]


def mutated_text(text: str, index: int, replacement: str) -> str:
    lines = text.split("\n")
    indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
    lines[index] = indent + replacement
    return "\n".join(lines)


def scratch_copy(destination: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            shutil.copy2(source, destination / name)


def test_files(mutation: Mutation, root: Path) -> list[str]:
    files: list[str] = []
    for pattern in mutation.tests:
        matches = sorted(str(path.relative_to(root)) for path in root.glob(pattern))
        files += [match for match in matches if match not in files]
    return files


def run_tests(
    root: Path, files: list[str], timeout: float, deselect: list[str] = (), stop_first: bool = True
) -> tuple[str, float, str, list[str]]:
    """``(outcome, seconds, detail, failing test ids)`` of pytest (``-x`` unless ``stop_first`` is False) on
    ``files`` in the scratch tree, leaving out the ``deselect`` test ids."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(root / "src"), *(str(ROOT / p) for p in READ_IN_PLACE)]))
    command = [sys.executable, "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-rfE", "-p", "no:cacheprovider",
               "--rootdir", str(root), *(f"--deselect={test_id}" for test_id in deselect), *files]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, f"no result after {timeout:.0f} s", []
    seconds = time.perf_counter() - start
    lines = [line for line in (done.stdout + done.stderr).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    failing_ids = sorted({line.split(" ", 1)[1].split(" - ", 1)[0] for line in failed})
    detail = failed[0] if failed else last
    if done.returncode == 0:
        return "survived", seconds, last, []
    if done.returncode == 1:
        return "caught", seconds, detail, failing_ids
    if done.returncode == 5:
        return "no tests", seconds, last, []
    return f"error (pytest exit {done.returncode})", seconds, detail, failing_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run entries whose name contains this (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation's test run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated run that finds (and leaves out) tests already failing")
    args = parser.parse_args(argv)

    selected = [m for m in MUTATIONS if not args.only or any(p in m.name for p in args.only)]
    if args.list:
        for mutation in selected:
            print(f"{mutation.name:45s} {mutation.path}  ->  {' '.join(mutation.tests)}")
        return 0
    if not selected:
        print(f"no mutation matches {args.only}; names: {', '.join(m.name for m in MUTATIONS)}", file=sys.stderr)
        return 2
    stale = [(m.name, problem) for m in selected if isinstance(problem := locate(m, ROOT), str)]
    if stale:
        for name, problem in stale:
            print(f"STALE {name}: {problem}", file=sys.stderr)
        print("Fix these entries to follow the code (benchmarks/mutations.py).", file=sys.stderr)
        return 2

    scratch = Path(tempfile.mkdtemp(prefix="divico-mutations-"))
    results: list[tuple[str, str, float, str]] = []
    baseline_failures: list[str] = []
    try:
        scratch_copy(scratch)
        print(f"scratch copy: {scratch}", flush=True)
        if not args.no_baseline:
            # Tests that already fail unmutated would "catch" every mutation: find them and leave them out.
            files = sorted({f for m in selected for f in test_files(m, scratch)})
            outcome, seconds, detail, baseline_failures = run_tests(scratch, files, args.timeout * 3,
                                                                    stop_first=False)
            print(f"baseline ({len(files)} files, unmutated): {outcome if outcome != 'survived' else 'passed'} "
                  f"in {seconds:.0f} s", flush=True)
            for test_id in baseline_failures:
                print(f"  fails unmutated, left out below: {test_id}", flush=True)
            if outcome not in ("survived", "caught"):
                print(f"The unmutated tests do not run ({detail}); mutation results would mean nothing.",
                      file=sys.stderr)
                return 2
        for mutation in selected:
            located = locate(mutation, scratch)
            assert not isinstance(located, str), located
            text, index = located
            path = scratch / mutation.path
            path.write_text(mutated_text(text, index, mutation.replacement))
            try:
                outcome, seconds, detail, _ = run_tests(scratch, test_files(mutation, scratch), args.timeout,
                                                        deselect=baseline_failures)
            finally:
                path.write_text(text)
            results.append((mutation.name, outcome, seconds, detail))
            print(f"{outcome:10s} {seconds:6.1f} s  {mutation.name}: {detail}", flush=True)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    survived = [name for name, outcome, _, _ in results if outcome != "caught"]
    print(f"\n{len(results) - len(survived)} of {len(results)} mutations caught.")
    if survived:
        print("Not caught: " + ", ".join(survived))
    if baseline_failures:
        print(f"{len(baseline_failures)} test(s) failed unmutated and were left out: the check is incomplete.")
    return 1 if survived or baseline_failures else 0


if __name__ == "__main__":
    sys.exit(main())
