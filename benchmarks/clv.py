"""Issue 15 at scale: predictive CLV refit and evaluation at 100k and 1M members (core only).

Synthetic members with 2 years of history, drawn from the BG/NBD and Gamma-Gamma story with
CDNOW-like parameters (weekly unit): first purchases spread evenly over the 730 days before the
as-of day; while alive, purchases at a Poisson rate lambda ~ Gamma(r=0.25, alpha=4) per week;
after each purchase, drop out with probability p ~ Beta(a=0.8, b=2.4); each purchase day's total
is Gamma(6, scale nu), nu ~ Gamma(4, 15), in cents. Purchases on the same UTC day make one
purchase day. Members become :class:`MemberKey` rows in one :class:`SufficientStats` (what the
exporter holds after merging the partitions' statistics). Printed, per size:

- the distinct BG/NBD rows (x, d0, dl) and Gamma-Gamma rows (x, m_x) the fits run over;
- ``to_bytes``: the JSON statistics (what partitions publish and the exporter merges), and its
  zlib-compressed size (the worker compresses partials);
- ``fit``: ``SufficientStats.fit`` (BG/NBD and Gamma-Gamma, both polished), median of 3;
- ``records``: one ``ClvModel.records`` evaluation with the latest fit, without a refit (the KPIs
  of every evaluation between refits: windows 7d, 30d, 90d), median of 3.

Not part of ``run.py``. The goal of issue 15: a refit under 5 s at 1M members.

    .venv/bin/python benchmarks/clv.py                    # 100k and 1M (~1 min)
    .venv/bin/python benchmarks/clv.py --members 100000
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import numpy as np

from stream_kpis.core.clv import MemberKey, SufficientStats
from stream_kpis.core.predictive import ClvModel
from stream_kpis.settings import DAY_MS, Settings

HISTORY_DAYS = 730
AS_OF_DAY = 20_000 + HISTORY_DAYS  # UTC day numbers (2024-10-04 and two years before)


def synthetic_stats(members: int, seed: int = 15) -> SufficientStats:
    rng = np.random.default_rng(seed)
    first = AS_OF_DAY - rng.integers(0, HISTORY_DAYS, members)
    rate = rng.gamma(0.25, 1 / 4, members) / 7  # purchases per day while alive
    drop = rng.beta(0.8, 2.4, members)
    nu = rng.gamma(4, 15, members)
    x = np.zeros(members, np.int64)
    last = first.copy()
    repeat_cents = np.zeros(members, np.int64)
    time_ = first.astype(np.float64)
    going = rng.random(members) >= drop  # dropped out right after the first purchase
    while going.any():
        idx = np.flatnonzero(going)
        time_[idx] += rng.exponential(1 / np.maximum(rate[idx], 1e-12))
        day = np.floor(time_[idx]).astype(np.int64)
        inside = day <= AS_OF_DAY
        new_day = inside & (day > last[idx])
        hit = idx[new_day]
        x[hit] += 1
        last[hit] = day[new_day]
        repeat_cents[hit] += np.round(rng.gamma(6, nu[hit]) * 100).astype(np.int64)
        going[idx[~inside]] = False
        stay = idx[inside]
        going[stay] = rng.random(len(stay)) >= drop[stay]
    stats = SufficientStats()
    for xi, d0, dl, cents in zip(x.tolist(), first.tolist(), last.tolist(), repeat_cents.tolist(),
                                 strict=True):
        stats.add(MemberKey(xi, d0, dl, cents / 100 / xi if xi else 0.0))
    return stats


def median_seconds(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(members: int) -> dict:
    start = time.perf_counter()
    stats = synthetic_stats(members)
    made = time.perf_counter() - start
    raw = stats.to_bytes()
    settings = Settings(bucket_ms=DAY_MS, windows_ms=(7 * DAY_MS, 30 * DAY_MS, 90 * DAY_MS), clv=True)
    unit_days = settings.clv_unit_ms / DAY_MS
    fit_s = median_seconds(lambda: stats.fit(AS_OF_DAY, unit_days))
    fit = stats.fit(AS_OF_DAY, unit_days)
    model = ClvModel(settings)
    K = (AS_OF_DAY * DAY_MS) // settings.bucket_ms
    model.records(stats, K)  # the first call fits
    records_s = median_seconds(lambda: model.records(stats, K))
    assert model.fits == 1, "records refitted"
    return {"members": members, "bgnbd_rows": len(stats.bgnbd), "gg_rows": len(stats.gamma_gamma),
            "bytes": len(raw), "zlib": len(zlib.compress(raw)), "make_s": made, "fit_s": fit_s,
            "records_s": records_s, "params": (fit.bgnbd.params, fit.gamma_gamma.params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, nargs="*", default=[100_000, 1_000_000])
    args = parser.parse_args()
    rows = [bench(n) for n in args.members]
    print(f"{'members':>9} {'bgnbd rows':>10} {'gg rows':>8} {'to_bytes':>10} {'zlib':>10} "
          f"{'fit s':>6} {'records s':>9}")
    for row in rows:
        print(f"{row['members']:>9,} {row['bgnbd_rows']:>10,} {row['gg_rows']:>8,} "
              f"{row['bytes'] / 1e6:>8.1f}MB {row['zlib'] / 1e6:>8.1f}MB {row['fit_s']:>6.2f} "
              f"{row['records_s']:>9.3f}")
    for row in rows:
        bg, gg = row["params"]
        print(f"{row['members']:,}: bgnbd {tuple(round(float(v), 3) for v in bg)}, "
              f"gamma_gamma {tuple(round(float(v), 3) for v in gg)} (data made in {row['make_s']:.1f} s)")


if __name__ == "__main__":
    main()
