"""``make bench-scale``: many volumes on few nodes of the local cluster, and a failover storm.

Numbers, not assertions. One run of the real operator (chart RBAC, its default lease,
margin and reconcile interval), real agents and qemu-storage-daemons in simulated nodes,
and the emulated API server, which counts every request by client, verb and resource
(:attr:`pairvol.localcluster.apiserver.APIServer.request_counts`). Measured:

* time from applying ``--volumes`` ReplicatedVolumes (spread over ``--nodes`` nodes) to all
  of them ``Replicating``;
* reconcile latency: a spec change (``checkpoint.intervalSeconds``) until
  ``status.observedGeneration`` shows it, and ``pairvol.io/checkpoint=now`` until
  ``status.checkpoint.id`` moves; both seen by a watch, one volume at a time;
* API requests per volume per minute at steady state (a ``--steady`` window), by client
  (operator, agents; the in-process kubelets and controllers apart) and verb/resource,
  plus the watch events the server sent;
* operator CPU seconds (user+system from /proc, whole process tree) and peak RSS (VmHWM);
* RSS of the agent and its qemu-storage-daemon per replica;
* RTO: one extra node holds the primary of one reference volume; killing it gives the
  single-volume RTO. Then the node holding the most primaries of the others is killed:
  the storm's RTO p50/p99 over those volumes. RTO here = node kill until the status shows
  the failover finished (``lastFailover.durationMs`` set and the primary moved), which the
  operator writes only once the new primary's agent reports its export serving; seen by
  a watch from this process. ``detect`` is kill until the operator decided
  (``lastFailover.time``).

Every process the run starts (the operator, agents, daemons) belongs to the local
cluster's :class:`~pairvol.localcluster.demo.Stack`, which stops them by PID and cgroup on
the way out, also after an error or Ctrl-C/SIGTERM.

    .venv/bin/python -m tests.bench.scale [--volumes 40] [--nodes 4] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pairvol.api.status import parse_time
from pairvol.kube.client import KubeClient, KubeError
from pairvol.kube.paths import volume_path
from pairvol.localcluster.demo import Stack
from pairvol.localcluster.kubelet import _descendants
from pairvol.localcluster.kubelet_pods import KubeletError
from pairvol.operator.manifests import OperatorConfig

log = logging.getLogger(__name__)

GROUP_PATH = "/apis/pairvol.io/v1alpha1/namespaces/default/replicatedvolumes"
TARGET_APPLY_S = 90.0
TARGET_REQ_PER_VOL_MIN = 30.0
TARGET_OPERATOR_RSS_MIB = 200.0
TARGET_STORM_RATIO = 1.5
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A step of the benchmark did not complete (a number could not be measured)."""


# ---------------------------------------------------------------- /proc


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """user+system of one process (its own, not its children's)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def comm(pid: int) -> str:
    return _read(f"/proc/{pid}/comm").strip()


def tree(pid: int) -> list[int]:
    return [pid, *_descendants(pid)]


def operator_usage(root_pid: int) -> dict[str, float]:
    pids = tree(root_pid)
    return {
        "cpu_s": sum(cpu_seconds(p) for p in pids),
        "rss_mib": sum(status_kib(p, "VmRSS") for p in pids) / 1024,
        "peak_rss_mib": max((status_kib(p, "VmHWM") for p in pids), default=0) / 1024,
    }


def running_pids(stack: Stack, pod: str) -> list[int]:
    """The main processes of a pod, or none if it is not running at that moment (a failover
    replaced it between reading the status and asking the node)."""
    try:
        return list(stack.sim.pod_pids("default", pod))
    except KubeletError:
        return []


def replica_rss(stack: Stack, pods: Sequence[str]) -> dict[str, list[float]]:
    """MiB per replica: the agent's process(es) and its qemu-storage-daemon(s); a pod that
    is not running at that moment (replaced by a failover meanwhile) is left out."""
    agent, qsd = [], []
    for pod in pods:
        mains = running_pids(stack, pod)
        if not mains:
            continue
        pids = [p for main in mains for p in tree(main)]
        daemons = [p for p in pids if comm(p).startswith("qemu-storage")]
        others = [p for p in pids if p not in daemons]
        agent.append(sum(status_kib(p, "VmRSS") for p in others) / 1024)
        qsd.append(sum(status_kib(p, "VmRSS") for p in daemons) / 1024)
    return {"agent": agent, "qsd": qsd, "total": [a + q for a, q in zip(agent, qsd, strict=True)]}


# ---------------------------------------------------------------- numbers


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (p99 of 10 values is the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "max": max(values) if values else None,
        "mean": statistics.fmean(values) if values else None,
    }


def client_kind(user: str) -> str:
    if "operator" in user:
        return "operator"
    if "agent" in user:
        return "agents"
    return "other"


# ---------------------------------------------------------------- watch


class VolumeWatch:
    """The ReplicatedVolumes as this process sees them, by watch; wait for a condition on
    one and learn when the event that made it true arrived."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.objects: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Condition()
        self.arrived: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> VolumeWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                listing = await self.kube.request("GET", GROUP_PATH)
                rv = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                async with self.changed:
                    for obj in listing.get("items") or []:
                        self.objects[obj["metadata"]["name"]] = obj
                        self.arrived[obj["metadata"]["name"]] = time.time()
                    self.changed.notify_all()
                params = {"watch": "true", "resourceVersion": rv, "timeoutSeconds": "3600"}
                async with contextlib.aclosing(self.kube.stream_lines(GROUP_PATH, params, 3700)) as lines:
                    async for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        name = (obj.get("metadata") or {}).get("name")
                        if event.get("type") == "ERROR" or not name:
                            break
                        at = time.time()
                        async with self.changed:
                            if event["type"] == "DELETED":
                                self.objects.pop(name, None)
                            else:
                                self.objects[name] = obj
                            self.arrived[name] = at
                            self.changed.notify_all()
            except (KubeError, TimeoutError, ValueError) as exc:
                log.info("volume watch restarts: %s", exc)
                await asyncio.sleep(0.2)

    async def wait(self, name: str, check: Callable[[dict[str, Any]], bool], within: float, what: str) -> float:
        """Wall-clock arrival time of the first version of ``name`` that satisfies ``check``."""

        def ok() -> bool:
            obj = self.objects.get(name)
            return obj is not None and check(obj)

        try:
            async with asyncio.timeout(within), self.changed:
                await self.changed.wait_for(ok)
                return self.arrived[name]
        except TimeoutError:
            st = (self.objects.get(name) or {}).get("status") or {}
            raise BenchError(
                f"{name}: no {what} within {within:.0f}s (phase {st.get('phase')}: {st.get('message')})"
            ) from None


def phases_of(watch: VolumeWatch, names: Sequence[str]) -> dict[str, int]:
    return dict(collections.Counter(str((watch.objects.get(n, {}).get("status") or {}).get("phase")) for n in names))


def replica_pods(watch: VolumeWatch, name: str) -> list[str]:
    st = watch.objects.get(name, {}).get("status") or {}
    return [str(st[role]["pod"]) for role in ("primary", "secondary") if st.get(role)]


def phase_is(phase: str) -> Callable[[dict[str, Any]], bool]:
    return lambda obj: (obj.get("status") or {}).get("phase") == phase


# ---------------------------------------------------------------- the run


def volume(name: str, nodes: Sequence[str], size: str) -> dict[str, Any]:
    """The CRD's defaults (checkpoint every 10 s, grace 3 s) but a small size and a node list."""
    return {
        "apiVersion": "pairvol.io/v1alpha1",
        "kind": "ReplicatedVolume",
        "metadata": {"name": name},
        "spec": {"size": size, "nodes": list(nodes)},
    }


def count_requests(api: Any) -> tuple[collections.Counter[tuple[str, str, str]], collections.Counter[tuple[str, str]]]:
    return collections.Counter(api.request_counts), collections.Counter(api.watch_events)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def measure(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    res: dict[str, Any] = {"params": {k: v for k, v in vars(args).items() if k != "json"}}
    op_pid = stack.operator.proc.pid  # type: ignore[union-attr]
    names = [f"bench-{i:02d}" for i in range(args.volumes)]
    nodes = [f"node-{i}" for i in range(1, args.nodes + 1)]
    ref_node = f"node-{args.nodes + 1}"
    api = stack.cluster.api
    async with VolumeWatch(stack.kube) as watch:
        # ------------------------------------------------------------ bring-up
        usage0 = operator_usage(op_pid)
        say(f"applying {len(names)} volumes on {', '.join(nodes)}")
        t_apply = time.time()
        for name in names:
            await stack.apply(volume(name, nodes, args.size))
        ready_at = await asyncio.gather(
            *(watch.wait(n, phase_is("Replicating"), args.timeout, "Replicating") for n in names),
            return_exceptions=True,
        )
        per_volume = [t - t_apply for t in ready_at if isinstance(t, float)]
        if not per_volume:
            raise BenchError(f"no volume reached Replicating within {args.timeout:.0f}s: {ready_at[0]}")
        usage1 = operator_usage(op_pid)
        # a volume may leave Replicating again (a primary that could not renew its Lease in
        # time is replaced): also when all of them were Replicating at the same moment
        together: float | None = None
        try:
            async with asyncio.timeout(args.settle * 6), watch.changed:
                await watch.changed.wait_for(lambda: phases_of(watch, names) == {"Replicating": len(names)})
                together = time.time() - t_apply
        except TimeoutError:
            pass
        res["bringup"] = {
            "all_replicating_s": max(per_volume),
            "all_replicating_together_s": together,
            "phases_after": phases_of(watch, names),
            "per_volume_s": summary(per_volume),
            "never_replicating": [str(t) for t in ready_at if not isinstance(t, float)],
            "operator_cpu_s": usage1["cpu_s"] - usage0["cpu_s"],
        }
        say(f"{len(per_volume)} of {len(names)} reached Replicating {max(per_volume):.1f} s after the apply; "
            f"now {phases_of(watch, names)}")  # fmt: skip

        # the reference volume: its primary alone on an extra node (least loaded: ranked first)
        await stack.apply(volume("bench-ref", [ref_node, nodes[0]], args.size))
        await watch.wait("bench-ref", phase_is("Replicating"), args.timeout, "Replicating")
        ref_primary = watch.objects["bench-ref"]["status"]["primary"]["node"]
        if ref_primary != ref_node:
            raise BenchError(f"bench-ref's primary went to {ref_primary}, not {ref_node}")
        all_names = [*names, "bench-ref"]

        # ------------------------------------------------------------ reconcile latency
        spec_lat: list[float] = []
        ann_lat: list[float] = []
        sem = asyncio.Semaphore(args.probe_concurrency)

        async def probe(name: str) -> None:
            async with sem:
                gen = int(watch.objects[name]["metadata"].get("generation") or 0)
                sent = time.time()
                patched = await stack.kube.merge_patch(
                    volume_path("default", name), {"spec": {"checkpoint": {"intervalSeconds": 11}}}
                )
                want = int(patched["metadata"]["generation"])
                if want <= gen:
                    raise BenchError(f"{name}: the spec change did not bump the generation ({gen} -> {want})")
                at = await watch.wait(
                    name,
                    lambda o: int((o.get("status") or {}).get("observedGeneration") or 0) >= want,
                    30,
                    "observedGeneration",
                )
                spec_lat.append(at - sent)
                cp0 = int(((watch.objects[name].get("status") or {}).get("checkpoint") or {}).get("id") or 0)
                sent = time.time()
                await stack.annotate(name, "pairvol.io/checkpoint", "now")
                at = await watch.wait(
                    name,
                    lambda o: int(((o.get("status") or {}).get("checkpoint") or {}).get("id") or 0) > cp0,
                    30,
                    "new checkpoint in status",
                )
                ann_lat.append(at - sent)

        probed = [n for n in all_names if phase_is("Replicating")(watch.objects[n])]
        outcomes = await asyncio.gather(*(probe(n) for n in probed), return_exceptions=True)
        failed = [str(o) for o in outcomes if isinstance(o, BaseException)]
        res["reconcile_latency_s"] = {"spec_to_observedGeneration": summary(spec_lat),
                                      "checkpoint_annotation_to_status": summary(ann_lat),
                                      "not_probed": len(all_names) - len(probed), "failed": failed}  # fmt: skip
        say(f"reconcile latency: spec p50 {pct(spec_lat, 50) or 0:.3f}s, annotation p50 {pct(ann_lat, 50) or 0:.3f}s"
            f"{f'; {len(failed)} probes failed' if failed else ''}")  # fmt: skip

        # ------------------------------------------------------------ steady state
        await asyncio.sleep(args.settle)
        phases = collections.Counter((watch.objects[n].get("status") or {}).get("phase") for n in all_names)
        agent_pids = [p for n in all_names for pod in replica_pods(watch, n)
                      for main in running_pids(stack, pod) for p in tree(main)]  # fmt: skip
        req0, ev0 = count_requests(api)
        u0, t0 = operator_usage(op_pid), time.monotonic()
        a0 = {p: cpu_seconds(p) for p in agent_pids}
        await asyncio.sleep(args.steady)
        req1, ev1 = count_requests(api)
        u1, t1 = operator_usage(op_pid), time.monotonic()
        agents_cpu = sum(max(0.0, cpu_seconds(p) - c) for p, c in a0.items())
        minutes = (t1 - t0) / 60
        per = len(all_names) * minutes
        reqs = req1 - req0
        evs = ev1 - ev0
        by_client: dict[str, float] = collections.defaultdict(float)
        detail: dict[str, dict[str, float]] = collections.defaultdict(dict)
        for (user, verb, resource), n in sorted(reqs.items()):
            kind = client_kind(user)
            by_client[kind] += n / per
            key = f"{verb} {resource}"
            detail[kind][key] = detail[kind].get(key, 0.0) + n / per
        events: dict[str, dict[str, float]] = collections.defaultdict(dict)
        for (user, resource), n in sorted(evs.items()):
            kind = client_kind(user)
            events[kind][resource] = events[kind].get(resource, 0.0) + n / per
        res["steady"] = {
            "window_s": t1 - t0,
            "volumes": len(all_names),
            "phases_at_start": dict(phases),
            "requests_per_volume_minute": dict(by_client),
            "pairvol_requests_per_volume_minute": by_client["operator"] + by_client["agents"],
            "by_verb_resource": {k: dict(v) for k, v in detail.items()},
            "watch_events_per_volume_minute": {k: dict(v) for k, v in events.items()},
            "operator_cpu_s": u1["cpu_s"] - u0["cpu_s"],
            "operator_cpu_fraction": (u1["cpu_s"] - u0["cpu_s"]) / (t1 - t0),
            "agents_and_daemons_cpu_fraction": agents_cpu / (t1 - t0),
        }
        res["operator"] = {**operator_usage(op_pid), "cpu_s_total": operator_usage(op_pid)["cpu_s"]}
        rss = replica_rss(stack, [pod for n in all_names for pod in replica_pods(watch, n)])
        res["replica_rss_mib"] = {k: summary(v) for k, v in rss.items()}
        say(
            f"steady: {res['steady']['pairvol_requests_per_volume_minute']:.1f} requests/volume/min "
            f"(operator {by_client['operator']:.1f}, agents {by_client['agents']:.1f}); operator peak RSS "
            f"{res['operator']['peak_rss_mib']:.0f} MiB"
        )

        # ------------------------------------------------------------ failover: one volume
        async def failover(victim: str, vols: Sequence[str]) -> dict[str, Any]:
            before = {n: (watch.objects[n].get("status") or {}).get("lastFailover") or {} for n in vols}

            def done(name: str) -> Callable[[dict[str, Any]], bool]:
                def check(obj: dict[str, Any]) -> bool:
                    st = obj.get("status") or {}
                    lf = st.get("lastFailover") or {}
                    return (
                        lf != before[name]
                        and lf.get("durationMs") is not None
                        and (st.get("primary") or {}).get("node") != victim
                    )

                return check

            t_kill = time.time()
            await stack.sim.kill_node(victim)
            within = min(args.timeout, 120.0)
            ats = await asyncio.gather(*(watch.wait(n, done(n), within, "failover") for n in vols),
                                       return_exceptions=True)  # fmt: skip
            rto = [at - t_kill for at in ats if isinstance(at, float)]
            missing = [str(at) for at in ats if not isinstance(at, float)]
            detect, execute, by_operator = [], [], []
            for n in vols:
                lf = (watch.objects[n].get("status") or {}).get("lastFailover") or {}
                decided = parse_time(lf.get("time"))
                if decided is not None and lf != before[n]:
                    detect.append(decided - t_kill)
                    if lf.get("durationMs") is not None:
                        execute.append(float(lf["durationMs"]) / 1000)
                        by_operator.append(decided - t_kill + float(lf["durationMs"]) / 1000)
            return {"node": victim, "volumes": len(vols), "rto_s": summary(rto), "detect_s": summary(detect),
                    "decided_to_done_s": summary(execute), "rto_operator_clock_s": summary(by_operator),
                    "not_failed_over": missing,
                    "rto_each_s": {n: at - t_kill for n, at in zip(vols, ats, strict=True)
                                   if isinstance(at, float)}}  # fmt: skip

        say(f"killing {ref_node} (the primary of bench-ref only)")
        single = await failover(ref_node, ["bench-ref"])
        say(f"single-volume RTO {single['rto_s']['p50'] or float('nan'):.2f} s")
        await asyncio.sleep(args.settle)

        # ------------------------------------------------------------ failover storm
        # failovers nobody asked for so far (a primary that could not renew its Lease in time)
        unplanned = sum(1 for n in names if (watch.objects[n].get("status") or {}).get("lastFailover"))
        # primaries asked to serve again in place instead (they lost only their Lease)
        restarted = sum(1 for n in names if (watch.objects[n].get("status") or {}).get("lastRestart"))
        phases = phases_of(watch, names)
        serving = [n for n in names if phase_is("Replicating")(watch.objects[n])]
        primaries = collections.Counter(watch.objects[n]["status"]["primary"]["node"] for n in serving)
        victim, count = max(primaries.items(), key=lambda kv: (kv[1], kv[0]))
        vols = [n for n in serving if watch.objects[n]["status"]["primary"]["node"] == victim]
        say(f"killing {victim}, primary of {count} volumes (primaries per node: {dict(primaries)})")
        storm = await failover(victim, vols)
        ratio = ratio_operator = None
        if storm["rto_s"]["p99"] is not None and single["rto_s"]["p99"]:
            ratio = storm["rto_s"]["p99"] / single["rto_s"]["p99"]
        if storm["rto_operator_clock_s"]["p99"] is not None and single["rto_operator_clock_s"]["p99"]:
            ratio_operator = storm["rto_operator_clock_s"]["p99"] / single["rto_operator_clock_s"]["p99"]
        res["failover"] = {"definition": "node kill -> status shows the failover finished (the new primary serves)",
                           "definition_operator_clock": "node kill -> the operator saw the new primary serve "
                                                        "(lastFailover.time + durationMs): without the status "
                                                        "write's way to this process's watch",
                           "single": single, "storm": storm, "storm_p99_over_single": ratio,
                           "storm_p99_over_single_operator_clock": ratio_operator,
                           "unplanned_failovers_before_the_kills": unplanned,
                           "restarted_in_place_before_the_storm": restarted,
                           "phases_before_the_storm": phases,
                           "replicating_before_the_storm": len(serving)}  # fmt: skip
        nan = float("nan")
        say(f"storm RTO p50 {storm['rto_s']['p50'] or nan:.2f} s p99 {storm['rto_s']['p99'] or nan:.2f}"
            f" s ({ratio or nan:.2f}x single)")  # fmt: skip
        res["operator_end"] = operator_usage(op_pid)
    totals: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (user, verb, resource), n in sorted(api.request_counts.items()):
        kind = totals[client_kind(user)]
        kind[f"{verb} {resource}"] = kind.get(f"{verb} {resource}", 0) + n
    res["requests_whole_run"] = {k: dict(v) for k, v in totals.items()}
    return res


def report(res: dict[str, Any]) -> str:
    def f(v: Any, unit: str = "", digits: int = 2) -> str:
        return "-" if v is None else f"{v:.{digits}f}{unit}"

    st, fo, op = res["steady"], res["failover"], res["operator_end"]
    lat = res["reconcile_latency_s"]
    rows = [
        ("apply -> all Replicating", f(res["bringup"]["all_replicating_s"], " s", 1), f"<= {TARGET_APPLY_S:.0f} s"),
        ("all Replicating at the same time", f(res["bringup"]["all_replicating_together_s"], " s", 1),
         "" if res["bringup"]["all_replicating_together_s"] else str(res["bringup"]["phases_after"])),
        ("  per volume p50 / p99", f"{f(res['bringup']['per_volume_s']['p50'], ' s', 1)} / "
                                   f"{f(res['bringup']['per_volume_s']['p99'], ' s', 1)}", ""),
        ("operator CPU during bring-up", f(res["bringup"]["operator_cpu_s"], " s", 1), ""),
        ("reconcile: spec -> observedGeneration p50 / p99",
         f"{f(lat['spec_to_observedGeneration']['p50'], ' s')} / "
         f"{f(lat['spec_to_observedGeneration']['p99'], ' s')}", ""),
        ("reconcile: checkpoint=now -> status p50 / p99",
         f"{f(lat['checkpoint_annotation_to_status']['p50'], ' s')} / "
         f"{f(lat['checkpoint_annotation_to_status']['p99'], ' s')}", ""),
        (f"API requests / volume / min (steady, {st['volumes']} vols, {st['window_s']:.0f} s)",
         f(st["pairvol_requests_per_volume_minute"], "", 1), f"<= {TARGET_REQ_PER_VOL_MIN:.0f}"),
        ("  operator", f(st["requests_per_volume_minute"].get("operator"), "", 1), ""),
        ("  agents", f(st["requests_per_volume_minute"].get("agents"), "", 1), ""),
        ("  (kubelets, controllers, this harness)", f(st["requests_per_volume_minute"].get("other"), "", 1), ""),
        ("operator CPU at steady state", f(st["operator_cpu_fraction"] * 100, " % of a core", 1), ""),
        ("agents + daemons CPU at steady state", f(st["agents_and_daemons_cpu_fraction"] * 100, " % of a core", 1),
         ""),
        ("operator CPU seconds, whole run", f(op["cpu_s"], " s", 1), ""),
        ("operator peak RSS", f(op["peak_rss_mib"], " MiB", 0), f"<= {TARGET_OPERATOR_RSS_MIB:.0f} MiB"),
        ("RSS per replica: agent / qsd / total p50",
         f"{f(res['replica_rss_mib']['agent']['p50'], '', 0)} / {f(res['replica_rss_mib']['qsd']['p50'], '', 0)} / "
         f"{f(res['replica_rss_mib']['total']['p50'], ' MiB', 0)}", ""),
        ("single-volume RTO", f(fo["single"]["rto_s"]["p50"], " s"), ""),
        (f"storm RTO p50 / p99 ({fo['storm']['volumes']} vols on {fo['storm']['node']})",
         f"{f(fo['storm']['rto_s']['p50'], ' s')} / {f(fo['storm']['rto_s']['p99'], ' s')}", ""),
        ("  kill -> failover decided p50 / p99 (storm)",
         f"{f(fo['storm']['detect_s']['p50'], ' s')} / {f(fo['storm']['detect_s']['p99'], ' s')}", ""),
        ("  decided -> done (lastFailover.durationMs) p50 / p99, storm",
         f"{f(fo['storm']['decided_to_done_s']['p50'], ' s')} / "
         f"{f(fo['storm']['decided_to_done_s']['p99'], ' s')}", ""),
        ("  single: detect / decided -> done",
         f"{f(fo['single']['detect_s']['p50'], ' s')} / {f(fo['single']['decided_to_done_s']['p50'], ' s')}", ""),
        ("storm p99 / single", f(fo["storm_p99_over_single"], "x"), f"<= {TARGET_STORM_RATIO}x"),
        ("RTO by the operator's clock: single / storm p50 / p99",
         f"{f(fo['single']['rto_operator_clock_s']['p50'], ' s')} / "
         f"{f(fo['storm']['rto_operator_clock_s']['p50'], ' s')} / "
         f"{f(fo['storm']['rto_operator_clock_s']['p99'], ' s')}",
         ""),
        ("  storm p99 / single, operator's clock", f(fo["storm_p99_over_single_operator_clock"], "x"), ""),
        ("  storm volumes not failed over", str(len(fo["storm"]["not_failed_over"])), ""),
        ("unplanned failovers before the kills", str(fo["unplanned_failovers_before_the_kills"]), ""),
        ("volumes restarted in place (lost only their Lease) before the storm",
         str(fo.get("restarted_in_place_before_the_storm", "?")), ""),
        ("phases before the storm", " ".join(f"{k} {v}" for k, v in fo.get("phases_before_the_storm", {}).items()),
         ""),
        ("reconcile probes failed / skipped",
         f"{len(lat['failed'])} / {lat['not_probed']}", ""),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = ["", f"{'measure':<{width}}  {'value':>22}  target", "-" * (width + 36)]
    lines += [f"{name:<{width}}  {value:>22}  {target}" for name, value, target in rows]
    lines.append("")
    lines.append("steady-state requests per volume per minute, by verb and resource:")
    for kind in ("operator", "agents", "other"):
        for key, v in sorted(st["by_verb_resource"].get(kind, {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"  {kind:<9} {key:<40} {v:8.2f}")
    lines.append("watch events sent per volume per minute:")
    for kind, per in st["watch_events_per_volume_minute"].items():
        for resource, v in sorted(per.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {kind:<9} {resource:<40} {v:8.2f}")
    lines.append(f"RTO definition: {fo['definition']}")
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    from tests.e2e.conftest import render_chart

    chart = await asyncio.to_thread(render_chart, "default", "networkPolicy.perVolumeReplication=true")
    (deployment,) = [d for d in chart if d.get("kind") == "Deployment"]
    defaults = OperatorConfig()
    env = {
        "PAIRVOL_PER_VOLUME_NETWORK_POLICY": "true",
        "PAIRVOL_LEASE_MARGIN": f"{defaults.lease_margin_s:g}",
        "PAIRVOL_RECONCILE_INTERVAL": f"{defaults.reconcile_interval_s:g}",
    }
    if args.reprotect_hold_max is not None:
        env["PAIRVOL_REPROTECT_HOLD_MAX"] = f"{args.reprotect_hold_max:g}"
    lease = args.lease_duration or defaults.lease_duration_s
    say(f"local cluster: {args.nodes} + 1 nodes, operator with its defaults "
        f"(lease {lease:g} s{'' if args.lease_duration is None else ' (--lease-duration)'}, "
        f"reconcile every {defaults.reconcile_interval_s:g} s)")  # fmt: skip
    async with Stack.up(
        args.nodes + 1,
        lease_duration=lease,
        operator_env=env,
        node_monitor_grace=args.node_grace,
        operator_pod=deployment["spec"]["template"],
        rbac=chart,
    ) as stack:
        say(f"operator pid {stack.operator.proc.pid if stack.operator.proc else '?'}, logs in {stack.root}")
        res = await measure(args, stack)
    print(report(res))
    if args.json:
        text = json.dumps(res, indent=2, default=str) + "\n"
        await asyncio.to_thread(Path(args.json).write_text, text)
    return 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--volumes", type=int, default=40)
    p.add_argument("--nodes", type=int, default=4, help="nodes for the volumes (one more holds the reference)")
    p.add_argument("--quick", action="store_true", help="3 volumes on 2 nodes, short windows: checks the harness")
    p.add_argument("--steady", type=float, default=60.0, help="seconds of the steady-state window")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to let things settle between steps")
    p.add_argument("--size", default="16Mi")
    p.add_argument("--node-grace", type=float, default=5.0, help="node monitor grace (NotReady after)")
    p.add_argument("--timeout", type=float, default=600.0, help="longest wait for any one step")
    p.add_argument("--probe-concurrency", type=int, default=4)
    p.add_argument("--lease-duration", type=float, default=None,
                   help="the operator's PAIRVOL_LEASE_DURATION instead of its default (the agents renew every third)")
    p.add_argument("--reprotect-hold-max", type=float, default=None,
                   help="the operator's PAIRVOL_REPROTECT_HOLD_MAX (0: re-protection never waits for other "
                        "volumes' failovers) instead of its default")
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.volumes, args.nodes, args.steady, args.settle = 3, 2, 6.0, 1.0
    if args.volumes < 1 or args.nodes < 2:
        p.error("need at least 1 volume and 2 nodes")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if os.geteuid() != 0:
        print("bench-scale needs root (network namespaces, cgroups)", file=sys.stderr)
        return 2

    async def run() -> int:
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM unwinds like Ctrl-C: the Stack stops every process it started
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await _main(args)

    try:
        return asyncio.run(run())
    except BenchError as exc:
        print(f"bench-scale FAILED: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


if __name__ == "__main__":
    sys.exit(main())
