"""A real Prometheus scraping the local cluster as the Prometheus Operator would have it
scrape a cluster with the chart installed: the chart's PodMonitor and ServiceMonitor say
what to scrape, its PrometheusRule what to alert on.

Debian's ``prometheus`` is built without Kubernetes service discovery, so the discovery
step is done here: the test serves Prometheus' HTTP service discovery (``http_sd``) with
the targets the monitors select from the cluster's Pods, Services and Endpoints at that
moment, labelled as the Prometheus Operator labels them (``job`` from ``jobLabel``,
``namespace``, ``pod``, ``container``, ``service``, ``endpoint``). Scraping, rule
evaluation and alert state are Prometheus' own. The selection rules are pure functions
(:func:`pod_monitor_targets`, :func:`service_monitor_targets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from pairvol.agent.procs import free_port
from pairvol.aio import bounded

Obj = dict[str, Any]
TargetGroups = list[Obj]  # http_sd: [{"targets": ["host:port"], "labels": {...}}]


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against an object's labels."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _namespaces(monitor: Obj) -> list[str] | None:
    """The namespaces a monitor looks in; None for all of them."""
    ns_sel = monitor["spec"].get("namespaceSelector") or {}
    if ns_sel.get("any"):
        return None
    return list(ns_sel.get("matchNames") or [monitor["metadata"]["namespace"]])


def _meta(obj: Obj) -> Obj:
    meta: Obj = obj.get("metadata") or {}
    return meta


def _endpoint_labels(endpoint: Obj) -> dict[str, str]:
    """The labels every target of a monitor endpoint carries: its port name, path, scheme."""
    return {
        "endpoint": str(endpoint.get("port")),
        "__metrics_path__": str(endpoint.get("path") or "/metrics"),
        "__scheme__": str(endpoint.get("scheme") or "http"),
    }


def pod_monitor_targets(monitor: Obj, pods: Sequence[Obj]) -> TargetGroups:
    """What a PodMonitor scrapes: every endpoint port of every selected pod with an IP."""
    spec = monitor["spec"]
    namespaces = _namespaces(monitor)
    groups: TargetGroups = []
    for pod in pods:
        meta, labels = _meta(pod), _meta(pod).get("labels") or {}
        ip = (pod.get("status") or {}).get("podIP")
        if not ip or (namespaces is not None and meta.get("namespace") not in namespaces):
            continue
        if not selector_matches(spec.get("selector"), labels):
            continue
        job_label = spec.get("jobLabel")
        job = labels.get(job_label) if job_label else None
        for endpoint in spec.get("podMetricsEndpoints") or []:
            for container in (pod.get("spec") or {}).get("containers") or []:
                for port in container.get("ports") or []:
                    if port.get("name") != endpoint.get("port"):
                        continue
                    groups.append({
                        "targets": [f"{ip}:{port['containerPort']}"],
                        "labels": {
                            "job": job or f"{meta.get('namespace')}/{_meta(monitor)['name']}",
                            "namespace": str(meta.get("namespace")),
                            "pod": str(meta.get("name")),
                            "container": str(container.get("name")),
                            **_endpoint_labels(endpoint),
                        },
                    })  # fmt: skip
    return groups


def service_monitor_targets(monitor: Obj, services: Sequence[Obj], endpoints: Sequence[Obj]) -> TargetGroups:
    """What a ServiceMonitor scrapes: the ready addresses of the selected Services'
    Endpoints, on the port named by each of the monitor's endpoints."""
    spec = monitor["spec"]
    namespaces = _namespaces(monitor)
    by_service = {(_meta(e).get("namespace"), _meta(e).get("name")): e for e in endpoints}
    groups: TargetGroups = []
    for svc in services:
        meta, labels = _meta(svc), _meta(svc).get("labels") or {}
        if namespaces is not None and meta.get("namespace") not in namespaces:
            continue
        if not selector_matches(spec.get("selector"), labels):
            continue
        job_label = spec.get("jobLabel")
        job = labels.get(job_label) if job_label else None
        eps = by_service.get((meta.get("namespace"), meta.get("name"))) or {}
        for endpoint in spec.get("endpoints") or []:
            for subset in eps.get("subsets") or []:
                ports = [p for p in subset.get("ports") or [] if p.get("name") == endpoint.get("port")]
                for port in ports:
                    for address in subset.get("addresses") or []:
                        ref = address.get("targetRef") or {}
                        groups.append({
                            "targets": [f"{address['ip']}:{port['port']}"],
                            "labels": {
                                "job": job or str(meta.get("name")),
                                "namespace": str(meta.get("namespace")),
                                "service": str(meta.get("name")),
                                **({"pod": str(ref["name"])} if ref.get("kind") == "Pod" else {}),
                                **_endpoint_labels(endpoint),
                            },
                        })  # fmt: skip
    return groups


Discover = Callable[[], Awaitable[TargetGroups]]


@dataclass(frozen=True)
class ScrapeJob:
    """One monitor endpoint as a scrape job: its interval, its discovery, and whether the
    scraped labels win over the target's (``honorLabels``)."""

    interval: str
    discover: Discover
    honor_labels: bool = False

    @classmethod
    def of(cls, endpoint: Mapping[str, Any], discover: Discover) -> ScrapeJob:
        return cls(str(endpoint.get("interval") or "30s"), discover, bool(endpoint.get("honorLabels")))


class Prometheus:
    """``prometheus`` as a child process (stopped by PID), one scrape job per monitor
    (targets from ``discover``, refreshed every second), the rule groups of a
    PrometheusRule, evaluated every second."""

    def __init__(self, binary: str, workdir: Path, rules: Obj, jobs: Mapping[str, ScrapeJob]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.rules = rules
        self.jobs = dict(jobs)  # scrape job name -> its job
        self.port = 0
        self._sd_runner: web.AppRunner | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.log_path = workdir / "prometheus.log"

    async def __aenter__(self) -> Prometheus:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve_sd(self, request: web.Request) -> web.Response:
        job = list(self.jobs.values())[int(request.match_info["job"])]
        return web.json_response(await job.discover())

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        app = web.Application()
        app.router.add_get("/sd/{job:[0-9]+}", self._serve_sd)  # job names have slashes
        self._sd_runner = web.AppRunner(app)
        await self._sd_runner.setup()
        sd_port = free_port()
        await web.TCPSite(self._sd_runner, "127.0.0.1", sd_port).start()
        rules_file = self.workdir / "rules.yaml"
        rules_file.write_text(yaml.safe_dump({"groups": self.rules["spec"]["groups"]}))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(rules_file)],
            "scrape_configs": [
                {
                    "job_name": name,
                    "scrape_interval": job.interval,
                    "scrape_timeout": "1s",
                    "honor_labels": job.honor_labels,
                    "http_sd_configs": [{"url": f"http://127.0.0.1:{sd_port}/sd/{i}", "refresh_interval": "1s"}],
                }
                for i, (name, job) in enumerate(self.jobs.items())
            ],
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.port = free_port()
        log = self.log_path.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.port}/-/ready") as r:
                    if r.status == 200:
                        return
            if self._proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not become ready: {self.log_path.read_text()[-2000:]}")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await bounded(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._sd_runner is not None:
            await self._sd_runner.cleanup()
            self._sd_runner = None

    async def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{self.port}{path}", params=params) as r,
        ):
            body = await r.json()
        assert body.get("status") == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[Obj]:
        """An instant query's samples: [{"metric": {...}, "value": [t, "v"]}]."""
        data = await self._get("/api/v1/query", {"query": expr})
        result: list[Obj] = data["result"]
        return result

    async def alerts(self) -> list[Obj]:
        data = await self._get("/api/v1/alerts")
        alerts: list[Obj] = data["alerts"]
        return alerts

    async def targets(self) -> list[Obj]:
        data = await self._get("/api/v1/targets")
        active: list[Obj] = data["activeTargets"]
        return active

    async def wait_for(self, what: str, check: Callable[[], Awaitable[Any]], within: float) -> Any:
        """Poll ``check`` until it returns something truthy; fail with ``what`` and the
        alerts Prometheus has at that moment."""
        deadline = time.monotonic() + within
        while True:
            found = await check()
            if found:
                return found
            if time.monotonic() > deadline:
                alerts = [(a["labels"].get("alertname"), a["state"]) for a in await self.alerts()]
                targets = [
                    (t["labels"].get("job"), t["scrapeUrl"], t["health"], t.get("lastError"))
                    for t in await self.targets()
                ]
                raise AssertionError(f"no {what} within {within:.0f} s; alerts now: {alerts}; targets: {targets}")
            await asyncio.sleep(0.5)

    async def firing(self, alertname: str, **labels: str) -> list[Obj]:
        return [
            a
            for a in await self.alerts()
            if a["state"] == "firing"
            and a["labels"].get("alertname") == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]
