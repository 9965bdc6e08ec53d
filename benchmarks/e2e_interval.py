"""Which statistic of interleaved end-to-end rounds gives the narrowest honest interval, and how many
rounds a target width needs: an offline study of the rounds ``benchmarks.latency`` recorded.

``python -m benchmarks.e2e_interval [RECORDS.jsonl] [--batch 1] [--target 1.0]`` reads every record
with end-to-end round times (``results[i].end_to_end.times_s``: one wall time per variant per round)
and, for the headline pair (MIRA fused over the backbone), prints each estimator of the overhead
with its 95% percentile-bootstrap interval over rounds, resampled as pairs, or as blocks of adjacent
rounds (``--block``: honest where rounds drift together), and the rounds and seconds the interval
would need to reach ``--target`` pp, scaling its width as 1 / sqrt(rounds).

Estimators (all of the per-round log ratio log(fused / backbone) unless marginal):

- median: what ``benchmarks._pairs`` reports (the median per-round ratio);
- trimmed mean (20% each side) and Hodges-Lehmann (median of the pairwise means): more efficient
  than the median where the ratios are near-normal in the middle, as robust to the tails;
- mean: for comparison (the tails make it wide);
- ratio of medians, of lower quartiles: marginal quantiles of each variant, which give up pairing;
- min-of-k groups: k adjacent rounds per group, the ratio of each variant's fastest in the group.

Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks import _cli, _pairs

__all__ = ["ESTIMATORS", "interval", "main"]


def _hodges_lehmann(v: np.ndarray) -> np.ndarray:
    n = v.shape[-1]
    i, j = np.triu_indices(n)
    return np.median((v[..., i] + v[..., j]) / 2, axis=-1)


def _trimmed(v: np.ndarray, cut: float = 0.2) -> np.ndarray:
    s = np.sort(v, axis=-1)
    k = int(cut * s.shape[-1])
    return s[..., k:s.shape[-1] - k].mean(axis=-1)


def _min_of(k: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def est(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m = a.shape[-1] // k
        ga = a[..., :m * k].reshape(*a.shape[:-1], m, k).min(-1)
        gb = b[..., :m * k].reshape(*b.shape[:-1], m, k).min(-1)
        return np.median(np.log(ga / gb), axis=-1)
    return est


# name -> f(fused (..., n), backbone (..., n)) -> log overhead (...); rows of a bootstrap in one call.
ESTIMATORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "median of ratios (reported)": lambda a, b: np.median(np.log(a / b), axis=-1),
    "20% trimmed mean": lambda a, b: _trimmed(np.log(a / b)),
    "Hodges-Lehmann": lambda a, b: _hodges_lehmann(np.log(a / b)),
    "mean": lambda a, b: np.log(a / b).mean(axis=-1),
    "ratio of medians": lambda a, b: np.log(np.median(a, -1) / np.median(b, -1)),
    "ratio of lower quartiles": lambda a, b: np.log(np.percentile(a, 25, -1) / np.percentile(b, 25, -1)),
    "min of 3 adjacent rounds": _min_of(3),
}


def interval(est, a: np.ndarray, b: np.ndarray, *, block: int = 1, n_boot: int = 1000,
             seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi) in percent: a percentile bootstrap over rounds (blocks of ``block`` adjacent
    rounds kept together, in their order, so that a min-of-k group sees adjacent rounds)."""
    rng = np.random.default_rng(seed)
    n = a.size
    m = n // block
    starts = rng.integers(0, n - block + 1, (n_boot, m))
    idx = (starts[..., None] + np.arange(block)).reshape(n_boot, m * block)
    boots = []
    for rows in np.array_split(idx, max(1, n_boot // 100)):  # Hodges-Lehmann is O(n^2) per row
        boots.append(est(a[rows], b[rows]))
    boots = np.concatenate(boots)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    to_pct = lambda v: 100.0 * float(np.expm1(v))  # noqa: E731
    return to_pct(est(a, b)), to_pct(lo), to_pct(hi)


def _read(p: argparse.ArgumentParser, path: Path) -> list[dict]:
    """The records of a JSONL file; one that is not (a line that is not a JSON object) is ``p.error``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"records {path}: {getattr(e, 'strerror', None) or e}")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            p.error(f"records {path}: line {number} is not JSON ({e}); expected a latency.jsonl")
        if not isinstance(rec, dict):
            p.error(f"records {path}: line {number} is not a record (a JSON object); expected a latency.jsonl")
        records.append(rec)
    return records


def _records(records: list[dict], batch: int):
    for rec in records:
        for res in rec.get("results") or []:
            times = (res.get("end_to_end") or {}).get("times_s") or {}
            if res.get("batch") == batch and "fused" in times and "backbone" in times:
                yield rec, res, np.asarray(times["fused"]), np.asarray(times["backbone"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e_interval", description=__doc__.split("\n\n")[0],
                                formatter_class=_cli.HelpFormatter)
    p.add_argument("records", nargs="?", default=str(Path(__file__).parent / "results" / "latency.jsonl"),
                   help="latency.jsonl to read")
    p.add_argument("--batch", type=_cli.positive_int, default=1, help="the batch size whose rounds are read")
    p.add_argument("--target", type=_cli.positive_float, default=1.0, help="interval width to reach, pp")
    p.add_argument("--block", type=_cli.positive_int, default=1, help="adjacent rounds resampled together")
    p.add_argument("--min-rounds", type=_cli.non_negative_int, default=100, help="skip records with fewer rounds")
    a = p.parse_args(argv)
    if not Path(a.records).is_file():
        p.error(f"no records file {a.records}")
    found = list(_records(_read(p, Path(a.records)), a.batch))
    # Nothing to show is said, not a silent exit 0 (the default --min-rounds 100 skips every short run).
    if not found:
        p.error(f"--batch {a.batch}: no record in {a.records} has end-to-end round times at batch {a.batch}")
    if all(fused.size < a.min_rounds for *_, fused, _ in found):
        p.error(f"--min-rounds {a.min_rounds}: the {len(found)} records at --batch {a.batch} in {a.records} have at "
                f"most {max(f.size for *_, f, _ in found)} end-to-end rounds; lower --min-rounds")
    for rec, res, fused, backbone in found:
        n = fused.size
        if n < a.min_rounds:
            continue
        if n < 2 * a.block:  # no bootstrap sample of whole blocks: every estimate would be NaN
            print(f"commit {rec.get('commit')}: {n} rounds, fewer than two blocks of --block {a.block}: skipped\n")
            continue
        e2e = res["end_to_end"]
        per_round = e2e["seconds"] / n
        m = rec.get("machine", {})
        print(f"commit {rec.get('commit')} {rec.get('timestamp')}, {_pairs.cpu_line(m)}, batch {a.batch}: {n} rounds "
              f"in {e2e['seconds']:.0f} s, load {m.get('load_average_1m', float('nan')):.1f} at the start; "
              f"block {a.block}")
        for name, est in ESTIMATORS.items():
            mid, lo, hi = interval(est, fused, backbone, block=a.block)
            width = hi - lo
            need = int(np.ceil(n * (width / a.target) ** 2))
            print(f"  {name:<28} {mid:+6.2f}% [{lo:+6.2f}, {hi:+6.2f}]  width {width:5.2f} pp   {a.target:g} pp: "
                  f"~{need} rounds, ~{need * per_round:.0f} s")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
