"""REST paths of the resources pairvol reads and writes (pure).

The client takes paths rather than typed API classes (see :mod:`pairvol.kube.client`); one
function per resource keeps the group/version of each in one place.
"""

from __future__ import annotations


def pods_path(ns: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else "")


def services_path(ns: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{ns}/services" + (f"/{name}" if name else "")


def secrets_path(ns: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{ns}/secrets" + (f"/{name}" if name else "")


def events_path(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/events"


def nodes_path() -> str:
    return "/api/v1/nodes"


def netpol_path(ns: str, name: str | None = None) -> str:
    return f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies" + (f"/{name}" if name else "")


def lease_path(ns: str, name: str | None = None) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases" + (f"/{name}" if name else "")


def volume_path(ns: str, name: str | None = None, status: bool = False) -> str:
    base = f"/apis/pairvol.io/v1alpha1/namespaces/{ns}/replicatedvolumes"
    return base + (f"/{name}" if name else "") + ("/status" if status else "")
