"""The block graphs of replication.c, as QMP arguments (pure functions, no I/O).

Secondary::

    listener daemon: TCP (TLS-PSK) "replication-eN" ──► nbd client ──unix──►
    NBD export "replication-eN" ──► filter of cow-G ──► disk (raw) ◄── backing ── hidden-G ◄── backing ── active-G
                                 └─ copy-before-write job cow-G (blockdev-backup sync=none) ──► hidden-G
                                                                (hidden-G, active-G: qcow2)

Primary::

    workload export "volume" ──► quorum (vote-threshold=1, read-pattern=fifo)
                                   ├─ children.0: disk (raw, local)
                                   └─ children.N: peer (nbd client, unix) ──► link gate (agent)
                                        ──► link daemon: "peer" (nbd client, TLS-PSK) ──► secondary's "replication-eN"

The link daemon is a second qemu-storage-daemon that only holds the connection to the
secondary; see ``pairvol.agent.gate`` for why the agent stands between it and the quorum.
Every TCP listener (the secondary's replication port, the relay of ``--export-listen``)
is a daemon of its own started on a socket the agent made (``pairvol.qemu.listen``,
``pairvol.agent.tcpexport``); the replica's daemon serves NBD on unix sockets only.

QEMU 7.2's QMP still uses the legacy ``{"type", "data"}`` socket address in
``nbd-server-start``; blockdev options use the flat form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DISK_NODE = "disk"
QUORUM_NODE = "quorum"
PEER_NODE = "peer"
SYNC_TARGET_NODE = "peer-sync"
LINK_EXPORT = "peer"
SYNC_JOB = "sync"
COMMIT_JOB = "commit"
REPLICATION_EXPORT = "replication"
IDENTITY_EXPORT = "replication-identity"
TRACK_BITMAP = "resync"
BITMAP_CARRIER_NODE = "resync-carrier"
CARRIED_BITMAP = "resync-carried"  # the tracking bitmap on ``disk`` while the quorum is rebuilt (a grow)
BITMAP_GRANULARITY = 64 * 1024
WORKLOAD_EXPORT = "volume"
LINEAGE_EXPORT = "volume-lineage"
TLS_OBJECT = "tls0"

QMPArgs = dict[str, Any]


def hidden_node(generation: int) -> str:
    return f"hidden-{generation}"


def active_node(generation: int) -> str:
    return f"active-{generation}"


def cow_job(generation: int) -> str:
    return f"cow-{generation}"


def file_node(path: Path, node_name: str, fmt: str, backing: str | None = None) -> QMPArgs:
    args: QMPArgs = {
        "driver": fmt,
        "node-name": node_name,
        "file": {"driver": "file", "filename": str(path), "aio": "threads"},
        "discard": "unmap" if fmt == "qcow2" else "ignore",
    }
    if fmt == "qcow2":
        # Overlays are an undo log that is rebuilt, never resumed, after a restart
        # (see SecondaryChain.restore_running): flushing them would only slow down each checkpoint.
        args["backing"] = backing
        args["cache"] = {"no-flush": True}
        args["file"]["cache"] = {"no-flush": True}
    return args


def overlay_pair(hidden_path: Path, active_path: Path, generation: int) -> tuple[QMPArgs, QMPArgs]:
    hidden = file_node(hidden_path, hidden_node(generation), "qcow2", backing=DISK_NODE)
    active = file_node(active_path, active_node(generation), "qcow2", backing=hidden_node(generation))
    return hidden, active


# QEMU's TLS server credentials read Diffie-Hellman parameters from ``dh-params.pem`` in
# their directory and *generate* new ones when it is missing: 0.1-2 s of CPU at every
# start of a daemon with a TLS listener (measured on the 2-CPU test machine; it was most
# of a failover's time with --export-listen). The agent writes this file next to the key:
# the standard 2048-bit group ffdhe2048 of RFC 7919 (public parameters, PKCS#3 PEM).
DH_PARAMS_FILE = "dh-params.pem"
FFDHE2048_PEM = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def tls_psk(directory: Path, endpoint: str, username: str) -> QMPArgs:
    args: QMPArgs = {"qom-type": "tls-creds-psk", "id": TLS_OBJECT, "dir": str(directory), "endpoint": endpoint}
    if endpoint == "client":
        args["username"] = username
    return args


def nbd_server_inet(host: str, port: int, tls: bool) -> QMPArgs:
    args: QMPArgs = {"addr": {"type": "inet", "data": {"host": host, "port": str(port)}}}
    if tls:
        args["tls-creds"] = TLS_OBJECT
    return args


def nbd_server_unix(path: Path) -> QMPArgs:
    return {"addr": {"type": "unix", "data": {"path": str(path)}}}


def nbd_export(export_id: str, node: str, writable: bool = True, name: str | None = None) -> QMPArgs:
    return {"type": "nbd", "id": export_id, "node-name": node, "name": name or export_id, "writable": writable}


def replication_export_name(epoch: int) -> str:
    """The secondary's export is named after the epoch it was started at: the link of a
    primary paired with another incarnation (an old primary that reconnects after its
    peer's address was reused) asks for a name that no longer exists and is refused."""
    return f"{REPLICATION_EXPORT}-e{epoch}"


def lineage_export_name(lineage: int) -> str:
    """The workload export under a name that carries the primary's lineage (the epoch since
    which its disk is one continuous history, see PersistedState.lineage): a client that
    must never see the disk go back in time (a mounted file system of a Checkpoint-mode
    volume) asks for this name, and after a failover no server has it any more."""
    return f"{WORKLOAD_EXPORT}-l{lineage}"


def identity_export_name(epoch: int, disk_id: str) -> str:
    """The same export under a name that also carries the identity of the secondary's disk:
    a primary that copies only what it knows this disk lacks asks for this name, and a
    secondary whose disk is another one has no such export (docs/correctness.md, R3)."""
    return f"{replication_export_name(epoch)}-d{disk_id}"


def nbd_client(node_name: str, host: str, port: int, export: str, tls: bool) -> QMPArgs:
    """The link daemon's client to the secondary. No reconnect: a lost connection fails
    the in-flight requests at once (the gate holds them), and nothing is ever re-sent to
    whatever answers at that address later."""
    args: QMPArgs = {
        "driver": "nbd",
        "node-name": node_name,
        "server": {"type": "inet", "host": host, "port": str(port)},
        "export": export,
        "reconnect-delay": 0,
    }
    if tls:
        args["tls-creds"] = TLS_OBJECT
    return args


def nbd_client_unix(node_name: str, path: Path, export: str = WORKLOAD_EXPORT) -> QMPArgs:
    """A TCP listener daemon's view of an export of the replica's daemon: the relay's of the
    workload export, the secondary's listener's of ``replication-eN``. No reconnect: a
    fenced export stays gone, and a write is never re-sent to whatever serves it later."""
    return {
        "driver": "nbd",
        "node-name": node_name,
        "server": {"type": "unix", "path": str(path)},
        "export": export,
        "reconnect-delay": 0,
    }


# A day: "until the daemon is killed with its agent", in whole seconds as QEMU wants it.
GATE_HOLD_SECONDS = 86400


def nbd_client_gate(node_name: str, path: Path, export: str = LINK_EXPORT) -> QMPArgs:
    """The quorum's view of the link gate. The gate's socket closes only when the agent
    dies; the requests in flight must then never be answered, so the client holds them
    (reconnect-delay) until the kernel kills this daemon with its agent (PR_SET_PDEATHSIG)."""
    return {
        "driver": "nbd",
        "node-name": node_name,
        "server": {"type": "unix", "path": str(path)},
        "export": export,
        "reconnect-delay": GATE_HOLD_SECONDS,
    }


def quorum(children: list[str]) -> QMPArgs:
    return {
        "driver": "quorum",
        "node-name": QUORUM_NODE,
        "children": children,
        "vote-threshold": 1,
        "read-pattern": "fifo",
    }


def backup_sync_none(generation: int) -> QMPArgs:
    """Copy-before-write from the secondary disk into hidden-G (replication.c's backup job)."""
    return {
        "job-id": cow_job(generation),
        "device": DISK_NODE,
        "target": hidden_node(generation),
        "sync": "none",
        "auto-dismiss": True,
    }


def mirror_full() -> QMPArgs:
    """Initial sync (COLO's drive-mirror): write-blocking, so once READY every workload
    write reaches the target before it completes."""
    return {
        "job-id": SYNC_JOB,
        "device": QUORUM_NODE,
        "target": SYNC_TARGET_NODE,
        "sync": "full",
        "copy-mode": "write-blocking",
        "on-target-error": "report",
        "auto-dismiss": True,
    }


def bitmap_carrier(path: Path, read_only: bool) -> QMPArgs:
    """An empty qcow2 image of the volume's size that only carries a persistent copy of the
    tracking bitmap across a clean stop (the volume itself is raw: no bitmaps in it). QEMU
    writes persistent bitmaps when the node is closed and loads them when it is opened."""
    return {
        "driver": "qcow2",
        "node-name": BITMAP_CARRIER_NODE,
        "read-only": read_only,
        "file": {"driver": "file", "filename": str(path)},
    }


def bitmap_merge(node: str, target: str, source_node: str, source: str) -> QMPArgs:
    """block-dirty-bitmap-merge: the bits of ``source`` on ``source_node`` are added to
    ``target`` on ``node`` (moving the tracking bitmap between nodes keeps every bit)."""
    return {"node": node, "target": target, "bitmaps": [{"node": source_node, "name": source}]}


def track_bitmap() -> QMPArgs:
    """The primary's record of what its peer may lack: a dirty bitmap on the quorum node.
    A write sets its bits when the quorum completes it, i.e. after both children answered,
    so a write the peer has not answered yet is recorded however early it started."""
    return {"node": QUORUM_NODE, "name": TRACK_BITMAP, "granularity": BITMAP_GRANULARITY}


def backup_bitmap() -> QMPArgs:
    """Bitmap resync: copy the tracked regions from the quorum to the peer. The job's
    copy-before-write filter sits above the quorum, so a workload write to a region not
    yet copied first waits for that region's copy (block-copy serialises them), and only
    then reaches both children: the peer gets the old data before the new, never after.
    ``never``: the job does not clear bits; they go only when the peer is declared in sync."""
    return {
        "job-id": SYNC_JOB,
        "device": QUORUM_NODE,
        "target": SYNC_TARGET_NODE,
        "sync": "bitmap",
        "bitmap": TRACK_BITMAP,
        "bitmap-mode": "never",
        "on-source-error": "report",
        "on-target-error": "report",
        "auto-dismiss": True,
    }


def active_commit(generation: int) -> QMPArgs:
    """replication_stop(failover=true): commit active+hidden into the secondary disk."""
    return {"job-id": COMMIT_JOB, "device": active_node(generation), "auto-dismiss": True}


def node_is_gone(error: Exception) -> bool:
    """blockdev-del's answer for a node that does not exist ("Failed to find node with
    node-name=...", "Cannot find node ..."), as opposed to one that is still in use."""
    text = str(error).lower()
    return "find node" in text or "not found" in text or "not find" in text
