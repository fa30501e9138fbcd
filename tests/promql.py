"""PromQL in dashboards and alert rules: extract it, name the metrics it reads, evaluate it on a Prometheus.

Used by the static checks (every metric a panel or rule reads exists in core/metrics.py) and by the
live proof (every panel returns data on a Prometheus scraping a real service).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client import CollectorRegistry

from service.process import free_port

# Grafana's built-in interval variables, replaced by one concrete duration for evaluation outside Grafana.
# Longest names first so `$__interval_ms` is not read as `$__interval` + `_ms`.
_DURATION_VARIABLES = ("__rate_interval", "__interval", "__range")
_MILLISECOND_VARIABLES = ("__interval_ms", "__range_ms")
_SECOND_VARIABLES = ("__range_s",)
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d|w|y)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}

# Words that look like metric names in PromQL but are not.
_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
        "bool", "offset", "atan2", "inf", "nan", "start", "end",
    }
)  # fmt: skip
# Prometheus's own series, present on every scrape target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def substitute(expr: str, duration: str = "1m") -> str:
    """Replace Grafana's interval variables (`$__rate_interval`, `${__interval}`, …) by `duration`."""
    match = _DURATION.match(duration)
    if match is None:
        raise ValueError(f"{duration!r} is not a Prometheus duration like 1m")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    replacements = {
        **{name: f"{int(seconds * 1000)}" for name in _MILLISECOND_VARIABLES},
        **{name: f"{int(seconds)}" for name in _SECOND_VARIABLES},
        **{name: duration for name in _DURATION_VARIABLES},
    }
    for name in sorted(replacements, key=len, reverse=True):
        expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"(?![\w])", replacements[name], expr)
    return expr


def dashboard_queries(path: Path | str, duration: str = "1m") -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, rows and collapsed rows included.

    Interval variables are substituted by `duration`; targets without an expression are skipped.
    """
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    found: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets") or ():
            expr = (target.get("expr") or "").strip()
            if expr:
                found.append((panel.get("title") or f"panel {panel.get('id')}", substitute(expr, duration)))
    return found


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, depth first: rows (open or collapsed) yield themselves and then their panels."""

    def walk(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels") or ())

    yield from walk(dashboard.get("panels") or ())


def rule_expressions(path: Path | str) -> list[tuple[str, str]]:
    """(alert name, PromQL) for every alerting rule; recording rules appear under their record name."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    found: list[tuple[str, str]] = []
    for group in document.get("groups") or ():
        for rule in group.get("rules") or ():
            name = rule.get("alert") or rule.get("record")
            found.append((str(name), str(rule["expr"]).strip()))
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, labels, durations."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = _GROUPING.sub(" ", text)  # label lists of by/without/on/ignoring/group_*
    text = re.sub(r"\boffset\s+-?\d+[a-z]+", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(1)
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function call or an operator keyword
        names.add(word)
    return names


def known_series(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry's metrics can expose, labelled or not (histogram suffixes too)."""
    names: set[str] = set()
    for family in registry.collect():
        base = family.name
        if family.type == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        elif family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        elif family.type == "summary":
            names |= {base, f"{base}_sum", f"{base}_count", f"{base}_created"}
        elif family.type == "info":
            names.add(f"{base}_info")
        else:
            names.add(base)
    return names


def cumulative_series(registry: CollectorRegistry) -> set[str]:
    """The series of the registry's metrics that only ever grow while a process lives: counters' `_total`,
    histograms' `_bucket`, `_sum` and `_count`."""
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return names


def raw_counters(queries: Iterable[tuple[str, str]], cumulative: set[str]) -> list[str]:
    """One message per (title, series) where a query reads a cumulative series other than as the direct
    argument of rate()/irate()/increase(). Its raw value is a total since its process started: it drops at
    every restart, and a sum over replicas adds up processes of different ages."""
    problems = []
    for title, expr in queries:
        text = _STRING.sub('""', expr)
        for match in _IDENT.finditer(text):
            name = match.group(1)
            if name in cumulative and not text[: match.start()].rstrip().endswith(("rate(", "increase(")):
                problems.append(
                    f"{title}: {name!r} is read raw, not through rate() or increase() (expr: {expr})"
                )
    return problems


def metrics_markdown(metrics: Any) -> str:
    """The table of every exported metric for docs/operations.md, from a `core.metrics.Metrics` instance."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for collector in vars_of(metrics):
        family = next(iter(collector.describe()))
        if family.type == "counter":
            name = f"`{family.name}_total`"
        elif family.type == "histogram":
            name = f"`{family.name}` (`_bucket`, `_sum`, `_count`)"
        else:
            name = f"`{family.name}`"
        labels = ", ".join(f"`{label}`" for label in collector._labelnames) or "-"
        lines.append(f"| {name} | {family.type} | {labels} | {family.documentation} |")
    return "\n".join(lines) + "\n"


def vars_of(metrics: Any) -> list[Any]:
    """The collectors of a slotted Metrics dataclass, in declaration order."""
    return [getattr(metrics, name) for name in metrics.__dataclass_fields__]


def unknown_metrics(queries: Iterable[tuple[str, str]], known: set[str]) -> list[str]:
    """One message per (title, metric) whose metric is neither exported by driftloop nor Prometheus's own."""
    problems = []
    for title, expr in queries:
        for name in sorted(metric_names(expr) - known - PROMETHEUS_SERIES):
            problems.append(f"{title}: metric {name!r} is not exported by driftloop (expr: {expr})")
    return problems


def evaluate_all(
    prom_base_url: str,
    queries: Iterable[tuple[str, str]],
    *,
    require_series: bool = True,
    timeout_s: float = 10.0,
) -> list[str]:
    """Run each query on Prometheus's /api/v1/query now; a message naming the panel for each that fails.

    A query fails when Prometheus rejects it (parse or execution error) or, with `require_series`, when it
    returns no series. Alert expressions pass `require_series=False`: a quiet alert selects nothing.
    """
    failures = []
    with httpx.Client(base_url=prom_base_url.rstrip("/"), timeout=timeout_s) as client:
        for title, expr in queries:
            try:
                response = client.get("/api/v1/query", params={"query": expr})
            except httpx.HTTPError as exc:
                failures.append(f"{title}: request failed ({exc.__class__.__name__}: {exc}) for {expr}")
                continue
            failure = _failure(response, require_series=require_series)
            if failure:
                failures.append(f"{title}: {failure} for {expr}")
    return failures


def dashboard_failures(prom_base_url: str, paths: Iterable[Path]) -> list[str]:
    """Every panel query of the dashboards that errors or returns no series, as `file: panel title: why`."""
    queries = [(f"{path.name}: {title}", expr) for path in paths for title, expr in dashboard_queries(path)]
    return evaluate_all(prom_base_url, queries)


def rule_failures(prom_base_url: str, path: Path) -> list[str]:
    """Every rule expression of a rules file that Prometheus cannot evaluate, as `file: rule name: why`."""
    queries = [(f"{path.name}: {name}", expr) for name, expr in rule_expressions(path)]
    return evaluate_all(prom_base_url, queries, require_series=False)


def instant_query(prom_base_url: str, expr: str, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The result of an instant query now: the vector's samples; ValueError when Prometheus rejects it."""
    response = httpx.get(
        f"{prom_base_url.rstrip('/')}/api/v1/query", params={"query": expr}, timeout=timeout_s
    )
    failure = _failure(response, require_series=False)
    if failure:
        raise ValueError(f"{failure} for {expr}")
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def _failure(response: httpx.Response, *, require_series: bool) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code} with a body that is not JSON"
    if body.get("status") != "success":
        return f"{body.get('errorType', 'error')}: {body.get('error', f'HTTP {response.status_code}')}"
    data = body.get("data") or {}
    result = data.get("result")
    if require_series and data.get("resultType") in ("vector", "matrix") and not result:
        return "empty result"
    return None


@contextmanager
def prometheus_server(
    workdir: Path,
    targets: Sequence[str],
    *,
    job: str = "driftloop",
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    binary: str = "prometheus",
    ready_timeout_s: float = 30.0,
) -> Iterator[str]:
    """A real Prometheus on a free 127.0.0.1 port scraping `targets` (host:port); yields its base URL.

    Its TSDB and log live in `workdir`; the process is stopped when the block exits.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_ready(base_url, process, ready_timeout_s, log_path)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(base_url: str, process: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> None:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/-/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"prometheus not ready after {timeout_s} s: {log_path.read_text()[-2000:]}")
