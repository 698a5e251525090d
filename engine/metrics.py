"""The server's figures in the Prometheus text format (version 0.0.4), without a
client library: a handful of counters, gauges read at scrape time, and histograms."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable

from engine.types import Completion

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """Record `value` `count` times (a request's mean gap, once per token)."""
        if count <= 0:
            return
        self.counts[bisect_left(self.buckets, value)] += count
        self.sum += value * count

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == math.inf else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines.append(f"{self.name}_sum {self.sum!r}")
        lines.append(f"{self.name}_count {cumulative}")
        return lines


class Metrics:
    """What `GET /metrics` reports. `queue_depth` is read from the engine at scrape
    time, so it covers every request, the bot's own included."""

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        self._queue_depth = queue_depth
        self.active_requests = 0
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(
            "lorabot_time_to_first_token_seconds",
            "Seconds from a request's arrival (queue wait included) to its first token.",
            TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "lorabot_inter_token_latency_seconds",
            "Seconds between tokens: each token after the first, at its request's mean gap.",
            ITL_BUCKETS,
        )
        self.duration = Histogram(
            "lorabot_request_duration_seconds",
            "Seconds from a request's arrival to its last token.",
            DURATION_BUCKETS,
        )

    def count_request(self, outcome: str) -> None:
        """outcome: ok, cancelled, invalid, unauthorized, unknown_model, busy, error."""
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def observe(self, completion: Completion) -> None:
        self.prompt_tokens += completion.prompt_tokens
        self.generated_tokens += completion.completion_tokens
        if completion.completion_tokens:
            self.ttft.observe(completion.ttft_s)
        if completion.completion_tokens > 1:
            gap = (completion.total_s - completion.ttft_s) / (completion.completion_tokens - 1)
            self.itl.observe(gap, completion.completion_tokens - 1)
        self.duration.observe(completion.total_s)

    def render(self) -> str:
        lines = [
            "# HELP lorabot_queue_depth Requests waiting for the engine plus those generating.",
            "# TYPE lorabot_queue_depth gauge",
            f"lorabot_queue_depth {self._queue_depth()}",
            "# HELP lorabot_active_requests HTTP completion requests in progress.",
            "# TYPE lorabot_active_requests gauge",
            f"lorabot_active_requests {self.active_requests}",
            "# HELP lorabot_requests_total Completion requests by outcome.",
            "# TYPE lorabot_requests_total counter",
        ]
        lines += [
            f'lorabot_requests_total{{outcome="{outcome}"}} {count}'
            for outcome, count in sorted(self.requests.items())
        ]
        lines += [
            "# HELP lorabot_prompt_tokens_total Prompt tokens of finished requests.",
            "# TYPE lorabot_prompt_tokens_total counter",
            f"lorabot_prompt_tokens_total {self.prompt_tokens}",
            "# HELP lorabot_generation_tokens_total Tokens generated for finished requests.",
            "# TYPE lorabot_generation_tokens_total counter",
            f"lorabot_generation_tokens_total {self.generated_tokens}",
        ]
        for histogram in (self.ttft, self.itl, self.duration):
            lines += histogram.render()
        return "\n".join(lines) + "\n"
