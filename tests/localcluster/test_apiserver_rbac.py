"""Authentication and RBAC: requests are held to the permissions their token grants.

The admin kubeconfig has every permission; a ServiceAccount token (TokenRequest, as
``kubectl create token`` and kubelets ask for one) has exactly what its Roles and
ClusterRoles grant through bindings, and anything else is a 403 Status worded as
kube-apiserver words it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

from pairvol.localcluster import apiserver_auth as auth
from pairvol.localcluster.apiserver_auth import RBAC, Attributes
from pairvol.localcluster.apiserver_logic import parse_resource_path
from pairvol.localcluster.cluster import LocalCluster

KubectlRunner = Callable[..., Coroutine[Any, Any, tuple[int, str, str]]]  # the `kubectl` fixture
READER = auth.service_account_user("apps", "reader")


def request(method: str, path: str, watch: bool = False) -> Attributes:
    return auth.attributes(method, path, parse_resource_path(path), watch)


def rbac(
    roles: dict[tuple[str, str], list[dict[str, Any]]] | None = None,
    cluster_roles: dict[str, list[dict[str, Any]]] | None = None,
    bindings: tuple[tuple[str, str, str], ...] = (),
) -> RBAC:
    """``bindings``: (binding namespace or "" for a ClusterRoleBinding, role kind, role name), all to READER."""
    subject = [{"kind": "ServiceAccount", "name": "reader", "namespace": "apps"}]

    def binding(ns: str, kind: str, name: str) -> dict[str, Any]:
        return {"metadata": {"namespace": ns}, "subjects": subject, "roleRef": {"kind": kind, "name": name}}

    return RBAC(
        roles={key: {"rules": rules} for key, rules in (roles or {}).items()},
        cluster_roles={name: {"rules": rules} for name, rules in (cluster_roles or {}).items()},
        role_bindings=[binding(*b) for b in bindings if b[0]],
        cluster_role_bindings=[binding(*b) for b in bindings if not b[0]],
    )


# ---------------------------------------------------------------- the rules (pure)


def test_a_role_grants_its_verbs_on_its_resources_in_its_namespace_only() -> None:
    policy = rbac(
        roles={("apps", "r"): [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
        bindings=(("apps", "Role", "r"),),
    )
    assert policy.allows(READER, request("GET", "/api/v1/namespaces/apps/pods"))
    assert policy.allows(READER, request("GET", "/api/v1/namespaces/apps/pods/web"))
    assert not policy.allows(READER, request("GET", "/api/v1/namespaces/apps/pods", watch=True))
    assert not policy.allows(READER, request("DELETE", "/api/v1/namespaces/apps/pods/web"))
    assert not policy.allows(READER, request("GET", "/api/v1/namespaces/other/pods"))
    assert not policy.allows(READER, request("GET", "/api/v1/pods")), "all namespaces needs a ClusterRoleBinding"
    assert not policy.allows(READER, request("GET", "/apis/apps/v1/namespaces/apps/deployments"))
    assert not policy.allows(READER, request("GET", "/api/v1/namespaces/apps/pods/web/log")), "a subresource"


def test_subresources_resource_names_and_wildcards() -> None:
    policy = rbac(
        roles={
            ("apps", "r"): [
                {"apiGroups": ["pairvol.io"], "resources": ["replicatedvolumes/status"], "verbs": ["patch"]},
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["psk"], "verbs": ["get"]},
                {"apiGroups": ["*"], "resources": ["*/scale"], "verbs": ["*"]},
            ]
        },
        bindings=(("apps", "Role", "r"),),
    )
    status = "/apis/pairvol.io/v1alpha1/namespaces/apps/replicatedvolumes/v1/status"
    assert policy.allows(READER, request("PATCH", status))
    assert not policy.allows(READER, request("PATCH", status.removesuffix("/status")))
    assert policy.allows(READER, request("GET", "/api/v1/namespaces/apps/secrets/psk"))
    assert not policy.allows(READER, request("GET", "/api/v1/namespaces/apps/secrets/other"))
    assert not policy.allows(READER, request("GET", "/api/v1/namespaces/apps/secrets")), "list has no name"
    assert policy.allows(READER, request("PUT", "/apis/apps/v1/namespaces/apps/deployments/web/scale"))


def test_a_cluster_role_through_a_role_binding_is_limited_to_that_namespace() -> None:
    policy = rbac(
        cluster_roles={"view": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        bindings=(("apps", "ClusterRole", "view"),),
    )
    assert policy.allows(READER, request("GET", "/api/v1/namespaces/apps/pods"))
    assert not policy.allows(READER, request("GET", "/api/v1/namespaces/kube-system/pods"))
    cluster_wide = rbac(
        cluster_roles={"view": [{"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["list"]}]},
        bindings=(("", "ClusterRole", "view"),),
    )
    assert cluster_wide.allows(READER, request("GET", "/api/v1/namespaces/kube-system/pods"))
    assert cluster_wide.allows(READER, request("GET", "/api/v1/nodes"))


def test_non_resource_urls_and_discovery() -> None:
    policy = rbac(
        cluster_roles={"metrics": [{"nonResourceURLs": ["/metrics", "/debug/*"], "verbs": ["get"]}]},
        bindings=(("", "ClusterRole", "metrics"),),
    )
    assert policy.allows(READER, request("GET", "/metrics"))
    assert policy.allows(READER, request("GET", "/debug/pprof"))
    assert not policy.allows(READER, request("GET", "/logs"))
    nobody = rbac()
    for path in ("/api", "/apis/pairvol.io/v1alpha1", "/version", "/openapi/v3", "/healthz"):
        assert nobody.allows(READER, request("GET", path)), f"discovery {path} is open to authenticated users"
    assert not nobody.allows(auth.User("system:anonymous", ("system:unauthenticated",)), request("GET", "/api"))


def test_the_admin_group_is_never_restricted() -> None:
    assert rbac().allows(auth.ADMIN, request("DELETE", "/api/v1/namespaces/apps"))


def test_tokens_are_signed_and_expire() -> None:
    key, other_key = b"k" * 32, b"x" * 32
    now = int(time.time())
    token = auth.issue_token(key, "apps", "reader", "uid-1", now, 600)
    user = auth.verify_token(key, token, now + 1)
    assert user is not None and user.name == "system:serviceaccount:apps:reader" and user.sa_uid == "uid-1"
    assert "system:serviceaccounts:apps" in user.groups
    assert auth.verify_token(other_key, token, now + 1) is None
    assert auth.verify_token(key, token, now + 600) is None, "expired"
    header, claims, signature = token.split(".")
    assert auth.verify_token(key, f"{header}.{claims}x.{signature}", now) is None


# ---------------------------------------------------------------- over HTTP


async def _token(api_cluster: LocalCluster, namespace: str, name: str) -> str:
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}
    api_cluster.apply(account)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {auth.ADMIN_TOKEN}"}) as http,
        http.post(
            f"{api_cluster.url}/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
        ) as r,
    ):
        assert r.status == 201, await r.text()
        return str((await r.json())["status"]["token"])


async def test_a_forbidden_call_is_refused_with_403_and_a_status(api_cluster: LocalCluster) -> None:
    token = await _token(api_cluster, "default", "reader")
    api_cluster.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader", "namespace": "default"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        }
    )
    api_cluster.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader", "namespace": "default"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "default"}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        }
    )
    async with aiohttp.ClientSession(base_url=api_cluster.url, headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.get("/api/v1/namespaces/default/pods") as r:
            assert r.status == 200
        async with http.delete("/api/v1/namespaces/default/secrets/psk") as r:
            status = await r.json()
    assert r.status == 403
    assert status == {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": 'secrets "psk" is forbidden: User "system:serviceaccount:default:reader" '
        'cannot delete resource "secrets" in API group "" in the namespace "default"',
        "reason": "Forbidden",
        "details": {"name": "psk", "group": "", "kind": "secrets"},
        "code": 403,
    }


async def test_bad_and_orphaned_tokens_are_401(api_cluster: LocalCluster) -> None:
    token = await _token(api_cluster, "default", "short-lived")
    for bad in ("Bearer nonsense", "Basic YWRtaW46YWRtaW4=", f"Bearer {token}x"):
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{api_cluster.url}/api", headers={"Authorization": bad}) as r,
        ):
            assert (r.status, (await r.json())["reason"]) == (401, "Unauthorized"), bad
    api_cluster.api.delete_object(api_cluster.api.resource_type("", "v1", "serviceaccounts"), "default", "short-lived")
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{api_cluster.url}/api", headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        assert r.status == 401, "a deleted ServiceAccount's tokens stop working"


async def test_kubectl_as_a_service_account_is_held_to_its_rbac(kubectl: KubectlRunner) -> None:
    """kubectl sends no token over plain HTTP; impersonation (--as) is how to act as an account."""
    as_reader = "--as=system:serviceaccount:default:reader"
    assert (await kubectl("create", "serviceaccount", "reader"))[0] == 0
    code, _, err = await kubectl(as_reader, "get", "nodes")
    assert code == 1
    assert 'nodes is forbidden: User "system:serviceaccount:default:reader" cannot list resource "nodes"' in err
    assert "at the cluster scope" in err
    assert (await kubectl("create", "clusterrole", "node-viewer", "--verb=list", "--resource=nodes"))[0] == 0
    binding = ("create", "clusterrolebinding", "reader-nodes", "--clusterrole=node-viewer")
    assert (await kubectl(*binding, "--serviceaccount=default:reader"))[0] == 0
    code, out, err = await kubectl(as_reader, "get", "nodes", "-o", "name")
    assert code == 0, err
    assert out.split() == ["node/node-1", "node/node-2", "node/node-3"]

    code, out, err = await kubectl("create", "token", "reader")
    assert code == 0 and out.count(".") == 2, err  # a JWT, from the TokenRequest API


async def test_only_those_allowed_to_impersonate_may(api_cluster: LocalCluster) -> None:
    token = await _token(api_cluster, "default", "sneaky")
    headers = {"Authorization": f"Bearer {token}", "Impersonate-User": "kubernetes-admin"}
    async with aiohttp.ClientSession() as http, http.get(f"{api_cluster.url}/api/v1/nodes", headers=headers) as r:
        status = await r.json()
    assert r.status == 403
    assert 'cannot impersonate resource "users"' in status["message"]


async def test_every_namespace_has_a_default_service_account(kubectl: KubectlRunner) -> None:
    """Pods that name no ServiceAccount run as ``default``; a kubelet asks for its token."""
    assert (await kubectl("create", "namespace", "apps"))[0] == 0
    for namespace in ("default", "apps"):
        code, out, err = await kubectl("get", "serviceaccount", "default", "-n", namespace, "-o", "name")
        assert (code, out.strip()) == (0, "serviceaccount/default"), err
    code, out, err = await kubectl("create", "token", "default", "-n", "apps")
    assert code == 0 and out.count(".") == 2, err
