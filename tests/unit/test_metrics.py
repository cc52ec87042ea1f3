"""roomcast.metrics: the Prometheus text exposition (format 0.0.4) every /metrics renders."""

from __future__ import annotations

import pytest

from roomcast.metrics import MetricsRegistry


def test_counters_gauges_and_histograms_render_as_prometheus_text() -> None:
    m = MetricsRegistry()
    posts = m.counter("t_posts_total", "posts acked")
    posts.value += 3
    m.gauge("t_connections", "open sockets", lambda: 7)
    m.counter_fn("t_gaps_total", "gaps seen", lambda: 2)
    h = m.histogram("t_latency_seconds", "a latency", (0.001, 0.01))
    for v in (0.0005, 0.001, 0.005, 2.0):
        h.observe(v)
    assert m.render().decode().splitlines() == [
        "# HELP t_posts_total posts acked",
        "# TYPE t_posts_total counter",
        "t_posts_total 3",
        "# HELP t_connections open sockets",
        "# TYPE t_connections gauge",
        "t_connections 7",
        "# HELP t_gaps_total gaps seen",
        "# TYPE t_gaps_total counter",
        "t_gaps_total 2",
        "# HELP t_latency_seconds a latency",
        "# TYPE t_latency_seconds histogram",
        't_latency_seconds_bucket{le="0.001"} 2',  # cumulative; le is inclusive
        't_latency_seconds_bucket{le="0.01"} 3',
        't_latency_seconds_bucket{le="+Inf"} 4',
        "t_latency_seconds_sum 2.0065",
        "t_latency_seconds_count 4",
    ]
    assert (m.value("t_posts_total"), m.value("t_connections"), m.value("t_latency_seconds")) == (3, 7, 4)


def test_a_name_registered_twice_is_refused() -> None:
    m = MetricsRegistry()
    m.counter("t_x_total", "x")
    with pytest.raises(ValueError, match="registered twice"):
        m.gauge("t_x_total", "again", lambda: 0)
