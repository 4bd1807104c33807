"""The predictive CLV KPIs of SPEC 4.4 from merged sufficient statistics, refit on a cadence.

A :class:`ClvModel` is held by whatever evaluates the global KPIs (replay's Processor, the live
exporter). It refits BG/NBD and Gamma-Gamma when ``[clv] refit`` has passed since the last fit
(in as-of buckets: event time in replay, wall time live) and evaluates the KPIs with the latest
parameters over the current members at every evaluation.

predicted_revenue needs, per member, E[X(t)] * E[M]; E[M] = (gamma + m_x x) p / (p x + q - 1)
is linear in m_x, so per BG/NBD group (x, d0, dl) the member count and the sum of m_x suffice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .clv import DAY_MS, ClvFit, SufficientStats, as_of_day, expected_purchases, p_alive
from .timebase import as_of_time

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["ClvModel", "member_predictions", "params_from_records"]

_BGNBD_PARAMS = ("r", "alpha", "a", "b")
_GAMMA_GAMMA_PARAMS = ("p", "q", "gamma")


class ClvModel:
    """The latest fit, and the KPI records it gives over the current statistics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.unit_days = settings.clv_unit_ms / DAY_MS
        self.refit_buckets = settings.clv_refit_ms // settings.bucket_ms  # 0: at every evaluation
        self.fit: ClvFit | None = None
        self.fit_K: int | None = None
        self.fits = 0

    def records(self, stats: SufficientStats | None, K: int) -> list[dict[str, Any]]:
        if stats is None or not stats.bgnbd:
            return []
        settings = self.settings
        # a purchase after K (wall clock skew) counts as K: the fit is then as of its day
        dK = max(as_of_day(K, settings.bucket_ms), max(key[2] for key in stats.bgnbd))
        if self.fit is None or self.fit_K is None or K - self.fit_K >= self.refit_buckets \
                or K < self.fit_K:
            self.fit = stats.fit(dK, self.unit_days)
            self.fit_K = K
            self.fits += 1
        as_of = as_of_time(K, settings.bucket_ms)
        out: list[dict[str, Any]] = []

        def add(kpi: str, window: str | None, value: float | None, labels: dict | None = None
                ) -> None:
            record = {"kpi": kpi, "window": window, "as_of": as_of,
                      "value": None if value is None or not np.isfinite(value) else float(value),
                      "numerator": None, "denominator": None}
            if labels is not None:
                record["labels"] = labels
            out.append(record)

        bgnbd, gamma_gamma = self.fit.bgnbd, self.fit.gamma_gamma
        for model, fit, names in (("bgnbd", bgnbd, _BGNBD_PARAMS),
                                  ("gamma_gamma", gamma_gamma, _GAMMA_GAMMA_PARAMS)):
            if fit is None:
                continue
            for name, value in zip(names, fit.params, strict=True):
                add("clv_param", None, value, {"model": model, "param": name})
            add("clv_param", None, fit.ll, {"model": model, "param": "ll"})
        if bgnbd is None:
            return out
        x, t_x, T, counts = stats.bgnbd_rows(dK, self.unit_days)
        m_sums = np.fromiter((stats.m_sums.get(key, 0.0) for key in stats.bgnbd), np.float64,
                             len(stats.bgnbd))
        add("expected_active_members", None, float(np.sum(counts * p_alive(bgnbd.params, x, t_x, T))))
        spend_of_row = None
        if gamma_gamma is not None:
            p, q, gamma = gamma_gamma.params
            denominator = p * x + q - 1.0
            if np.all(denominator > 0):  # E[M] exists for every member
                spend_of_row = (gamma * p * counts + p * x * m_sums) / denominator
        for w, label in settings.window_labels.items():
            horizon = w * settings.bucket_ms / DAY_MS / self.unit_days
            per_member = expected_purchases(bgnbd.params, horizon, x, t_x, T)
            add("predicted_purchases", label, float(np.sum(counts * per_member)))
            add("predicted_revenue", label,
                None if spend_of_row is None else float(np.sum(per_member * spend_of_row)))
        return out


def member_predictions(states: list[Any], as_of_bucket: int, settings: Settings,
                       bgnbd: tuple[float, float, float, float],
                       gamma_gamma: tuple[float, float, float] | None
                       ) -> list[dict[str, float] | None]:
    """Per member (None for one without a purchase): ``p_alive``, ``expected_purchases`` and
    ``expected_value`` over the longest window, from fitted parameters (vectorised over the
    members, for the read model)."""
    from .clv import UNCLAMPED_DAY, BgNbdParams, GammaGammaParams, expected_spend, member_key

    out: list[dict[str, float] | None] = [None] * len(states)
    unit_days = settings.clv_unit_ms / DAY_MS
    horizon = max(settings.windows_ms) / DAY_MS / unit_days
    dK = as_of_day(as_of_bucket, settings.bucket_ms)
    rows, index = [], []
    for i, state in enumerate(states):
        if state.purchase_days:
            key = member_key(dict(state.purchase_days), UNCLAMPED_DAY)
            rows.append(key.inputs(max(dK, key.last_day), unit_days))
            index.append(i)
    if not rows:
        return out
    x, t_x, T, m_x = (np.array(column, dtype=np.float64) for column in zip(*rows, strict=True))
    params = BgNbdParams(*bgnbd)
    alive = np.atleast_1d(p_alive(params, x, t_x, T))
    purchases = np.atleast_1d(expected_purchases(params, horizon, x, t_x, T))
    spend = (np.atleast_1d(expected_spend(GammaGammaParams(*gamma_gamma), x, m_x))
             if gamma_gamma is not None else np.full(len(rows), np.nan))
    for j, i in enumerate(index):
        prediction = {"p_alive": float(alive[j]), "expected_purchases": float(purchases[j])}
        if np.isfinite(spend[j]):
            prediction["expected_value"] = float(purchases[j] * spend[j])
        out[i] = prediction
    return out


def params_from_records(records: Any) -> tuple[tuple | None, tuple | None]:
    """(BG/NBD params, Gamma-Gamma params) from ``clv_param`` KPI records (None if incomplete)."""
    found: dict[tuple[str, str], float] = {}
    for record in records:
        if record.get("kpi") == "clv_param" and record.get("value") is not None:
            labels = record.get("labels", {})
            found[(labels.get("model"), labels.get("param"))] = record["value"]
    bgnbd = tuple(found.get(("bgnbd", name)) for name in _BGNBD_PARAMS)
    gamma_gamma = tuple(found.get(("gamma_gamma", name)) for name in _GAMMA_GAMMA_PARAMS)
    return (None if None in bgnbd else bgnbd), (None if None in gamma_gamma else gamma_gamma)
