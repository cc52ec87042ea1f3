"""Prometheus metrics without a dependency and without cost on the hot path.

Counters and histograms are plain Python objects updated with one attribute
add; the text exposition format is rendered only when /metrics is scraped.
Gauges are callables read at scrape time, so the state they report (open
sockets, rooms) is never kept twice. Names follow
`roomcast_<subsystem>_<name>_<unit>`; no room or user id is ever a label.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

__all__ = ["Counter", "Histogram", "Gauge", "MetricsRegistry", "LATENCY_BUCKETS_S", "SIZE_BUCKETS"]

# 50 µs .. 10 s: fan-out and Redis hops sit at the low end, Kafka at the high.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Counter:
    __slots__ = ("name", "help", "value")

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.value = 0

    def inc(self, amount: int | float = 1) -> None:
        self.value += amount

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter", f"{self.name} {self.value}"]


class Gauge:
    """A value read at scrape time. kind="counter" for a monotonic count kept elsewhere."""

    __slots__ = ("name", "help", "read", "kind")

    def __init__(self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge") -> None:
        self.name = name
        self.help = help_text
        self.read = read
        self.kind = kind

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", f"{self.name} {self.read()}"]


class Histogram:
    """Cumulative buckets rendered at scrape; observe() is a bisect and two adds."""

    __slots__ = ("name", "help", "bounds", "counts", "sum", "count")

    def __init__(self, name: str, help_text: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.help = help_text
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.sum}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class MetricsRegistry:
    def __init__(self) -> None:
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}

    def _add(self, metric: Counter | Gauge | Histogram) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str) -> Counter:
        metric = Counter(name, help_text)
        self._add(metric)
        return metric

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> Gauge:
        metric = Gauge(name, help_text, read)
        self._add(metric)
        return metric

    def counter_fn(self, name: str, help_text: str, read: Callable[[], float]) -> Gauge:
        """A counter whose value lives elsewhere (e.g. a core's statistics)."""
        metric = Gauge(name, help_text, read, kind="counter")
        self._add(metric)
        return metric

    def histogram(self, name: str, help_text: str, bounds: Sequence[float] = LATENCY_BUCKETS_S) -> Histogram:
        metric = Histogram(name, help_text, bounds)
        self._add(metric)
        return metric

    def render(self) -> bytes:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return ("\n".join(lines) + "\n").encode()

    def value(self, name: str) -> float:
        """A counter's or gauge's current value (for tests and statistics())."""
        metric = self._metrics[name]
        if isinstance(metric, Counter):
            return metric.value
        if isinstance(metric, Gauge):
            return metric.read()
        return metric.count

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
