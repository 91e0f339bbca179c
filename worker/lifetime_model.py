"""Predictive customer lifetime value: the BG/NBD model of repeat purchases (Fader, Hardie & Lee 2005, "Counting Your
Customers the Easy Way") and the Gamma-Gamma model of spend per purchase (Fader, Hardie & Lee 2005, "RFM and CLV";
Hardie's note 025), both fitted by maximum likelihood with scipy and scored over numpy arrays.

The formulas are those of the `lifetimes` package (fitters/beta_geo_fitter.py, fitters/gamma_gamma_fitter.py):
- BG/NBD log-likelihood, section 7 of the paper: A1 + A2 + log(exp(A3) + [x > 0] exp(A4));
- probability alive (Hardie's note 021): 1 / (1 + [x > 0] a / (b + x - 1) ((α + T) / (α + t_x))^(r + x));
- expected purchases in (T, T + t], equation (10): (a + b + x - 1) / (a - 1)
  · [1 - ((α + T) / (α + T + t))^(r + x) ₂F₁(r + x, b + x; a + b + x - 1; t / (α + T + t))] / (1 + [x > 0] ...);
- Gamma-Gamma expected spend per purchase, note 025 equation (5): (p (v + x m̄)) / (p x + q - 1).

Inputs per customer: x = repeat purchase days, t_x = days from the first to the last purchase day, T = days from the
first purchase day to the end of the observation, m̄ = mean revenue of the repeat purchase days. Time is in days, so
α is in days (the paper's α = 4.414 is in weeks: 30.9 days).

Pure functions, CPU-bound: the job runs them in a thread, off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize
from scipy.special import digamma, expit, gammaln, hyp2f1

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# A fitted parameter outside this range means the optimiser ran off to a boundary: the data do not identify the model.
_PARAMETER_RANGE = (1e-6, 1e6)
_START = np.full(4, 0.1)  # log-parameters, as lifetimes starts


@dataclass(frozen=True)
class PurchaseParams:
    """BG/NBD: purchase rates ~ Gamma(r, α) (α per day), dropout probabilities ~ Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float


@dataclass(frozen=True)
class SpendParams:
    """Gamma-Gamma: spend per purchase ~ Gamma(p, ν), ν ~ Gamma(q, v)."""

    p: float
    q: float
    v: float


@dataclass(frozen=True)
class Fit:
    """One maximum-likelihood fit: its parameters when it converged, else why not."""

    converged: bool
    message: str
    iterations: int
    log_likelihood: float  # mean per customer at the optimum (or where it stopped)
    params: tuple[float, ...]


@dataclass(frozen=True)
class Summary:
    """Per customer with a purchase: x, t_x, T (days) and m̄. Arrays of one length."""

    frequency: FloatArray
    recency: FloatArray
    age: FloatArray
    repeat_mean: FloatArray


@dataclass(frozen=True)
class Scores:
    probability_alive: FloatArray
    expected_purchases: FloatArray  # in the horizon
    expected_spend: FloatArray  # per purchase
    predicted_value: FloatArray  # expected_purchases × expected_spend


# --------------------------------------------------------------------------------------------------
# BG/NBD
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PurchaseData:
    """The BG/NBD likelihood's inputs: distinct (x, t_x, T) patterns with their counts, and the distinct x values
    (the gamma-function terms depend on x alone, so they are computed once per distinct x and looked up)."""

    x: FloatArray
    t_x: FloatArray
    big_t: FloatArray
    weights: FloatArray
    distinct_x: FloatArray
    x_index: IntArray


def _bgnbd_negative_ll(log_params: FloatArray, data: _PurchaseData) -> tuple[float, FloatArray]:
    """Mean negative log-likelihood per customer and its gradient in the log-parameters."""
    r, alpha, a, b = np.exp(log_params)
    x, t_x, big_t, ux, at = data.x, data.t_x, data.big_t, data.distinct_x, data.x_index
    repeat = x > 0
    a1 = (gammaln(r + ux) - gammaln(r) + r * np.log(alpha))[at]
    a2 = (gammaln(a + b) + gammaln(b + ux) - gammaln(b) - gammaln(a + b + ux))[at]
    log_alpha_t, log_alpha_tx = np.log(alpha + big_t), np.log(alpha + t_x)
    a3 = -(r + x) * log_alpha_t
    a4 = np.where(repeat, (np.log(a) - np.log(b + np.maximum(ux, 1) - 1))[at] - (r + x) * log_alpha_tx, -np.inf)
    top = np.maximum(a3, a4)
    e3, e4 = np.exp(a3 - top), np.exp(a4 - top)
    ll = a1 + a2 + np.log(e3 + e4) + top
    w3 = e3 / (e3 + e4)  # the share of each branch in the likelihood, for the gradient
    w4 = 1.0 - w3
    d_r = (digamma(r + ux) - digamma(r) + np.log(alpha))[at] - w3 * log_alpha_t - w4 * log_alpha_tx
    d_alpha = r / alpha - (r + x) * (w3 / (alpha + big_t) + w4 / (alpha + t_x))
    d_a = (digamma(a + b) - digamma(a + b + ux))[at] + w4 / a
    d_b = (digamma(a + b) + digamma(b + ux) - digamma(b) - digamma(a + b + ux))[at] - np.where(
        repeat, w4 / (b + np.maximum(x, 1) - 1), 0.0
    )
    w = data.weights
    total = w.sum()
    grad = np.array([np.dot(w, d) for d in (d_r, d_alpha, d_a, d_b)]) * np.exp(log_params)
    return -float(np.dot(w, ll)) / total, -grad / total


def _purchase_data(summary: Summary, scale: float) -> _PurchaseData:
    """Customers with the same (x, t_x, T) have the same likelihood: each pattern once, weighted by its count (as
    Fader and Hardie condense the data). Whole days make patterns repeat. Times are multiplied by `scale`."""
    key = _day_key(summary.frequency, summary.recency, summary.age)
    unique, counts = np.unique(key, return_counts=True)
    mask = (1 << 21) - 1
    x = (unique >> 42).astype(np.float64)
    distinct_x, x_index = np.unique(x, return_inverse=True)
    t_x = ((unique >> 21) & mask).astype(np.float64) * scale
    big_t = (unique & mask).astype(np.float64) * scale
    return _PurchaseData(x, t_x, big_t, counts.astype(np.float64), distinct_x, x_index.reshape(-1))


def _day_key(*columns: FloatArray) -> IntArray:
    """Whole-day columns (each under 2^21) packed into one int64, for np.unique."""
    key = np.zeros(len(columns[0]), dtype=np.int64)
    for column in columns:
        key = (key << 21) | column.astype(np.int64)
    return key


def fit_purchases(summary: Summary, *, max_iterations: int = 500) -> Fit:
    """BG/NBD by maximum likelihood over every customer. Time is scaled so that the oldest customer's T is 1 (as
    lifetimes does, for the optimiser's sake), then α and the log-likelihood are scaled back to days."""
    if not _whole_days(summary):
        raise ValueError("frequency, recency and age must be whole days under 2^21")
    if summary.age.size == 0 or not np.any(summary.frequency > 0):
        return Fit(False, "no repeat purchases to fit", 0, float("nan"), ())
    scale = 1.0 / max(float(summary.age.max()), 1.0)
    data = _purchase_data(summary, scale)
    result = _minimize(_bgnbd_negative_ll, _START, data, max_iterations)
    r, alpha, a, b = np.exp(result.x)
    # scaling t_x, T and α by s multiplies each customer's likelihood by s^-x
    unscaled = -float(result.fun) + float(np.mean(summary.frequency)) * np.log(scale)
    return _fit_of(result, unscaled, (float(r), float(alpha / scale), float(a), float(b)))


def _whole_days(summary: Summary) -> bool:
    columns = (summary.frequency, summary.recency, summary.age)
    return all(bool(np.all((c >= 0) & (c < 1 << 21) & (c == np.floor(c)))) for c in columns)


def probability_alive(params: PurchaseParams, summary: Summary) -> FloatArray:
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    x, t_x, big_t = summary.frequency, summary.recency, summary.age
    log_odds_dead = (r + x) * np.log((alpha + big_t) / (alpha + t_x)) + np.log(a / (b + np.maximum(x, 1) - 1))
    alive: FloatArray = np.where(x == 0, 1.0, expit(-log_odds_dead))
    return alive


def expected_purchases(params: PurchaseParams, summary: Summary, horizon: float) -> FloatArray:
    """Expected repeat purchases in the next `horizon` days, equation (10). ₂F₁ depends on x and T only, so it is
    computed once per distinct (x, T)."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    x, t_x, big_t = summary.frequency, summary.recency, summary.age
    pairs, inverse = np.unique(_day_key(x, big_t), return_inverse=True)
    mask = (1 << 21) - 1
    hyp = _log_hyp2f1(params, (pairs >> 21).astype(np.float64), (pairs & mask).astype(np.float64), horizon)
    hyp = hyp[inverse.reshape(-1)]
    first = (a + b + x - 1) / (a - 1)
    second = 1 - np.exp(hyp + (r + x) * np.log((alpha + big_t) / (alpha + big_t + horizon)))
    denominator = 1 + (x > 0) * (a / (b + np.maximum(x, 1) - 1)) * ((alpha + big_t) / (alpha + t_x)) ** (r + x)
    expected: FloatArray = first * second / denominator
    return expected


def _log_hyp2f1(params: PurchaseParams, x: FloatArray, big_t: FloatArray, horizon: float) -> FloatArray:
    """log ₂F₁(r + x, b + x; a + b + x - 1; z) with z = t / (α + T + t); where it overflows, Euler's transformation
    ₂F₁(a, b; c; z) = (1 - z)^(c - a - b) ₂F₁(c - a, c - b; c; z), as lifetimes does."""
    upper_a, upper_b, lower_c = params.r + x, params.b + x, params.a + params.b + x - 1
    z = horizon / (params.alpha + big_t + horizon)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        direct = np.log(hyp2f1(upper_a, upper_b, lower_c, z))
        euler = np.log(hyp2f1(lower_c - upper_a, lower_c - upper_b, lower_c, z)) + (
            lower_c - upper_a - upper_b
        ) * np.log1p(-z)
    value: FloatArray = np.where(np.isfinite(direct), direct, euler)
    return value


# --------------------------------------------------------------------------------------------------
# Gamma-Gamma
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SpendData:
    """The Gamma-Gamma likelihood's inputs, with the terms that do not depend on the parameters computed once."""

    x: FloatArray
    m: FloatArray
    log_m: FloatArray
    log_x: FloatArray
    distinct_x: FloatArray
    x_index: IntArray


def _gamma_gamma_negative_ll(log_params: FloatArray, data: _SpendData) -> tuple[float, FloatArray]:
    p, q, v = np.exp(log_params)
    x, ux, at = data.x, data.distinct_x, data.x_index
    px = p * x
    log_xm_v = np.log(x * data.m + v)
    ll = (gammaln(p * ux + q) - gammaln(p * ux) - gammaln(q))[at] + q * np.log(v) + (px - 1) * data.log_m
    ll += px * data.log_x - (px + q) * log_xm_v
    d_p = x * ((digamma(p * ux + q) - digamma(p * ux))[at] + data.log_m + data.log_x - log_xm_v)
    d_q = (digamma(p * ux + q) - digamma(q))[at] + np.log(v) - log_xm_v
    d_v = q / v - (px + q) / (x * data.m + v)
    n = x.size
    grad = np.array([d_p.sum(), d_q.sum(), d_v.sum()]) * np.exp(log_params)
    return -float(ll.sum()) / n, -grad / n


def fit_spend(summary: Summary, *, max_iterations: int = 500) -> Fit:
    """Gamma-Gamma by maximum likelihood over the customers with repeat purchases of positive value (the model's
    m̄ is a mean of purchases after the first). Spend is scaled to a mean of 1 for the optimiser (the scale lives
    in v alone), then v and the log-likelihood are scaled back. Needs q > 1 for a finite mean spend."""
    used = (summary.frequency > 0) & (summary.repeat_mean > 0)
    if not np.any(used):
        return Fit(False, "no repeat purchases with a positive value to fit", 0, float("nan"), ())
    x = summary.frequency[used]
    scale = 1.0 / float(summary.repeat_mean[used].mean())
    m = summary.repeat_mean[used] * scale
    distinct_x, x_index = np.unique(x, return_inverse=True)
    data = _SpendData(x, m, np.log(m), np.log(x), distinct_x, x_index.reshape(-1))
    result = _minimize(_gamma_gamma_negative_ll, _START[:3], data, max_iterations)
    p, q, v = np.exp(result.x)
    # scaling every m̄ and v by k multiplies each customer's likelihood by 1/k
    fit = _fit_of(result, -float(result.fun) + float(np.log(scale)), (float(p), float(q), float(v / scale)))
    if fit.converged and q <= 1:
        return Fit(
            False, f"q = {q:.4g} ≤ 1: the mean spend per purchase is not finite", fit.iterations, fit.log_likelihood, ()
        )
    return fit


def expected_spend(params: SpendParams, summary: Summary) -> FloatArray:
    """E[spend per purchase | x, m̄]: a mix of the customer's own mean and the population's, p v / (q - 1)."""
    p, q, v = params.p, params.q, params.v
    x, m = summary.frequency, summary.repeat_mean
    spend: FloatArray = p * (v + x * m) / (p * x + q - 1)
    return spend


# --------------------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------------------


def sample(summary: Summary, size: int, keys: IntArray) -> Summary:
    """At most `size` customers to fit on, chosen by a hash of their key (the customer id): the same customers from one
    run to the next while they are there, whatever order the rows came in, so that a second run on the same data
    fits the very same parameters. Kept in the order of `summary`. The likelihood of 100,000 customers pins the
    parameters down far more tightly than they move from one day to the next, at a fraction of the cost."""
    if summary.age.size <= size:
        return summary
    hashed = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing, modulo 2^64: a bijection
    chosen = np.sort(np.argpartition(hashed, size)[:size])
    return Summary(summary.frequency[chosen], summary.recency[chosen], summary.age[chosen], summary.repeat_mean[chosen])


def score(purchases: PurchaseParams, spend: SpendParams, summary: Summary, horizon: float) -> Scores:
    alive = probability_alive(purchases, summary)
    count = expected_purchases(purchases, summary, horizon)
    per_purchase = expected_spend(spend, summary)
    return Scores(alive, count, per_purchase, count * per_purchase)


def _minimize(objective: Any, start: FloatArray, data: Any, max_iterations: int) -> Any:
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return minimize(
            objective, start, args=(data,), jac=True, method="L-BFGS-B", options={"maxiter": max_iterations}
        )


def _fit_of(result: Any, ll: float, params: tuple[float, ...]) -> Fit:
    """The fit's record; `ll` is the mean log-likelihood on the data's own scale."""
    iterations = int(result.nit)
    if not result.success:
        return Fit(False, f"did not converge: {result.message}", iterations, ll, params)
    low, high = _PARAMETER_RANGE
    if not all(np.isfinite(value) and low <= value <= high for value in params):
        shown = ", ".join(f"{value:.4g}" for value in params)
        return Fit(False, f"parameters ({shown}) ran off to a boundary of the model", iterations, ll, params)
    return Fit(True, "converged", iterations, ll, params)
