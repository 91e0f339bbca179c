"""The shop model behind the demo data: calendar, customers, products, orders, generated in numpy chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np
import numpy.typing as npt

from db.seed.binary import _ITEM_LAYOUT, _ORDER_LAYOUT, _UNIX_EPOCH, _US_PER_DAY, _US_PER_HOUR, _RowLayout, _text_column

CHUNK_ORDERS = 100_000
"""Orders generated and copied per step (a chunk ends on an hour boundary, so sizes vary a little)."""

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


_NEVER = np.iinfo(np.int64).max // 4  # churn time of customers who never churn


# --------------------------------------------------------------------------------------------------
# Domain tables
# --------------------------------------------------------------------------------------------------

STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled", "refunded")
_STATUS_BYTES = np.array([s.encode() for s in STATUSES], dtype="S9")
_STATUS_LEN = np.array([len(s) for s in STATUSES], dtype=np.int32)

# Status mix by order age (rows: age under 2 h, 1 d, 3 d, 7 d, 30 d, older; columns: STATUSES).
_STATUS_AGE_EDGES_H = np.array([2, 24, 72, 168, 720], dtype=np.float64)
_STATUS_MIX = np.array(
    [
        [0.60, 0.35, 0.00, 0.00, 0.05, 0.00],
        [0.25, 0.50, 0.20, 0.00, 0.05, 0.00],
        [0.08, 0.17, 0.65, 0.05, 0.05, 0.00],
        [0.02, 0.03, 0.40, 0.48, 0.05, 0.02],
        [0.00, 0.00, 0.03, 0.89, 0.05, 0.03],
        [0.00, 0.00, 0.00, 0.92, 0.05, 0.03],
    ]
)
# updated_at = created_at + uniform(lo, hi) hours, by status (capped at now).
_STATUS_DELAY_H = np.array([[0, 0], [0.02, 0.5], [12, 48], [48, 168], [0.2, 24], [240, 720]], dtype=np.float64)
_REVENUE_STATUSES = np.array([s in ("paid", "shipped", "delivered") for s in STATUSES])

_ITEMS_PER_ORDER_P = np.array([0.45, 0.25, 0.15, 0.09, 0.06])  # 1..5 lines, mean ~2.06

# Month (Jan..Dec), weekday (Mon..Sun) and hour-of-day (UTC) demand factors.
_MONTH_FACTOR = np.array([0.86, 0.80, 0.92, 0.93, 0.97, 0.93, 0.91, 0.94, 0.96, 1.02, 1.30, 1.50])
_WEEKDAY_FACTOR = np.array([1.06, 1.02, 1.00, 1.00, 0.95, 0.84, 1.03])
_HOUR_FACTOR = np.array(
    [0.45, 0.30, 0.20, 0.14, 0.12, 0.15, 0.30, 0.55, 0.80, 1.00, 1.10, 1.15,
     1.25, 1.20, 1.10, 1.05, 1.05, 1.10, 1.25, 1.45, 1.60, 1.50, 1.15, 0.75]
)  # fmt: skip
_YEARLY_GROWTH = 1.25  # signups grow 25% a year

# Customer classes: share, expected-order shape, mean active lifetime in days.
_ONE_TIME, _OCCASIONAL, _LOYAL = 0, 1, 2
_CLASS_SHARE = np.array([0.42, 0.43, 0.15])
_CLASS_LIFETIME_DAYS = np.array([10.0, 240.0, 900.0])
_RETURNING_ONE_TIME_SHARE = 0.3  # one-time buyers who had signed up before the window

_COUNTRIES = (
    ("US", 34), ("GB", 10), ("DE", 9), ("FR", 7), ("CA", 6), ("AU", 4), ("NL", 3), ("ES", 3),
    ("IT", 3), ("SE", 2), ("PL", 2), ("BR", 3), ("MX", 2), ("IN", 3), ("JP", 3), ("IE", 1),
    ("BE", 1), ("CH", 1), ("AT", 1), ("DK", 1), ("NO", 1), ("NZ", 1), ("SG", 1), ("ZA", 1),
)  # fmt: skip

_FIRST_NAMES = (
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
    "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen",
    "Daniel", "Lisa", "Matthew", "Nancy", "Anthony", "Sandra", "Mark", "Ashley", "Paul", "Emily", "Steven",
    "Michelle", "Andrew", "Amanda", "Joshua", "Melissa", "Kevin", "Laura", "Brian", "Rebecca", "Oliver",
    "Emma", "Noah", "Olivia", "Liam", "Sophia", "Lucas", "Mia", "Hugo", "Chloe", "Leon", "Hannah", "Felix",
    "Lea", "Jonas", "Lena", "Mateo", "Sofia", "Luca", "Giulia", "Marco", "Chiara", "Pablo", "Lucia",
    "Diego", "Carmen", "Lars", "Ingrid", "Sven", "Astrid", "Piotr", "Anna", "Jakub", "Zofia", "Rahul",
    "Priya", "Arjun", "Ananya", "Kenji", "Yuki", "Haruto", "Sakura", "Wei", "Mei", "Chen", "Li", "Ahmed",
    "Fatima", "Omar", "Aisha", "Kwame", "Amara", "Tariq", "Leila", "Ivan", "Olga", "Mateus", "Ana",
    "Gabriel", "Beatriz", "Sean", "Siobhan", "Finn", "Niamh"
)  # fmt: skip
_LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson",
    "Martin", "Lee", "Thompson", "White", "Harris", "Clark", "Lewis", "Walker", "Young", "Allen", "King",
    "Wright", "Scott", "Green", "Baker", "Adams", "Nelson", "Hill", "Campbell", "Mitchell", "Roberts",
    "Muller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Dubois", "Moreau",
    "Laurent", "Bernard", "Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Fernandez", "Ruiz",
    "Navarro", "Torres", "Jansen", "DeVries", "Bakker", "Visser", "Andersson", "Johansson", "Nilsson",
    "Kowalski", "Nowak", "Wisniewski", "Silva", "Santos", "Oliveira", "Costa", "Sato", "Suzuki",
    "Takahashi", "Tanaka", "Wang", "Zhang", "Liu", "Patel", "Sharma", "Singh", "Kumar", "Khan", "Ali",
    "Hassan", "Murphy", "Kelly", "OBrien", "Byrne", "Walsh", "Novak", "Horvat", "Petrov", "Ivanova",
    "Okafor", "Mensah", "Nkosi"
)  # fmt: skip
_EMAIL_DOMAINS = ("example.com", "example.net", "example.org")
_BRANDS = (
    "Acme", "Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware", "Proseware", "Adatum", "Woodgrove",
    "Lumen", "Nordic", "Summit", "Evergreen", "Bluebird", "Ironclad", "Polar", "Harbor", "Cobalt",
    "Juniper", "Meridian"
)  # fmt: skip
_ADJECTIVES = (
    "Classic", "Premium", "Compact", "Deluxe", "Essential", "Smart", "Ultra", "Eco", "Pro", "Lite", "Urban",
    "Vintage", "Everyday", "Advanced", "Signature"
)  # fmt: skip


@dataclass(frozen=True)
class _Category:
    name: str
    code: str
    demand: float  # relative share of order lines
    median_price: float  # dollars
    price_sigma: float
    margin: float  # mean gross margin
    lead_time_days: int
    qty_p: float  # geometric parameter of the line quantity (1.0 = always 1)
    nouns: tuple[str, ...]


_CATEGORIES = (
    _Category("Electronics", "ELC", 1.3, 120.0, 0.8, 0.22, 14, 0.92,
              ("Headphones", "Speaker", "Smartwatch", "Charger", "Camera", "Earbuds", "Drone", "Tablet")),
    _Category("Computers", "CMP", 0.6, 450.0, 0.7, 0.15, 21, 0.95,
              ("Laptop", "Monitor", "Keyboard", "Mouse", "Docking Station", "SSD", "Router", "Webcam")),
    _Category("Home & Kitchen", "HOM", 1.4, 38.0, 0.7, 0.42, 10, 0.8,
              ("Blender", "Cookware Set", "Kettle", "Knife Set", "Toaster", "Coffee Maker", "Lamp", "Pillow")),
    _Category("Clothing", "CLO", 1.6, 32.0, 0.55, 0.55, 12, 0.7,
              ("T-Shirt", "Hoodie", "Jeans", "Jacket", "Sweater", "Dress", "Socks", "Cap")),
    _Category("Shoes", "SHO", 0.8, 75.0, 0.45, 0.48, 18, 0.9,
              ("Sneakers", "Boots", "Sandals", "Loafers", "Running Shoes", "Slippers")),
    _Category("Beauty & Personal Care", "BEA", 1.1, 18.0, 0.6, 0.60, 7, 0.6,
              ("Moisturizer", "Shampoo", "Serum", "Lipstick", "Perfume", "Razor", "Sunscreen")),
    _Category("Sports & Outdoors", "SPO", 0.9, 45.0, 0.8, 0.38, 14, 0.85,
              ("Yoga Mat", "Tent", "Backpack", "Dumbbells", "Bike Helmet", "Water Bottle", "Jersey")),
    _Category("Toys & Games", "TOY", 0.9, 25.0, 0.7, 0.45, 21, 0.8,
              ("Board Game", "Puzzle", "Building Set", "Plush Toy", "Action Figure", "RC Car")),
    _Category("Books", "BOK", 1.0, 15.0, 0.4, 0.30, 5, 0.85,
              ("Novel", "Cookbook", "Biography", "Travel Guide", "Notebook", "Comic")),
    _Category("Grocery", "GRO", 1.2, 7.0, 0.6, 0.25, 3, 0.45,
              ("Coffee Beans", "Olive Oil", "Tea", "Granola", "Chocolate", "Pasta", "Honey")),
    _Category("Garden & Outdoor", "GAR", 0.5, 42.0, 0.8, 0.40, 14, 0.75,
              ("Planter", "Hose", "Pruner", "Grill", "Seed Kit", "Lantern")),
    _Category("Pet Supplies", "PET", 0.7, 22.0, 0.7, 0.35, 7, 0.6,
              ("Dog Food", "Cat Litter", "Leash", "Pet Bed", "Chew Toy", "Aquarium Filter")),
)  # fmt: skip
CATEGORIES = tuple(c.name for c in _CATEGORIES)

_LOW_STOCK_SHARE = 0.03
_ROP_Z = 1.65  # 95% cycle service level
_DEMAND_DAYS = 28


def _to_us(moment: datetime) -> int:
    return (moment - _UNIX_EPOCH) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return _UNIX_EPOCH + timedelta(microseconds=us)


def _months_before(moment: datetime, months: int) -> datetime:
    """``moment - interval 'N months'`` the way PostgreSQL does it (day clamped to the month's end)."""
    index = moment.year * 12 + (moment.month - 1) - months
    year, month = divmod(index, 12)
    month += 1
    next_first = date(year + (month == 12), month % 12 + 1, 1)
    last_day = (next_first - timedelta(days=1)).day
    return moment.replace(year=year, month=month, day=min(moment.day, last_day))


def _calendar(us: IntArray) -> tuple[IntArray, IntArray, IntArray, IntArray, IntArray]:
    """(month 1-12, day of month, weekday Mon=0, hour of day, days since epoch) of UTC instants."""
    days = us // _US_PER_DAY
    as_day = days.astype("datetime64[D]")
    month_start = as_day.astype("datetime64[M]")
    month = month_start.astype(np.int64) % 12 + 1
    day_of_month = (as_day - month_start.astype("datetime64[D]")).astype(np.int64) + 1
    weekday = (days + 3) % 7
    hour = (us // _US_PER_HOUR) % 24
    return month, day_of_month, weekday, hour, days


def _is_black_friday(days: IntArray) -> npt.NDArray[np.bool_]:
    month, dom, weekday, _, _ = _calendar(days * _US_PER_DAY)
    black_friday: npt.NDArray[np.bool_] = (month == 11) & (weekday == 4) & (dom >= 22) & (dom <= 28)
    return black_friday


def _day_factor(days: IntArray) -> FloatArray:
    """Special days: Black Friday, Cyber Monday, the run-up to Christmas, Christmas and New Year."""
    month, dom, _, _, _ = _calendar(days * _US_PER_DAY)
    factor = np.ones(len(days))
    factor[_is_black_friday(days)] = 2.6
    factor[_is_black_friday(days - 1) | _is_black_friday(days - 2)] = 1.6  # the weekend after
    factor[_is_black_friday(days - 3)] = 2.1  # Cyber Monday
    factor[(month == 12) & (dom <= 20)] *= 1.1
    factor[(month == 12) & (dom == 24)] = 0.8
    factor[(month == 12) & (dom == 25)] = 0.55
    factor[(month == 12) & (dom == 26)] = 0.85
    factor[(month == 1) & (dom == 1)] = 0.6
    return factor


def _promo_rate(days: IntArray) -> FloatArray:
    """Share of order lines sold at a discount on each day."""
    month, _, _, _, _ = _calendar(days * _US_PER_DAY)
    rate = np.full(len(days), 0.06)
    rate[month == 12] = 0.15
    black_week = np.zeros(len(days), dtype=bool)
    for lag in range(-2, 5):
        black_week |= _is_black_friday(days - lag)
    rate[black_week] = 0.5
    return rate


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    segments: list[tuple[str, bytes, bytes]]  # (partition suffix "YYYY_MM", orders rows, order_items rows)
    orders: int
    items: int
    revenue_cents: int
    seconds: float


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


class _Generator:
    """Holds the per-run model (time grid, customers, products) and produces order chunks in time
    order. Chunk *k* uses its own random stream, so the result does not depend on thread timing."""

    def __init__(self, *, customers: int, products: int, orders: int, seed: int, start_us: int, now_us: int):
        self.n_customers, self.n_products, self.n_orders, self.seed = customers, products, orders, seed
        self.start_us, self.now_us = start_us, now_us
        self._hour_grid()
        self._products()
        self._customers()
        self._order_counts()
        self._bucket_cache: dict[int, tuple[IntArray, FloatArray]] = {}
        self.recent_units = np.zeros((max(products, 1), _DEMAND_DAYS), dtype=np.int64)

    # --- time grid ---------------------------------------------------------------------------------

    def _hour_grid(self) -> None:
        rng = _rng(self.seed, 1)
        self.grid_us = self.start_us - self.start_us % _US_PER_HOUR
        n_hours = max(1, -(-(self.now_us - self.grid_us) // _US_PER_HOUR))
        hour_start = self.grid_us + np.arange(n_hours, dtype=np.int64) * _US_PER_HOUR
        self.hour_lo = np.maximum(hour_start, self.start_us)
        self.hour_hi = np.minimum(hour_start + _US_PER_HOUR, self.now_us)
        month, _, weekday, hour, days = _calendar(hour_start)
        first_day = int(days[0])
        unique_days = np.arange(first_day, int(days[-1]) + 1, dtype=np.int64)
        day_noise = rng.lognormal(0.0, 0.08, len(unique_days))
        day_index = days - first_day
        self.hour_weight = (
            _MONTH_FACTOR[month - 1]
            * _WEEKDAY_FACTOR[weekday]
            * _HOUR_FACTOR[hour]
            * (_day_factor(unique_days) * day_noise)[day_index]
            * ((self.hour_hi - self.hour_lo) / _US_PER_HOUR)
        )
        self.weight_cum = np.concatenate([[0.0], np.cumsum(self.hour_weight)])
        self.hour_promo = _promo_rate(unique_days)[day_index]

    def _hour_of(self, us: IntArray) -> IntArray:
        return np.clip((us - self.grid_us) // _US_PER_HOUR, 0, len(self.hour_weight) - 1)

    def _sample_in_window(self, rng: np.random.Generator, weight: FloatArray, n: int) -> IntArray:
        """n instants in [start, now) distributed like the hourly `weight`."""
        cum = np.cumsum(weight)
        hours = np.minimum(np.searchsorted(cum, rng.random(n) * cum[-1], side="right"), len(cum) - 1)
        span = self.hour_hi[hours] - self.hour_lo[hours]
        offsets: IntArray = self.hour_lo[hours] + (rng.random(n) * span).astype(np.int64)
        return offsets

    # --- products ----------------------------------------------------------------------------------

    def _products(self) -> None:
        n = self.n_products
        rng = _rng(self.seed, 2)
        demand = np.array([c.demand for c in _CATEGORIES])
        category = rng.choice(len(_CATEGORIES), size=n, p=demand / demand.sum())
        if n >= len(_CATEGORIES):  # every category present
            category[: len(_CATEGORIES)] = np.arange(len(_CATEGORIES))
            rng.shuffle(category)
        median = np.array([c.median_price for c in _CATEGORIES])[category]
        sigma = np.array([c.price_sigma for c in _CATEGORIES])[category]
        dollars = np.maximum(np.floor(median * rng.lognormal(0.0, sigma)), 1.0)
        ending = rng.choice(np.array([99, 95, 49, 0]), size=n, p=[0.6, 0.15, 0.15, 0.1])
        self.price_cents = (dollars.astype(np.int64) - (ending == 0)) * 100 + np.where(ending == 0, 100, ending)
        margin = np.clip(np.array([c.margin for c in _CATEGORIES])[category] + rng.normal(0.0, 0.06, n), 0.05, 0.85)
        self.cost_cents = np.rint(self.price_cents * (1.0 - margin)).astype(np.int64)
        self.lead_time = np.maximum(
            1, np.rint(np.array([c.lead_time_days for c in _CATEGORIES])[category] * rng.uniform(0.6, 1.5, n))
        ).astype(np.int64)
        self.qty_p = np.array([c.qty_p for c in _CATEGORIES])[category]
        self.category = category
        # Zipf-like popularity, scaled by the category's share of demand.
        rank = rng.permutation(n) + 1
        popularity = rank**-0.8 * rng.lognormal(0.0, 0.3, n)
        cat_total = np.bincount(category, weights=popularity, minlength=len(_CATEGORIES))
        popularity = popularity / cat_total[category] * demand[category] if n else popularity
        self.product_cum = np.cumsum(popularity)
        self.price_drift = rng.uniform(0.0, 0.06, n)  # yearly price increase
        self.product_created_us = self.start_us - (rng.uniform(1, 730, n) * _US_PER_DAY).astype(np.int64)

    def _pick_products(self, rng: np.random.Generator, n: int) -> IntArray:
        u = rng.random(n) * self.product_cum[-1]
        picked: IntArray = np.minimum(np.searchsorted(self.product_cum, u, side="right"), self.n_products - 1)
        return picked.astype(np.int64)

    # --- customers ---------------------------------------------------------------------------------

    def _customers(self) -> None:
        n = self.n_customers
        rng = _rng(self.seed, 3)
        klass = rng.choice(3, size=n, p=_CLASS_SHARE)
        # Signed up before the window: the steady-state share T / (T + window) of each class, so the
        # active customer base (and with it the order volume) neither explodes nor dies out.
        window_days = (self.now_us - self.start_us) / _US_PER_DAY
        lifetime_days = _CLASS_LIFETIME_DAYS[klass]
        steady = lifetime_days / (lifetime_days + window_days)
        pre_share = np.where(klass == _ONE_TIME, _RETURNING_ONE_TIME_SHARE, steady)
        pre = rng.random(n) < pre_share
        if n:
            pre[0] = True  # someone is always there to buy
        signup = np.empty(n, dtype=np.int64)
        n_pre = int(pre.sum())
        # Pre-existing: up to three years before the window, at plausible hours.
        pre_days = (self.start_us // _US_PER_DAY) - 1 - rng.integers(0, 3 * 365, n_pre)
        pre_hours = rng.choice(24, size=n_pre, p=_HOUR_FACTOR / _HOUR_FACTOR.sum())
        signup[pre] = pre_days * _US_PER_DAY + pre_hours * _US_PER_HOUR + rng.integers(0, _US_PER_HOUR, n_pre)
        # New signups follow the seasonal pattern plus growth.
        years = (self.hour_lo - self.start_us) / (365.25 * _US_PER_DAY)
        signup[~pre] = self._sample_in_window(rng, self.hour_weight * _YEARLY_GROWTH**years, n - n_pre)
        # Active from signup (or the window start, or -- one-time buyers who existed before --
        # from some moment in the window) until churn.
        active = np.maximum(signup, self.start_us)
        returning = pre & (klass == _ONE_TIME)
        active[returning] = self._sample_in_window(rng, self.hour_weight, int(returning.sum()))
        lifetime = rng.exponential(_CLASS_LIFETIME_DAYS[klass]) * _US_PER_DAY + _US_PER_HOUR
        churn = active + lifetime.astype(np.int64)
        # Purchase rates: one-time buyers place one order over their (short) lifetime, occasional
        # buyers a few a year, loyal ones a Pareto tail. Customers who joined late or churned early
        # place fewer orders inside the window, so recency and frequency vary.
        per_year = 1.0 / (lifetime / (365.25 * _US_PER_DAY))
        occasional = klass == _OCCASIONAL
        loyal = klass == _LOYAL
        per_year[occasional] = rng.lognormal(np.log(4.0), 0.5, int(occasional.sum()))
        per_year[loyal] = 6.0 * np.minimum(1.0 + rng.pareto(2.0, int(loyal.sum())), 10.0)
        rate = per_year / (365.25 * 24 * self.hour_weight.mean())  # orders per unit of hour weight
        # Sort by signup: ids follow signup order; the earliest customer never churns (and buys rarely).
        order = np.argsort(signup, kind="stable")
        self.signup, self.active, self.churn = signup[order], active[order], churn[order]
        self.klass, rate = klass[order], rate[order]
        if n:
            self.active[0], self.churn[0] = self.start_us, _NEVER
            rate[0] = rate.min()
        first_hour = self._hour_of(self.active)
        last_hour = self._hour_of(np.minimum(self.churn, self.now_us - 1))
        live = self.active < self.now_us
        rate[~live] = 0.0
        # Expected orders inside the window; the repeat buyers absorb the difference to `orders`
        # (when there are fewer orders than the one-time buyers alone would place, the sampler
        # scales everyone down).
        in_window = rate * (self.weight_cum[last_hour + 1] - self.weight_cum[first_hour])
        repeat = self.klass != _ONE_TIME
        fixed, flexible = in_window[~repeat].sum(), in_window[repeat].sum()
        if flexible > 0 and self.n_orders > fixed:
            rate[repeat] *= (self.n_orders - fixed) / flexible
        self.rate = rate
        delta = np.zeros(len(self.hour_weight) + 1)
        np.add.at(delta, first_hour[live], rate[live])
        np.add.at(delta, last_hour[live] + 1, -rate[live])
        self.active_rate = np.cumsum(delta)[:-1]
        self.country = rng.choice(len(_COUNTRIES), size=n, p=self._country_p())
        self.first_name = rng.integers(0, len(_FIRST_NAMES), n)
        self.last_name = rng.integers(0, len(_LAST_NAMES), n)
        self.email_domain = rng.choice(len(_EMAIL_DOMAINS), size=n, p=[0.6, 0.25, 0.15])

    @staticmethod
    def _country_p() -> FloatArray:
        weights = np.array([w for _, w in _COUNTRIES], dtype=np.float64)
        shares: FloatArray = weights / weights.sum()
        return shares

    def _candidates(self, bucket: int) -> tuple[IntArray, FloatArray]:
        """Customers active at some instant of the week `bucket`, and their cumulative rates."""
        cached = self._bucket_cache.get(bucket)
        if cached is None:
            lo = self.grid_us + bucket * 7 * _US_PER_DAY
            hi = lo + 7 * _US_PER_DAY
            index = np.flatnonzero((self.active < hi) & (self.churn > lo) & (self.rate > 0))
            cached = (index, np.cumsum(self.rate[index]))
            self._bucket_cache = {bucket: cached}  # chunks move forward in time: keep one week
        return cached

    def _pick_customers(self, rng: np.random.Generator, when: IntArray) -> IntArray:
        """Customer index for each order instant: weighted by rate among customers active then."""
        result = np.zeros(len(when), dtype=np.int64)
        buckets = (when - self.grid_us) // (7 * _US_PER_DAY)
        edges = np.flatnonzero(np.diff(buckets)) + 1
        for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(when)], strict=True):
            index, cum = self._candidates(int(buckets[lo]))
            t = when[lo:hi]
            todo = np.arange(hi - lo)
            for _ in range(64):
                pick = index[
                    np.minimum(np.searchsorted(cum, rng.random(len(todo)) * cum[-1], side="right"), len(cum) - 1)
                ]
                ok = (self.active[pick] < t[todo]) & (self.churn[pick] > t[todo])
                result[lo + todo[ok]] = pick[ok]
                todo = todo[~ok]
                if not len(todo):
                    break
            # Whatever is left (practically never) goes to the first customer, who is always active.
        return result

    # --- orders ------------------------------------------------------------------------------------

    def _order_counts(self) -> None:
        rng = _rng(self.seed, 4)
        if self.n_orders == 0:
            self.hour_counts = np.zeros(len(self.hour_weight), dtype=np.int64)
        else:
            intensity = self.active_rate * self.hour_weight
            self.hour_counts = rng.multinomial(self.n_orders, intensity / intensity.sum()).astype(np.int64)
        cum = np.cumsum(self.hour_counts)
        if self.n_orders == 0:
            self.chunk_hours, self.order_offset, self.chunk_sizes = [], np.zeros(0, dtype=np.int64), []
            return
        # Chunks are runs of whole hours of about CHUNK_ORDERS orders.
        targets = np.arange(CHUNK_ORDERS, self.n_orders, CHUNK_ORDERS)
        ends = np.unique(np.searchsorted(cum, targets, side="left") + 1)
        bounds = np.unique(np.r_[0, ends[ends < len(cum)], len(cum)])
        self.chunk_hours = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
        self.order_offset = np.r_[0, cum][bounds[:-1]]  # id - 1 of each chunk's first order
        self.chunk_sizes = (np.r_[0, cum][bounds[1:]] - self.order_offset).tolist()

    def chunk(self, k: int) -> _Chunk:
        started = time.perf_counter()
        rng = _rng(self.seed, 100, k)
        h0, h1 = self.chunk_hours[k]
        counts = self.hour_counts[h0:h1]
        n = int(counts.sum())
        hours = np.repeat(np.arange(h0, h1), counts)
        span = self.hour_hi[hours] - self.hour_lo[hours]
        created = np.sort(self.hour_lo[hours] + (rng.random(n) * span).astype(np.int64))
        hours = self._hour_of(created)
        order_ids = int(self.order_offset[k]) + 1 + np.arange(n, dtype=np.int64)
        customer_ids = self._pick_customers(rng, created) + 1

        # Lines: 1-5 distinct products.
        lines = rng.choice(5, size=n, p=_ITEMS_PER_ORDER_P) + 1
        m = int(lines.sum())
        first_line = np.r_[0, np.cumsum(lines)[:-1]]
        owner = np.repeat(np.arange(n), lines)
        line_no = np.arange(m) - first_line[owner] + 1
        product = self._pick_products(rng, m)
        for _ in range(8):
            dup = np.zeros(m, dtype=bool)
            for lag in range(1, 5):
                dup[lag:] |= (line_no[lag:] > lag) & (product[lag:] == product[:-lag])
            if not dup.any() or self.n_products < 5:
                break
            product[dup] = self._pick_products(rng, int(dup.sum()))
        quantity = np.minimum(rng.geometric(self.qty_p[product]), 12).astype(np.int64)
        item_created = created[owner]
        item_hours = hours[owner]
        years_ago = (self.now_us - item_created) / (365.25 * _US_PER_DAY)
        factor = 1.0 - self.price_drift[product] * years_ago
        promo = rng.random(m) < self.hour_promo[item_hours]
        factor[promo] *= 1.0 - rng.choice(np.array([0.10, 0.15, 0.20, 0.25, 0.30]), size=int(promo.sum()))
        unit_cents = np.maximum(np.rint(self.price_cents[product] * factor), 1).astype(np.int64)
        total_cents = np.add.reduceat(quantity * unit_cents, first_line)

        # Status by age; updated_at follows the status.
        age_hours = (self.now_us - created) / _US_PER_HOUR
        mix = np.cumsum(_STATUS_MIX, axis=1)[np.searchsorted(_STATUS_AGE_EDGES_H, age_hours, side="right")]
        status = np.minimum((rng.random(n)[:, None] >= mix).sum(axis=1), len(STATUSES) - 1)
        delay_lo, delay_hi = _STATUS_DELAY_H[status, 0], _STATUS_DELAY_H[status, 1]
        delay = ((delay_lo + rng.random(n) * (delay_hi - delay_lo)) * _US_PER_HOUR).astype(np.int64)
        updated = np.clip(created + delay, created, np.maximum(created, self.now_us))

        # Demand of the last 28 days, for the products' reorder points.
        recent_day = (self.now_us - item_created) // _US_PER_DAY
        recent = recent_day < _DEMAND_DAYS
        if recent.any():
            np.add.at(self.recent_units, (product[recent], recent_day[recent]), quantity[recent])

        # One segment per month partition (orders are in time order, their items follow them).
        month = created.astype("datetime64[us]").astype("datetime64[M]")
        cuts = np.flatnonzero(month[1:] != month[:-1]) + 1
        item_cuts = np.r_[first_line, m]
        order_cols = [order_ids, customer_ids, _STATUS_BYTES[status], total_cents, created, updated]
        item_cols = [order_ids[owner], line_no, product + 1, quantity, unit_cents, item_created]
        status_len = _STATUS_LEN[status]
        segments = []
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, n].tolist(), strict=True):
            ilo, ihi = int(item_cuts[lo]), int(item_cuts[hi])
            suffix = str(month[lo]).replace("-", "_")
            orders_body = _ORDER_LAYOUT.encode([c[lo:hi] for c in order_cols], {2: status_len[lo:hi]})
            items_body = _ITEM_LAYOUT.encode([c[ilo:ihi] for c in item_cols])
            segments.append((suffix, orders_body, items_body))
        revenue = int(total_cents[_REVENUE_STATUSES[status]].sum())
        return _Chunk(segments, n, m, revenue, time.perf_counter() - started)

    # --- customer and product rows -----------------------------------------------------------------

    def customers_body(self) -> bytes:
        n = self.n_customers
        first = [_FIRST_NAMES[i] for i in self.first_name.tolist()]
        last = [_LAST_NAMES[i] for i in self.last_name.tolist()]
        domains = [_EMAIL_DOMAINS[i] for i in self.email_domain.tolist()]
        names, name_len = _text_column([f"{f} {la}" for f, la in zip(first, last, strict=True)])
        emails, email_len = _text_column(
            [
                f"{f.lower()}.{la.lower()}{i}@{d}"
                for i, (f, la, d) in enumerate(zip(first, last, domains, strict=True), 1)
            ]
        )
        countries = np.array([c.encode() for c, _ in _COUNTRIES], dtype="S2")[self.country]
        layout = _RowLayout(["int8", ("text", emails.itemsize), ("text", names.itemsize), ("bytes", 2), "ts"])
        return layout.encode(
            [np.arange(1, n + 1, dtype=np.int64), emails, names, countries, self.signup],
            {1: email_len, 2: name_len},
        )

    def products_body(self) -> tuple[bytes, int]:
        """Product rows; reorder points come from the generated demand, so call after the chunks."""
        n = self.n_products
        rng = _rng(self.seed, 5)
        units = self.recent_units[:n].astype(np.float64)
        daily = units.mean(axis=1)
        sd = units.std(axis=1, ddof=1) if _DEMAND_DAYS > 1 else np.zeros(n)
        lead = self.lead_time.astype(np.float64)
        reorder = np.ceil(daily * lead + _ROP_Z * sd * np.sqrt(lead)).astype(np.int64)
        monthly = daily * 30
        stock = reorder + np.ceil(monthly * rng.uniform(0.3, 3.0, n)).astype(np.int64) + rng.integers(1, 40, n)
        # A handful at or under the reorder point, picked among the products that actually sell.
        n_low = max(1, round(n * _LOW_STOCK_SHARE)) if n >= 10 else 0
        if n_low:
            selling = np.flatnonzero(daily > 0)
            pool = selling if len(selling) >= n_low else np.arange(n)
            low = rng.choice(pool, size=n_low, replace=False)
            reorder[low] = np.maximum(reorder[low], 5)
            stock[low] = np.where(rng.random(n_low) < 0.3, 0, rng.integers(0, reorder[low] + 1))
        cats = [_CATEGORIES[c] for c in self.category.tolist()]
        brand = rng.integers(0, len(_BRANDS), n).tolist()
        adjective = rng.integers(0, len(_ADJECTIVES), n).tolist()
        noun = rng.integers(0, 1 << 30, n).tolist()
        names, name_len = _text_column(
            [
                f"{_BRANDS[b]} {_ADJECTIVES[a]} {c.nouns[x % len(c.nouns)]}"
                for b, a, x, c in zip(brand, adjective, noun, cats, strict=True)
            ]
        )
        skus, sku_len = _text_column([f"{c.code}-{i:06d}" for i, c in enumerate(cats, 1)])
        categories, category_len = _text_column([c.name for c in cats])
        layout = _RowLayout(
            [
                "int8", ("text", skus.itemsize), ("text", names.itemsize), ("text", categories.itemsize),
                "money", "money", "int4", "int4", "int4", "ts",
            ]
        )  # fmt: skip
        body = layout.encode(
            [
                np.arange(1, n + 1, dtype=np.int64),
                skus,
                names,
                categories,
                self.price_cents,
                self.cost_cents,
                stock,
                reorder,
                self.lead_time,
                self.product_created_us,
            ],
            {1: sku_len, 2: name_len, 3: category_len},
        )
        return body, int((stock <= reorder).sum())
