"""Deletion propagation in the emulated API server, as Kubernetes' garbage collector does it.

Background (the default): dependents go once their owner is gone. Foreground: the owner
stays, marked deleted with the ``foregroundDeletion`` finalizer, until its last
dependent is gone. Orphan: the dependents stay and lose their reference to the owner.
"""

from __future__ import annotations

from typing import Any

import pytest

from pairvol.localcluster.apiserver_builtin import ResourceType
from pairvol.localcluster.apiserver_logic import RequestError
from pairvol.localcluster.apiserver_store import ObjectStore

CM = ("", "v1", "configmaps")


def owned_by(owner: dict[str, Any] | None, name: str, finalizers: list[str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if owner is not None:
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
             "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip
    if finalizers:
        meta["finalizers"] = finalizers
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}


def chain(store: ObjectStore, held: bool) -> ResourceType:
    """owner -> middle -> leaf (leaf held by a finalizer when ``held``)."""
    owner = store.create_object(*CM, owned_by(None, "owner"), "default")
    middle = store.create_object(*CM, owned_by(owner, "middle"), "default")
    store.create_object(*CM, owned_by(middle, "leaf", ["test/hold"] if held else None), "default")
    return store.resource_type(*CM)


def names(store: ObjectStore, rtype: ResourceType) -> list[str]:
    return [o["metadata"]["name"] for o in store.list_objects(rtype, "default")]


def test_background_deletion_removes_the_whole_chain() -> None:
    store = ObjectStore()
    rtype = chain(store, held=False)
    store.delete_object(rtype, "default", "owner")
    assert names(store, rtype) == []


def test_foreground_deletion_keeps_the_owner_until_its_dependents_are_gone() -> None:
    store = ObjectStore()
    rtype = chain(store, held=True)
    owner = store.delete_object(rtype, "default", "owner", {"propagationPolicy": "Foreground"})
    assert owner["metadata"]["finalizers"] == ["foregroundDeletion"] and owner["metadata"]["deletionTimestamp"]
    assert names(store, rtype) == ["leaf", "middle", "owner"]  # the leaf's finalizer holds all
    leaf = store.get_object(rtype, "default", "leaf")
    assert leaf["metadata"]["deletionTimestamp"]
    leaf["metadata"]["finalizers"] = []
    store.update_object(rtype, "default", "leaf", leaf, None, require_rv=True)
    assert names(store, rtype) == []


def test_orphan_deletion_keeps_the_dependents_and_drops_their_owner_reference() -> None:
    store = ObjectStore()
    rtype = chain(store, held=False)
    store.delete_object(rtype, "default", "owner", {"propagationPolicy": "Orphan"})
    assert names(store, rtype) == ["leaf", "middle"]
    assert "ownerReferences" not in store.get_object(rtype, "default", "middle")["metadata"]
    with pytest.raises(RequestError):
        store.get_object(rtype, "default", "owner")
    store.delete_object(rtype, "default", "middle")  # the leaf's owner still collects it
    assert names(store, rtype) == []
