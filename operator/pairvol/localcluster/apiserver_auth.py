"""Authentication and RBAC authorisation of the emulated API server (pure rules, no I/O).

Why: the chart's RBAC is a contract — the operator and agents must work with exactly the
permissions it grants. An emulator that lets everything through cannot show a missing
(or excessive) permission; this module decides, as kube-apiserver's RBAC authoriser does,
whether a user may do a request.

Over plain HTTP, Go clients (kubectl, helm) do not send bearer tokens; ``kubectl
--as=system:serviceaccount:NS:NAME`` (impersonation, allowed to the admin) is how to act
as an account from the command line. Python clients (kopf, the ``kubernetes`` client,
the operator's own) send their token and are held to its RBAC.

Authentication (bearer tokens):

* the admin token written into the local cluster's kubeconfig: user ``kubernetes-admin``
  in group ``system:masters``, which RBAC never restricts (as in a kubeadm cluster);
* ServiceAccount tokens issued by the API server (``TokenRequest``, the
  ``serviceaccounts/<name>/token`` subresource that ``kubectl create token`` and kubelets
  use): a JWT signed with HMAC-SHA256 by a key only this server process holds (Kubernetes
  signs with RSA; the claims are the same shape), valid until it expires and while the
  ServiceAccount exists with the same uid. User ``system:serviceaccount:<ns>:<name>``,
  groups ``system:serviceaccounts``, ``system:serviceaccounts:<ns>``,
  ``system:authenticated``.

Authorisation: Roles/ClusterRoles through RoleBindings/ClusterRoleBindings; rules match
verbs, apiGroups, resources (``*``, ``pods/log``, ``*/status``), resourceNames and
nonResourceURLs (exact or ``prefix*``). Every authenticated user may read discovery
(``/api``, ``/apis``, ``/version``, ``/openapi``, health), as Kubernetes' bootstrap
``system:discovery`` binding allows. Not emulated: aggregated ClusterRoles, the Node
authoriser, impersonation, escalation checks on RBAC writes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pairvol.localcluster.apiserver_logic import RequestError, ResourcePath

ADMIN_TOKEN = "pairvol-localcluster"  # the admin kubeconfig's bearer token
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "kubernetes-admin"
MASTERS = "system:masters"
AUTHENTICATED = "system:authenticated"
# Kubernetes' bootstrap system:discovery + system:public-info-viewer, for authenticated users.
DISCOVERY_URLS = ("/api", "/api/*", "/apis", "/apis/*", "/version", "/version/", "/openapi/*", "/openapi")
HEALTH_URLS = ("/healthz", "/livez", "/readyz")


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...]
    # For ServiceAccounts: the uid the token was issued for (checked against the object).
    sa_uid: str = ""

    @property
    def service_account(self) -> tuple[str, str] | None:
        """(namespace, name) of a ServiceAccount user."""
        parts = self.name.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            return parts[2], parts[3]
        return None


ADMIN = User(ADMIN_USER, (MASTERS, AUTHENTICATED))


def service_account_user(namespace: str, name: str, uid: str = "") -> User:
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED),
        uid,
    )


def impersonated(name: str, groups: tuple[str, ...]) -> User:
    """The user ``Impersonate-User``/``Impersonate-Group`` headers ask for."""
    parts = name.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        sa = service_account_user(parts[2], parts[3])
        return User(sa.name, tuple(dict.fromkeys((*sa.groups, *groups))))
    return User(name, tuple(dict.fromkeys((*groups, AUTHENTICATED))))


def impersonation_attributes(target: User, groups: tuple[str, ...]) -> list[Attributes]:
    """What the impersonator must be allowed: ``impersonate`` on the user/SA and each group."""
    sa = target.service_account
    if sa is not None:
        checks = [Attributes("impersonate", "", True, "", "serviceaccounts", "", sa[0], sa[1])]
    else:
        checks = [Attributes("impersonate", "", True, "", "users", "", "", target.name)]
    return checks + [Attributes("impersonate", "", True, "", "groups", "", "", g) for g in groups]


# ---------------------------------------------------------------- tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(key: bytes, namespace: str, name: str, uid: str, now: int, expires_in: int) -> str:
    """A ServiceAccount token (JWT, HS256) for ``namespace/name``, valid ``expires_in`` seconds."""
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "iss": ISSUER,
        "aud": [ISSUER],
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "iat": now,
        "nbf": now,
        "exp": now + expires_in,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
    }
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def verify_token(key: bytes, token: str, now: float) -> User | None:
    """The ServiceAccount user a token of ours names, or None (bad signature, expired, not ours)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(expected, _unb64(parts[2])):
            return None
        claims = json.loads(_unb64(parts[1]))
        info = claims["kubernetes.io"]
        namespace, sa, uid = info["namespace"], info["serviceaccount"]["name"], info["serviceaccount"]["uid"]
        if not claims["nbf"] <= now < claims["exp"]:
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return service_account_user(str(namespace), str(sa), str(uid))


# ---------------------------------------------------------------- request attributes


@dataclass(frozen=True)
class Attributes:
    """What a request does, in RBAC's terms."""

    verb: str
    path: str
    resource_request: bool
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""


def attributes(method: str, path: str, rpath: ResourcePath | None, watch: bool) -> Attributes:
    """RBAC attributes of a request: verbs get/list/watch/create/update/patch/delete/deletecollection."""
    method = method.upper()
    if rpath is None or rpath.plural is None:
        return Attributes(method.lower(), path, False)
    named = rpath.name is not None
    if method == "GET":
        verb = "watch" if watch or rpath.legacy_watch else ("get" if named else "list")
    else:
        verb = {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection",
        }.get(method, method.lower())
    # POST to a subresource of a named object (serviceaccounts/x/token) creates the subresource.
    name = rpath.name or ""
    namespace = rpath.namespace or ""
    if rpath.plural == "namespaces" and not rpath.group:
        namespace = name  # a Namespace is authorised in itself, as Kubernetes does
    return Attributes(verb, path, True, rpath.group, rpath.plural, rpath.subresource or "", namespace, name)


# ---------------------------------------------------------------- RBAC


def _rule_matches(rule: Mapping[str, Any], attrs: Attributes) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and attrs.verb not in verbs:
        return False
    if not attrs.resource_request:
        urls = rule.get("nonResourceURLs") or []
        return any(u == "*" or u == attrs.path or (u.endswith("*") and attrs.path.startswith(u[:-1])) for u in urls)
    groups = rule.get("apiGroups") or []
    if "*" not in groups and attrs.group not in groups:
        return False
    combined = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    resources = rule.get("resources") or []
    if not any(r in ("*", combined) or (attrs.subresource and r == f"*/{attrs.subresource}") for r in resources):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


def _subject_matches(subject: Mapping[str, Any], user: User, binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return bool(name == user.name)
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return f"system:serviceaccount:{namespace}:{name}" == user.name
    return False


@dataclass(frozen=True)
class RBAC:
    """A snapshot of the RBAC objects: ``roles`` and ``role_bindings`` keyed by (namespace, name)."""

    roles: Mapping[tuple[str, str], Mapping[str, Any]]
    cluster_roles: Mapping[str, Mapping[str, Any]]
    role_bindings: Iterable[Mapping[str, Any]]
    cluster_role_bindings: Iterable[Mapping[str, Any]]

    def _rules(self, ref: Mapping[str, Any], namespace: str) -> list[Mapping[str, Any]]:
        role = (
            self.cluster_roles.get(ref.get("name", ""))
            if ref.get("kind") == "ClusterRole"
            else self.roles.get((namespace, ref.get("name", "")))
        )
        return list(role.get("rules") or []) if role else []

    def _grants(self, binding: Mapping[str, Any], user: User, attrs: Attributes, namespace: str) -> bool:
        subjects = binding.get("subjects") or []
        if not any(_subject_matches(s, user, namespace) for s in subjects):
            return False
        return any(_rule_matches(r, attrs) for r in self._rules(binding.get("roleRef") or {}, namespace))

    def allows(self, user: User, attrs: Attributes) -> bool:
        if MASTERS in user.groups:
            return True
        discovery = {"verbs": ["get"], "nonResourceURLs": (*DISCOVERY_URLS, *HEALTH_URLS)}
        if AUTHENTICATED in user.groups and _rule_matches(discovery, attrs):
            return True
        if any(self._grants(b, user, attrs, "") for b in self.cluster_role_bindings):
            return True
        if not (attrs.resource_request and attrs.namespace):
            return False
        return any(
            self._grants(b, user, attrs, attrs.namespace)
            for b in self.role_bindings
            if b.get("metadata", {}).get("namespace", "") == attrs.namespace
        )


def forbidden(user: User, attrs: Attributes, namespaced: bool) -> RequestError:
    """The 403 Status kube-apiserver answers, worded the same way."""
    if not attrs.resource_request:
        return RequestError(403, "Forbidden", f'forbidden: User "{user.name}" cannot {attrs.verb} path "{attrs.path}"')
    combined = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    qualified = f"{attrs.resource}.{attrs.group}" if attrs.group else attrs.resource
    what = f'{qualified} "{attrs.name}"' if attrs.name else qualified
    where = f'in the namespace "{attrs.namespace}"' if namespaced and attrs.namespace else "at the cluster scope"
    message = (
        f'{what} is forbidden: User "{user.name}" cannot {attrs.verb} resource "{combined}" '
        f'in API group "{attrs.group}" {where}'
    )
    details = {"group": attrs.group, "kind": attrs.resource, **({"name": attrs.name} if attrs.name else {})}
    return RequestError(403, "Forbidden", message, details)


def unauthorized() -> RequestError:
    return RequestError(401, "Unauthorized", "Unauthorized")
