"""Predictive CLV (SPEC 4.4): per-member inputs, BG/NBD and Gamma-Gamma fitted by maximum likelihood.

Pure maths on numpy and scipy; nothing here knows about streams, partitions or storage.

- :func:`member_inputs` turns a member's purchase days into the models' inputs (x, t_x, T, m_x).
- BG/NBD (Fader, Hardie & Lee 2005, "Counting your customers the easy way"): :func:`fit_bgnbd`,
  :func:`p_alive`, :func:`expected_purchases` (the conditional expectation, eq. (10)).
- Gamma-Gamma (Fader, Hardie & Lee 2005, "RFM and CLV: using iso-value curves"):
  :func:`fit_gamma_gamma`, :func:`expected_spend`.
- :class:`SufficientStats`: members grouped by their inputs, with counts. It is what a partition
  keeps and what the exporter merges and fits; a fit on it equals a fit over all its members.

The fits maximise the log-likelihood over log-parameters with L-BFGS-B and an analytic gradient,
then polish with Newton steps on a finite-difference Hessian of that gradient, so that parameters
land within the SPEC's 1e-3 relative of the true maximum (far inside it in practice). The fits
take distinct rows with member counts, and compute each term once per distinct value of the
columns it depends on, which keeps a refit at 1M members within seconds.

scipy is used directly rather than the ``lifetimes`` or PyMC-Marketing libraries: each model is
one closed-form likelihood of a few lines, while those libraries would bring pandas, autograd and
dill, or a probabilistic-programming stack, into the exporter.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import orjson
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, special

__all__ = [
    "DAY_MS",
    "UNCLAMPED_DAY",
    "utc_day",
    "as_of_day",
    "purchase_days_of",
    "MemberKey",
    "member_key",
    "member_inputs",
    "BgNbdParams",
    "GammaGammaParams",
    "BgNbdFit",
    "GammaGammaFit",
    "ClvFit",
    "bgnbd_log_likelihood",
    "fit_bgnbd",
    "p_alive",
    "expected_purchases",
    "gamma_gamma_log_likelihood",
    "fit_gamma_gamma",
    "expected_spend",
    "SufficientStats",
]

DAY_MS = 86_400_000
#: An as-of day after every purchase day: member keys made with it are not clamped (the fit
#: clamps, as of its own day).
UNCLAMPED_DAY = 10**9

Floats = NDArray[np.float64]
#: A mean negative log-likelihood over log-parameters, returning its value and gradient.
Objective = Callable[[Floats], tuple[float, Floats]]

#: The optimiser keeps log-parameters in [-LOG_BOUND, LOG_BOUND].
LOG_BOUND = 25.0
#: Fits run on data scaled to a mean T (BG/NBD) or m_x (Gamma-Gamma) of 1, where every parameter
#: of an interior maximum lies well within [e^-LIMIT_LOG, e^LIMIT_LOG]. A parameter beyond that
#: is running off to 0 or infinity along a ridge where the likelihood keeps rising (too little
#: or degenerate data): the fit then reports ``converged=False``.
LIMIT_LOG = 10.0


# --- per-member inputs ------------------------------------------------------------------------


def utc_day(ts_ms: int) -> int:
    """The UTC day number (days since 1970-01-01) of an epoch-ms timestamp."""
    return ts_ms // DAY_MS


def as_of_day(bucket: int, bucket_ms: int) -> int:
    """dK: the UTC day of the last instant of bucket ``bucket``."""
    return utc_day((bucket + 1) * bucket_ms - 1)


def purchase_days_of(purchases: Iterable[tuple[int, float]]) -> dict[int, float]:
    """Group (ts_ms, amount) purchases by UTC day: day number -> total amount of that day.

    Totals are exactly rounded sums (``math.fsum``), so they do not depend on arrival order.
    """
    amounts: dict[int, list[float]] = defaultdict(list)
    for ts_ms, amount in purchases:
        amounts[utc_day(ts_ms)].append(amount)
    return {day: math.fsum(values) for day, values in amounts.items()}


class MemberKey(NamedTuple):
    """A member's CLV inputs in whole UTC days, independent of the time unit and of dK.

    ``x`` repeat purchase days, ``first_day`` d0, ``last_day`` dl, ``m_x`` the mean repeat-day
    total (0 when x = 0). With dK and the unit u, t_x = (dl - d0) / u and T = (dK - d0) / u. The key
    stays valid as dK advances, except for a member with purchase days after the dK it was made
    with (those days were counted as dK): such a member is re-keyed when dK moves.
    """

    x: int
    first_day: int
    last_day: int
    m_x: float

    def inputs(self, as_of: int, unit_days: float) -> tuple[int, float, float, float]:
        """(x, t_x, T, m_x) as of day dK = ``as_of`` in units of ``unit_days`` days."""
        if as_of < self.last_day:
            raise ValueError(f"as-of day {as_of} is before the member's last purchase day {self.last_day}; "
                             "fit as of a day on or after every member's last purchase")
        return (self.x, (self.last_day - self.first_day) / unit_days, (as_of - self.first_day) / unit_days,
                self.m_x)


def member_key(purchase_days: Mapping[int, float], as_of: int) -> MemberKey:
    """The :class:`MemberKey` of a member with purchase totals by UTC day, as of day dK.

    Days after dK count as dK (their totals are added to dK's). Raises ValueError for a member
    without a purchase: such a member has no CLV inputs.
    """
    if not purchase_days:
        raise ValueError("a member without a purchase has no CLV inputs; skip members with no purchase day")
    totals: dict[int, list[float]] = defaultdict(list)
    for day, total in purchase_days.items():
        totals[min(day, as_of)].append(total)
    days = sorted(totals)
    x = len(days) - 1
    m_x = math.fsum(total for day in days[1:] for total in totals[day]) / x if x else 0.0
    return MemberKey(x, days[0], days[-1], m_x)


def member_inputs(purchase_days: Mapping[int, float], dK: int,
                  unit_days: float) -> tuple[int, float, float, float]:
    """(x, t_x, T, m_x) of SPEC 4.4 for a member with purchase totals by UTC day, as of day dK.

    x = distinct purchase days - 1; t_x = (dl - d0) / u; T = (dK - d0) / u with u = ``unit_days``;
    m_x = mean over repeat days (all but the first) of the day's total, 0 when x = 0. Days after
    dK count as dK.
    """
    return member_key(purchase_days, dK).inputs(dK, unit_days)


# --- parameters and fit results ----------------------------------------------------------------


class BgNbdParams(NamedTuple):
    """BG/NBD: purchase rate ~ Gamma(r, alpha); dropout probability after a purchase ~ Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float


class GammaGammaParams(NamedTuple):
    """Gamma-Gamma: spend per purchase ~ Gamma(p, nu) with nu ~ Gamma(q, gamma)."""

    p: float
    q: float
    gamma: float


@dataclass(frozen=True)
class BgNbdFit:
    """A maximum-likelihood BG/NBD fit: parameters, maximised log-likelihood, members fitted.

    ``converged`` is True at an interior maximum with a vanishing gradient; False when the
    optimiser failed or the likelihood keeps rising as a parameter runs off to 0 or infinity
    (too little or degenerate data; see LIMIT_LOG): the parameters then are a point far along
    that ridge, and only the log-likelihood is well defined.
    """

    params: BgNbdParams
    ll: float
    members: int
    converged: bool


@dataclass(frozen=True)
class GammaGammaFit:
    """A maximum-likelihood Gamma-Gamma fit: parameters, maximised log-likelihood, members fitted.

    ``converged`` as for :class:`BgNbdFit`. For example, when spend does not vary between
    members beyond chance, the likelihood rises towards q, gamma -> infinity with gamma / q
    fixed, and when it does not vary within a member, towards p -> infinity.
    """

    params: GammaGammaParams
    ll: float
    members: int
    converged: bool


@dataclass(frozen=True)
class ClvFit:
    """Both fits of one refit; a model is None when it has no member to fit."""

    bgnbd: BgNbdFit | None
    gamma_gamma: GammaGammaFit | None


# --- array helpers -----------------------------------------------------------------------------


def _floats(*arrays: ArrayLike) -> list[Floats]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _flat(*arrays: ArrayLike) -> tuple[list[Floats], tuple[int, ...]]:
    """The arrays broadcast together and flattened, and their common shape."""
    broadcast = np.broadcast_arrays(*_floats(*arrays))
    return [a.ravel() for a in broadcast], broadcast[0].shape


def _weights(weights: ArrayLike | None, size: int) -> Floats:
    if weights is None:
        return np.ones(size)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (size,):
        raise ValueError(f"weights must have one entry per row ({size}), got shape {w.shape}")
    if np.any(w < 0):
        raise ValueError("weights are member counts and must be >= 0")
    return w


def _dot(a: Floats, b: Floats) -> float:
    """Sum of a * b. numpy's pairwise sum rather than BLAS: the same result whatever the thread
    count, and no BLAS threads contending with the rest of the process."""
    return float(np.sum(a * b))


def _result(values: Floats) -> Floats | float:
    return float(values) if values.ndim == 0 else values


class _Index(NamedTuple):
    """Distinct values of a column and, per row, the index of its value among them."""

    values: Floats
    of_row: NDArray[np.intp]
    weight: Floats  # total row weight per distinct value

    @classmethod
    def of(cls, column: Floats, weights: Floats) -> _Index:
        values, of_row = np.unique(column, return_inverse=True)
        return cls(values, of_row, np.bincount(of_row, weights=weights, minlength=len(values)))


# --- BG/NBD --------------------------------------------------------------------------------------


def _check_bgnbd_rows(x: Floats, t_x: Floats, T: Floats) -> None:
    if not (x.shape == t_x.shape == T.shape and x.ndim == 1):
        raise ValueError("x, t_x and T must be 1-d arrays of the same length (one row per member or group)")
    if np.any(x < 0) or np.any(x != np.floor(x)):
        raise ValueError("x (repeat purchase days) must be a whole number >= 0")
    if np.any(t_x < 0) or np.any(T < t_x) or np.any((x == 0) & (t_x != 0)):
        raise ValueError("need 0 <= t_x <= T, and t_x = 0 when x = 0: compute the inputs with member_inputs")


class _BgNbdData:
    """Rows (x, t_x, T) with weights, factored so that a likelihood evaluation does per-row work
    only for terms of more than one column: terms of x alone are computed per distinct x, terms
    of T or t_x alone per distinct T or t_x."""

    def __init__(self, x: Floats, t_x: Floats, T: Floats, w: Floats) -> None:
        self.x, self.w = x, w
        self.total = float(w.sum())
        self.xs = _Index.of(x, w)
        self.ts = _Index.of(t_x, w)
        self.Ts = _Index.of(T, w)

    def neg_ll_and_grad(self, theta: Floats) -> tuple[float, Floats]:
        """Minus the mean log-likelihood and its gradient in log-parameters."""
        params = np.exp(theta)
        ll, grad = self._ll_and_grad(params)
        return -ll / self.total, -grad * params / self.total

    def row_ll(self, params: BgNbdParams) -> Floats:
        """Log-likelihood of each row."""
        return self._rows(np.asarray(params, dtype=np.float64))[0]

    def _rows(self, params: Floats) -> tuple[Floats, Floats, Floats]:
        """Per row, the log-likelihood and the posterior weight of the dropout branch; per
        distinct x, 1 / (b + x - 1) (0 for x = 0)."""
        r, alpha, a, b = params
        ux, ix, _ = self.xs
        ln = special.gammaln
        # per distinct x: log[Gamma(r+x)/Gamma(r) alpha^r] + log[B(a, b+x)/B(a, b)]
        head_x = ln(r + ux) - ln(r) + r * math.log(alpha) + ln(a + b) + ln(b + ux) - ln(b) - ln(a + b + ux)
        with np.errstate(divide="ignore"):
            inv_bx1_x = np.where(ux > 0, 1.0 / np.where(ux > 0, b + ux - 1.0, 1.0), 0.0)
            # log[a / (b+x-1)] for x > 0: the "dropped out right after the last purchase" branch
            log_branch_x = np.where(ux > 0, math.log(a) + np.log(inv_bx1_x), -np.inf)
        rx = r + self.x
        alive = -rx * np.log(alpha + self.Ts.values)[self.Ts.of_row]
        dropped = log_branch_x[ix] - rx * np.log(alpha + self.ts.values)[self.ts.of_row]
        top = np.maximum(alive, dropped)
        e_alive, e_dropped = np.exp(alive - top), np.exp(dropped - top)
        branches = e_alive + e_dropped
        return head_x[ix] + top + np.log(branches), e_dropped / branches, inv_bx1_x

    def _ll_and_grad(self, params: Floats) -> tuple[float, Floats]:
        r, alpha, a, b = params
        ux, ix, wx = self.xs
        dg = special.digamma
        row_ll, w_dropped, inv_bx1_x = self._rows(params)
        w = self.w
        wd = w * w_dropped  # members' weight on the dropout branch (0 when x = 0)
        wa = w - wd
        log_aT, inv_aT = (f(alpha + self.Ts.values)[self.Ts.of_row] for f in (np.log, np.reciprocal))
        log_at, inv_at = (f(alpha + self.ts.values)[self.ts.of_row] for f in (np.log, np.reciprocal))
        rx = r + self.x
        d_r = (_dot(wx, dg(r + ux) - dg(r)) + self.total * math.log(alpha)
               - _dot(wa, log_aT) - _dot(wd, log_at))
        d_alpha = self.total * r / alpha - _dot(rx, wa * inv_aT + wd * inv_at)
        d_a = _dot(wx, dg(a + b) - dg(a + b + ux)) + float(wd.sum()) / a
        d_b = _dot(wx, dg(a + b) + dg(b + ux) - dg(b) - dg(a + b + ux)) - _dot(wd, inv_bx1_x[ix])
        return _dot(w, row_ll), np.array([d_r, d_alpha, d_a, d_b])


def bgnbd_log_likelihood(params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> Floats | float:
    """The BG/NBD log-likelihood of each member (Fader, Hardie & Lee 2005)."""
    (x, t_x, T), shape = _flat(x, t_x, T)
    _check_bgnbd_rows(x, t_x, T)
    return _result(_BgNbdData(x, t_x, T, np.ones(len(x))).row_ll(params).reshape(shape))


def _maximise(neg_ll_and_grad: Objective, starts: Iterable[Floats]) -> tuple[Floats, bool]:
    """Minimise a mean negative log-likelihood over log-parameters; return the best point and
    whether it is an interior optimum with a vanishing gradient."""
    bounds = optimize.Bounds(-LOG_BOUND, LOG_BOUND)
    best: optimize.OptimizeResult | None = None
    for start in starts:
        res = optimize.minimize(neg_ll_and_grad, start, jac=True, method="L-BFGS-B", bounds=bounds,
                                options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        # a restart drops L-BFGS's curvature memory, which can stall on long flat ridges
        res = optimize.minimize(neg_ll_and_grad, res.x, jac=True, method="L-BFGS-B", bounds=bounds,
                                options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        if best is None or res.fun < best.fun or not np.isfinite(best.fun):
            best = res
    assert best is not None
    theta = _newton_polish(neg_ll_and_grad, best.x)
    _, grad = neg_ll_and_grad(theta)
    interior = bool(np.all(np.abs(theta) < LIMIT_LOG))
    return theta, interior and bool(np.all(np.isfinite(theta))) and float(np.max(np.abs(grad))) < 1e-6


def _newton_polish(neg_ll_and_grad: Objective, theta: Floats, steps: int = 8) -> Floats:
    """Newton steps with a central-difference Hessian of the analytic gradient, each kept only if
    it lowers the objective (so the polish can never make a fit worse)."""
    value, grad = neg_ll_and_grad(theta)
    h = 1e-5
    for _ in range(steps):
        if float(np.max(np.abs(grad))) < 1e-13:
            break
        eye = np.eye(len(theta)) * h
        hess = np.array([(neg_ll_and_grad(theta + e)[1] - neg_ll_and_grad(theta - e)[1]) / (2 * h)
                         for e in eye])
        hess = (hess + hess.T) / 2
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(step)) or np.any(np.linalg.eigvalsh(hess) <= 0):
            break
        candidate = np.clip(theta - step, -LOG_BOUND, LOG_BOUND)
        new_value, new_grad = neg_ll_and_grad(candidate)
        if not new_value <= value:
            break
        theta, value, grad = candidate, new_value, new_grad
    return theta


def fit_bgnbd(x: ArrayLike, t_x: ArrayLike, T: ArrayLike, weights: ArrayLike | None = None) -> BgNbdFit:
    """Fit (r, alpha, a, b) by maximum likelihood over members, or over distinct rows with
    ``weights`` = how many members have each row. ``ll`` is the summed log-likelihood."""
    x, t_x, T = _floats(x, t_x, T)
    _check_bgnbd_rows(x, t_x, T)
    w = _weights(weights, len(x))
    keep = w > 0
    x, t_x, T, w = x[keep], t_x[keep], T[keep], w[keep]
    if not len(w):
        raise ValueError("BG/NBD needs at least one member with a purchase")
    # alpha is a time scale: fit in units of the mean T, where alpha = 1 is a natural start;
    # the likelihood in those units is the original times scale^x per member
    scale = float(np.average(T, weights=w)) or 1.0
    data = _BgNbdData(x, t_x / scale, T / scale, w)
    theta, converged = _maximise(data.neg_ll_and_grad, [np.zeros(4), np.array([-1.0, -1.0, 0.5, 1.0])])
    r, alpha, a, b = (float(v) for v in np.exp(theta))
    ll = _dot(data.w, data.row_ll(BgNbdParams(r, alpha, a, b))) - math.log(scale) * _dot(w, x)
    return BgNbdFit(BgNbdParams(r, alpha * scale, a, b), ll, int(round(data.total)), converged)


def _alive_odds(params: BgNbdParams, x: Floats, t_x: Floats, T: Floats) -> Floats:
    """1 + delta(x>0) a/(b+x-1) ((alpha+T)/(alpha+t_x))^(r+x): 1 / P(alive)."""
    r, alpha, a, b = params
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_ratio = np.log(a) - np.log(b + x - 1) + (r + x) * (np.log(alpha + T) - np.log(alpha + t_x))
        return 1.0 + np.where(x > 0, np.exp(log_ratio), 0.0)


def p_alive(params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> Floats | float:
    """P(alive | x, t_x, T): the probability that a member has not dropped out by T."""
    x, t_x, T = _floats(x, t_x, T)
    return _result(1.0 / _alive_odds(params, x, t_x, T))


def expected_purchases(params: BgNbdParams, t: float, x: ArrayLike, t_x: ArrayLike,
                       T: ArrayLike) -> Floats | float:
    """E[X(t) | x, t_x, T]: expected purchase days in the next ``t`` time units (eq. (10)).

    Eq. (10) holds ((alpha+T)/(alpha+T+t))^(r+x) 2F1(r+x, b+x; a+b+x-1; z), whose two factors
    under- and overflow for heavy buyers; Euler's transformation turns it into
    ((alpha+T)/(alpha+T+t))^(a-1) 2F1(a+b-1-r, a-1; a+b+x-1; z), which stays finite.
    Undefined at a = 1 exactly (the closed form divides by a - 1).
    """
    r, alpha, a, b = params
    x, t_x, T = _floats(x, t_x, T)
    z = t / (alpha + T + t)
    hyp = special.hyp2f1(a + b - 1.0 - r, a - 1.0, a + b + x - 1.0, z)
    shrink = np.exp((a - 1.0) * (np.log(alpha + T) - np.log(alpha + T + t)))
    value = (a + b + x - 1.0) / (a - 1.0) * (1.0 - shrink * hyp)
    return _result(value / _alive_odds(params, x, t_x, T))


# --- Gamma-Gamma -------------------------------------------------------------------------------


def _check_gamma_gamma_rows(x: Floats, m_x: Floats) -> None:
    if not (x.shape == m_x.shape and x.ndim == 1):
        raise ValueError("x and m_x must be 1-d arrays of the same length (one row per member or group)")
    if np.any(x < 1) or np.any(m_x <= 0) or np.any(x != np.floor(x)):
        raise ValueError("Gamma-Gamma is fitted over members with x >= 1 and m_x > 0: filter them first")


class _GammaGammaData:
    """Rows (x, m_x) with weights; per evaluation only log(gamma + m_x x) is computed per row, the
    lgamma/digamma terms per distinct x."""

    def __init__(self, x: Floats, m_x: Floats, w: Floats) -> None:
        self.x, self.w = x, w
        self.total = float(w.sum())
        self.xs = _Index.of(x, w)
        self.spend = m_x * x  # the repeat days' total
        self.log_m = np.log(m_x)
        self.wx = w * x

    def neg_ll_and_grad(self, theta: Floats) -> tuple[float, Floats]:
        """Minus the mean log-likelihood and its gradient in log-parameters."""
        params = np.exp(theta)
        ll, grad = self._ll_and_grad(params)
        return -ll / self.total, -grad * params / self.total

    def row_ll(self, params: GammaGammaParams) -> Floats:
        """Log-density of each row's m_x given its x."""
        return self._rows(np.asarray(params, dtype=np.float64))[0]

    def _rows(self, params: Floats) -> tuple[Floats, Floats]:
        """Per row, the log-likelihood and log(gamma + m_x x)."""
        p, q, gamma = params
        ux, ix, _ = self.xs
        ln = special.gammaln
        head_x = ln(p * ux + q) - ln(p * ux) - ln(q) + p * ux * np.log(ux)
        px = p * self.x
        log_g = np.log(gamma + self.spend)
        return head_x[ix] + q * math.log(gamma) + (px - 1.0) * self.log_m - (px + q) * log_g, log_g

    def _ll_and_grad(self, params: Floats) -> tuple[float, Floats]:
        p, q, gamma = params
        ux, _, wx = self.xs
        dg = special.digamma
        row_ll, log_g = self._rows(params)
        w, wx_rows = self.w, self.wx
        d_p = (_dot(wx, ux * (dg(p * ux + q) - dg(p * ux) + np.log(ux)))
               + _dot(wx_rows, self.log_m - log_g))
        d_q = _dot(wx, dg(p * ux + q) - dg(q)) + self.total * math.log(gamma) - _dot(w, log_g)
        d_gamma = self.total * q / gamma - _dot(p * wx_rows + q * w, np.reciprocal(gamma + self.spend))
        return _dot(w, row_ll), np.array([d_p, d_q, d_gamma])


def gamma_gamma_log_likelihood(params: GammaGammaParams, x: ArrayLike, m_x: ArrayLike) -> Floats | float:
    """The Gamma-Gamma log-likelihood (density of m_x given x) of each member with x >= 1."""
    (x, m_x), shape = _flat(x, m_x)
    _check_gamma_gamma_rows(x, m_x)
    return _result(_GammaGammaData(x, m_x, np.ones(len(x))).row_ll(params).reshape(shape))


def fit_gamma_gamma(x: ArrayLike, m_x: ArrayLike, weights: ArrayLike | None = None) -> GammaGammaFit:
    """Fit (p, q, gamma) by maximum likelihood over members with x >= 1 and m_x > 0, or over
    distinct (x, m_x) rows with ``weights`` = how many members have each row."""
    x, m_x = _floats(x, m_x)
    _check_gamma_gamma_rows(x, m_x)
    w = _weights(weights, len(x))
    keep = w > 0
    x, m_x, w = x[keep], m_x[keep], w[keep]
    if not len(w):
        raise ValueError("Gamma-Gamma needs at least one member with x >= 1 and m_x > 0")
    # gamma is a money scale: fit in units of the mean m_x (the density of m_x in those units is
    # the original density times the scale)
    scale = float(np.average(m_x, weights=w))
    data = _GammaGammaData(x, m_x / scale, w)
    theta, converged = _maximise(data.neg_ll_and_grad, [np.zeros(3), np.array([1.0, 1.0, 1.0])])
    p, q, gamma = (float(v) for v in np.exp(theta))
    ll = _dot(data.w, data.row_ll(GammaGammaParams(p, q, gamma))) - math.log(scale) * data.total
    return GammaGammaFit(GammaGammaParams(p, q, gamma * scale), ll, int(round(data.total)), converged)


def expected_spend(params: GammaGammaParams, x: ArrayLike, m_x: ArrayLike) -> Floats | float:
    """E[M | x, m_x] = (gamma + m_x x) p / (p x + q - 1); for x = 0, p gamma / (q - 1).

    NaN where the expectation does not exist (p x + q <= 1, e.g. x = 0 with q <= 1).
    """
    p, q, gamma = params
    x, m_x = _floats(x, m_x)
    denominator = p * x + q - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(denominator > 0, (gamma + m_x * x) * p / denominator, np.nan)
    return _result(value)


# --- sufficient statistics ---------------------------------------------------------------------


class SufficientStats:
    """Members grouped by their :class:`MemberKey`, with counts: mergeable across partitions.

    ``bgnbd`` counts members by (x, d0, dl); ``gamma_gamma`` counts members with x >= 1 and
    m_x > 0 by (x, m_x). Adding and removing a key are exact inverses, so a member whose inputs
    change is moved with ``remove(old)`` then ``add(new)``. Counts never go below zero and a group
    whose count reaches zero is dropped, so equal memberships give equal statistics.
    """

    __slots__ = ("bgnbd", "gamma_gamma", "m_sums")

    def __init__(self) -> None:
        self.bgnbd: dict[tuple[int, int, int], int] = {}
        self.gamma_gamma: dict[tuple[int, float], int] = {}
        # per BG/NBD group, the sum of its members' m_x: E[M] is linear in m_x, so the sum over
        # members of E[X] * E[M] needs only this beside the groups (predicted revenue)
        self.m_sums: dict[tuple[int, int, int], float] = {}

    @classmethod
    def of(cls, keys: Iterable[MemberKey]) -> SufficientStats:
        stats = cls()
        for key in keys:
            stats.add(key)
        return stats

    def add(self, key: MemberKey, count: int = 1) -> None:
        bg_key = (key.x, key.first_day, key.last_day)
        gg_key = (key.x, key.m_x) if key.x >= 1 and key.m_x > 0 else None
        _check_count(self.bgnbd, bg_key, count)  # check both before changing either
        if gg_key is not None:
            _check_count(self.gamma_gamma, gg_key, count)
        _bump(self.bgnbd, bg_key, count)
        if gg_key is not None:
            _bump(self.gamma_gamma, gg_key, count)
        if bg_key in self.bgnbd:
            self.m_sums[bg_key] = self.m_sums.get(bg_key, 0.0) + count * key.m_x
        else:
            self.m_sums.pop(bg_key, None)

    def remove(self, key: MemberKey, count: int = 1) -> None:
        self.add(key, -count)

    def merge(self, other: SufficientStats) -> SufficientStats:
        """Add every group of ``other`` into this one (in place); return self."""
        for bg_key, count in other.bgnbd.items():
            _bump(self.bgnbd, bg_key, count)
        for gg_key, count in other.gamma_gamma.items():
            _bump(self.gamma_gamma, gg_key, count)
        for bg_key, total in other.m_sums.items():
            if bg_key in self.bgnbd:
                self.m_sums[bg_key] = self.m_sums.get(bg_key, 0.0) + total
            else:
                self.m_sums.pop(bg_key, None)
        return self

    @property
    def members(self) -> int:
        return sum(self.bgnbd.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SufficientStats):
            return NotImplemented
        return self.bgnbd == other.bgnbd and self.gamma_gamma == other.gamma_gamma

    def __repr__(self) -> str:
        return (f"SufficientStats(members={self.members}, bgnbd_rows={len(self.bgnbd)}, "
                f"gamma_gamma_rows={len(self.gamma_gamma)})")

    def to_bytes(self) -> bytes:
        """JSON ``{"bgnbd": [[x, d0, dl, n], ...], "gamma_gamma": [[x, m_x, n], ...]}``, sorted."""
        return orjson.dumps(self.to_dict())

    def to_dict(self) -> dict[str, list]:
        m_sums = self.m_sums
        return {"bgnbd": [[*k, n, m_sums.get(k, 0.0)] for k, n in sorted(self.bgnbd.items())],
                "gamma_gamma": [[*k, n] for k, n in sorted(self.gamma_gamma.items())]}

    @classmethod
    def from_bytes(cls, data: bytes) -> SufficientStats:
        return cls.from_dict(orjson.loads(data))

    @classmethod
    def from_dict(cls, obj: Mapping[str, list]) -> SufficientStats:
        stats = cls()
        for x, d0, dl, n, *m_sum in obj["bgnbd"]:
            key = (int(x), int(d0), int(dl))
            stats.bgnbd[key] = int(n)
            stats.m_sums[key] = float(m_sum[0]) if m_sum else 0.0
        stats.gamma_gamma = {(int(x), float(m)): int(n) for x, m, n in obj["gamma_gamma"]}
        return stats

    def bgnbd_rows(self, as_of: int, unit_days: float) -> tuple[Floats, ...]:
        """Distinct (x, t_x, T) rows as of day dK and their member counts."""
        if not self.bgnbd:
            empty = np.empty(0)
            return empty, empty, empty, empty
        table = np.array([(*k, n) for k, n in self.bgnbd.items()], dtype=np.int64)
        x, first, last, counts = table.T
        if int(last.max()) > as_of:
            raise ValueError(f"as-of day {as_of} is before a member's last purchase day {int(last.max())}; "
                             "fit as of a day on or after every member's last purchase")
        return (x.astype(np.float64), (last - first) / unit_days, (as_of - first) / unit_days,
                counts.astype(np.float64))

    def gamma_gamma_rows(self) -> tuple[Floats, ...]:
        """Distinct (x, m_x) rows of members with x >= 1 and m_x > 0, and their member counts."""
        if not self.gamma_gamma:
            empty = np.empty(0)
            return empty, empty, empty
        x = np.fromiter((k[0] for k in self.gamma_gamma), np.float64, len(self.gamma_gamma))
        m_x = np.fromiter((k[1] for k in self.gamma_gamma), np.float64, len(self.gamma_gamma))
        counts = np.fromiter(self.gamma_gamma.values(), np.float64, len(self.gamma_gamma))
        return x, m_x, counts

    def fit(self, as_of: int, unit_days: float) -> ClvFit:
        """Fit both models as of day dK with time unit ``unit_days`` days."""
        x, t_x, T, counts = self.bgnbd_rows(as_of, unit_days)
        bgnbd = fit_bgnbd(x, t_x, T, counts) if len(x) else None
        gx, m_x, g_counts = self.gamma_gamma_rows()
        gamma_gamma = fit_gamma_gamma(gx, m_x, g_counts) if len(gx) else None
        return ClvFit(bgnbd, gamma_gamma)


def _check_count(groups: dict, key: tuple, count: int) -> None:
    held = groups.get(key, 0)
    if held + count < 0:
        raise ValueError(f"cannot remove {-count} member(s) from group {key} holding {held}: "
                         "remove a member with the key it was added with")


def _bump(groups: dict, key: tuple, count: int) -> None:
    _check_count(groups, key, count)
    new = groups.get(key, 0) + count
    if new:
        groups[key] = new
    else:
        groups.pop(key, None)
