"""Prometheus text exposition, written by hand (no client library): counters, histogram
families, gauges read at scrape time. One ``Metrics`` object lives on ``app.state``."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable

from localcoder.completion import CompletionResult

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTING_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)  # specialist routing and adapter switches
ENDPOINTS = ("/infill", "/v1/completions", "/health", "/v1/health", "/v1/models", "/metrics")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.total}")
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.tokens = {"prompt": 0, "cached": 0, "generated": 0}
        # the engine's own time per completion: prompt (to the first token; a remote engine's latency,
        # network included) and decode, apart from the queueing and HTTP around them
        self.engine = {phase: Histogram(LATENCY_BUCKETS_S) for phase in ("prompt", "decode")}
        self.cancellations: dict[str, int] = defaultdict(int)
        self.windows: dict[str, int] = defaultdict(int)  # completions by prompt window: full | jump (after a jump)
        # a specialist bundle: completions per specialist, routing time and adapter switch time
        self.specialists: dict[str, int] = defaultdict(int)
        self.routing = {phase: Histogram(ROUTING_BUCKETS_S) for phase in ("route", "switch")}
        self.started = time.time()

    @staticmethod
    def endpoint(path: str) -> str:
        return path if path in ENDPOINTS else "other"

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        ep = self.endpoint(path)
        with self._lock:
            self.requests[(ep, status)] += 1
            self.latency.setdefault(ep, Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def observe_result(self, result: CompletionResult) -> None:
        with self._lock:
            self.tokens["prompt"] += result.prompt_tokens
            self.tokens["cached"] += result.tokens_cached
            self.tokens["generated"] += result.timings.predicted_n
            self.engine["prompt"].observe(result.timings.prompt_ms / 1000.0)
            self.engine["decode"].observe(result.timings.predicted_ms / 1000.0)
            if not result.timings.reused:  # a typed-through answer had no prompt
                self.windows[result.timings.window] += 1
            if result.timings.specialist is not None:
                self.specialists[result.timings.specialist] += 1
                self.routing["route"].observe(result.timings.route_ms / 1000.0)
                self.routing["switch"].observe(result.timings.adapter_switch_ms / 1000.0)

    def observe_cancel(self, reason: str) -> None:
        with self._lock:
            self.cancellations[reason] += 1

    def render(self, gauges: dict[str, Callable[[], float]]) -> str:
        with self._lock:
            lines = ["# HELP localcoder_requests_total HTTP requests by endpoint and status.",
                     "# TYPE localcoder_requests_total counter"]
            lines += [f'localcoder_requests_total{{endpoint="{ep}",status="{st}"}} {n}'
                      for (ep, st), n in sorted(self.requests.items())]
            lines += ["# HELP localcoder_request_seconds Request latency (to the last byte).",
                      "# TYPE localcoder_request_seconds histogram"]
            for ep, hist in sorted(self.latency.items()):
                lines += hist.lines("localcoder_request_seconds", f'endpoint="{ep}"')
            lines += ["# HELP localcoder_engine_seconds Engine time per completion: prompt (to the first "
                      "token, a remote engine's round trip included) and decode.",
                      "# TYPE localcoder_engine_seconds histogram"]
            for phase, hist in self.engine.items():
                lines += hist.lines("localcoder_engine_seconds", f'phase="{phase}"')
            for kind, n in self.tokens.items():
                lines += [f"# TYPE localcoder_{kind}_tokens_total counter", f"localcoder_{kind}_tokens_total {n}"]
            lines += ["# HELP localcoder_cancellations_total Generations cancelled, by reason.",
                      "# TYPE localcoder_cancellations_total counter"]
            lines += [f'localcoder_cancellations_total{{reason="{r}"}} {n}'
                      for r, n in sorted(self.cancellations.items())]
            lines += ["# HELP localcoder_window_completions_total Model completions by prompt window: full, or "
                      "jump (the small first window right after a cursor jump, while the full one is prefilled).",
                      "# TYPE localcoder_window_completions_total counter"]
            lines += [f'localcoder_window_completions_total{{window="{w}"}} {n}' for w, n in sorted(self.windows.items())]
            if self.specialists:  # only with a specialist bundle
                lines += ["# HELP localcoder_specialist_requests_total Completions by the specialist adapter "
                          "they were routed to.", "# TYPE localcoder_specialist_requests_total counter"]
                lines += [f'localcoder_specialist_requests_total{{specialist="{_escape(name)}"}} {n}'
                          for name, n in sorted(self.specialists.items())]
                lines += ["# HELP localcoder_specialist_seconds Per routed completion: choosing its specialist "
                          "(route, 0 when its document had one) and setting its adapter (switch, 0 when set).",
                          "# TYPE localcoder_specialist_seconds histogram"]
                for phase, hist in self.routing.items():
                    lines += hist.lines("localcoder_specialist_seconds", f'phase="{phase}"')
        for name, read in gauges.items():
            lines += [f"# TYPE localcoder_{name} gauge", f"localcoder_{name} {read()}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """A label value as the text format wants it (a bundle names its specialists)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
