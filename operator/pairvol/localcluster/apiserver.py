"""An emulated Kubernetes API server, strict where mocks are lenient.

Why: these machines have no kube-apiserver, yet the real kopf operator, the ``kubernetes``
client and ``kubectl`` must run against something that behaves like one. kmock's
``KubernetesScaffold`` provides the HTTP server, API discovery (``/api``, ``/apis``,
``/apis/<group>/<version>``, ``/version``) and its DSL of reactions (still usable for
fault injection: ``api["patch", kmock.resource(...)] << 503``). kmock's own emulator
stores objects with merge-everything semantics, so :class:`APIServer` replaces that
store with :class:`~pairvol.localcluster.apiserver_store.ObjectStore`, which applies
Kubernetes' rules (status subresource, generation, resourceVersion conflicts,
finalizers, graceful pod deletion, garbage collection, CRD schema admission with CEL
rules).

This module is the wire side:

* resource URLs, including ``/api/v1/namespaces/<name>`` (kmock's path parser takes
  ``namespaces`` for a namespace prefix and fails);
* the ``scale`` subresource of Deployments, ReplicaSets and StatefulSets (autoscaling/v1
  Scale: ``kubectl scale``);
* GET/LIST (label and field selectors, ``as=Table`` server-side printing with the CRD's
  printer columns), POST, PUT, DELETE (with preconditions and ``propagationPolicy``),
  ``dryRun=All``, ``fieldValidation=Strict|Warn|Ignore`` (Warn is the default, sent as
  ``Warning`` headers);
* authentication (the admin token, ServiceAccount tokens from ``serviceaccounts/<name>/token``,
  impersonation) and RBAC authorisation with 403 answers, see
  :mod:`~pairvol.localcluster.apiserver_auth`; every Namespace gets its ``default``
  ServiceAccount;
* request bodies in JSON, YAML or protobuf (the built-in kinds kubectl's and helm's
  typed clients send; see :mod:`~pairvol.localcluster.apiserver_protobuf`);
* PATCH: merge, json, strategic merge for built-in kinds (415 for custom resources, as
  in Kubernetes) and server-side apply as a merge without field ownership;
* watches: ``?watch=true`` JSON lines, resourceVersion replay, 410 Gone for compacted
  versions, bookmarks, ``timeoutSeconds``, selector enter/leave as ADDED/DELETED;
* ``/openapi/v3`` deep enough for kubectl's server-side field validation and ``kubectl
  explain`` of CRDs; ``pods/<name>/log`` for ``kubectl logs [-f]``;
* ``Status`` objects for 400/401/403/404/405/409/410/415/422.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal.rendering import ReactionMismatchError  # not re-exported in __all__

from pairvol.aio import bounded
from pairvol.errors import PairvolError
from pairvol.localcluster import apiserver_auth as auth
from pairvol.localcluster import apiserver_protobuf as protobuf
from pairvol.localcluster.apiserver_builtin import (
    ResourceType,
)
from pairvol.localcluster.apiserver_logic import (
    PATCH_TYPES,
    SCALABLE,
    RequestError,
    Requirement,
    ResourcePath,
    bad_request,
    parse_field_selector,
    parse_label_selector,
    parse_resource_path,
    scale_of,
    scaled,
    selector_matches,
    table,
)
from pairvol.localcluster.apiserver_store import HISTORY, ObjectStore, Watch

logger = logging.getLogger(__name__)

ObjKey = tuple[str, str]  # (namespace or "", name)
TypeKey = tuple[str, str]  # (group, plural)

_CLIENT_KEY = "pairvol.client"  # who made a request, kept on the aiohttp request for its watch
_KEEP_REQUESTS = 200  # kmock keeps every request for assertions; bound it for long runs


class APIServerError(PairvolError):
    """The emulated API server could not start or was misused."""


def _wants_table(request: kmock.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "as=Table" in accept


def _status_response(error: RequestError) -> aiohttp.web.Response:
    return aiohttp.web.json_response(error.status(), status=error.code)


@attrs.define(kw_only=True)
class APIServer(kmock.KubernetesScaffold, ObjectStore):
    """The request handler; serve it with :func:`serve` or ``kmock.Server(handler)``.

    ``history_limit`` is how many watch events per resource are kept for replay from a
    resourceVersion; older versions get 410 Gone, as after etcd compaction.
    """

    history_limit: int = HISTORY
    # Where `kubectl logs` reads a pod's output: (pod object) -> log file or None.
    # LocalCluster points it at the node simulator's per-pod log files.
    log_source: Callable[[dict[str, Any]], Path | None] | None = None
    # Bearer token of the admin kubeconfig (user kubernetes-admin, group system:masters).
    admin_token: str = auth.ADMIN_TOKEN
    # Requests without an Authorization header: True serves them as the in-process control
    # plane (the node simulator's own client, tests speaking raw HTTP); False answers 401.
    # Requests that carry a token are always authenticated and authorised by RBAC.
    trust_unauthenticated: bool = True
    # kube-apiserver's --service-account-max-token-expiration: a TokenRequest asking for a
    # longer life gets this many seconds (tests make tokens short-lived, so that a client
    # which does not follow the kubelet's rotation of its token file fails within the test).
    max_token_expiration_s: int | None = None
    _token_key: bytes = attrs.field(factory=lambda: secrets.token_bytes(32), init=False)
    # The latest refused requests (user, attributes): what a test asserts about RBAC.
    denied: collections.deque[tuple[str, auth.Attributes]] = attrs.field(
        factory=lambda: collections.deque(maxlen=_KEEP_REQUESTS), init=False
    )
    # What a real API server would pay, for ``make bench-scale``: resource requests counted
    # by (client, verb, resource[/subresource]) and watch events sent by (client, resource).
    # The client is the authenticated user (a ServiceAccount is ``system:serviceaccount:
    # <ns>:<name>``), or ``control-plane`` for the in-process kubelets and controllers.
    request_counts: collections.Counter[tuple[str, str, str]] = attrs.field(factory=collections.Counter, init=False)
    watch_events: collections.Counter[tuple[str, str]] = attrs.field(factory=collections.Counter, init=False)
    # The latest requests answered 401 (method, path with query): how often a client with
    # refused credentials comes back is what a test asserts about retry storms.
    unauthorized: collections.deque[tuple[str, str]] = attrs.field(
        factory=lambda: collections.deque(maxlen=_KEEP_REQUESTS), init=False
    )

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._init_store(self.history_limit)

    def _on_register(self, rtype: ResourceType) -> None:
        # kmock's scaffold serves discovery (/api, /apis, /apis/<g>/<v>) from this registry.
        self.resources[kmock.resource(rtype.group, rtype.version, rtype.plural)] = kmock.ResourceInfo(
            kind=rtype.kind,
            singular=rtype.singular,
            namespaced=rtype.namespaced,
            verbs=set(rtype.verbs),
            shortnames=set(rtype.short_names),
            categories=set(rtype.categories),
            subresources=({"status"} if rtype.status_subresource else set())
            | ({"scale"} if rtype.key in SCALABLE else set()),
        )

    def _on_unregister(self, rtype: ResourceType) -> None:
        del self.resources[kmock.resource(rtype.group, rtype.version, rtype.plural)]

    # ------------------------------------------------------------------ HTTP

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve resource URLs from the store; everything else through kmock."""
        rpath = parse_resource_path(raw.path)
        try:
            user = self._authorize(raw, rpath)
        except RequestError as exc:
            if exc.code == 401:
                self.unauthorized.append((raw.method, raw.path_qs))
            return _status_response(exc)
        if rpath is not None and rpath.plural is not None:
            client = user.name if user is not None else "control-plane"
            watch = str(raw.query.get("watch", "")).lower() in ("true", "1")
            verb = auth.attributes(raw.method, raw.path, rpath, watch).verb
            resource = f"{rpath.plural}/{rpath.subresource}" if rpath.subresource else rpath.plural
            self.request_counts[(client, verb, resource)] += 1
            raw[_CLIENT_KEY] = client
        if rpath is None or rpath.plural is None:
            if raw.path.startswith("/openapi/"):
                try:
                    return self._serve_openapi(raw.path)
                except RequestError as exc:
                    return _status_response(exc)
            if raw.path in ("/healthz", "/readyz", "/livez"):
                return aiohttp.web.Response(text="ok")
            response: aiohttp.web.StreamResponse = await super().__call__(raw)
            return response
        body = await raw.read()
        data: Any
        if raw.headers.get("Content-Type", "").split(";")[0].strip() == protobuf.MEDIA_TYPE:
            # client-go's typed clients (kubectl create ns, helm's release Secrets).
            try:
                data = protobuf.decode_body(body)
            except RequestError as exc:
                return _status_response(exc)
            text = json.dumps(data)
        else:
            text = body.decode("utf-8", errors="replace")
            try:
                data = json.loads(text) if text else None
            except ValueError:
                data = None
        request = kmock.Request(
            id=len(self._requests),
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=dict(raw.query),
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=text,
            data=data,
            resource=kmock.resource(rpath.group, rpath.version, rpath.plural),
            namespace=rpath.namespace,
            name=rpath.name,
            subresource=rpath.subresource,
        )
        self._requests.append(request)
        del self._requests[:-_KEEP_REQUESTS]
        reaction = await self._user_reaction(request)
        if reaction is not None:
            return reaction
        try:
            return await self._serve_resource(request, rpath)
        except RequestError as exc:
            return _status_response(exc)
        except Exception as exc:
            logger.exception("internal error serving %s %s", raw.method, raw.path_qs)
            return _status_response(
                RequestError(500, "InternalError", f"internal error in the emulated API server: {exc!r}")
            )

    def create_object(
        self,
        group: str,
        version: str,
        plural: str,
        body: dict[str, Any],
        namespace: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Create as the store does; a new Namespace gets its ``default`` ServiceAccount, as
        kube-controller-manager's serviceaccount controller gives it (pods name it implicitly)."""
        obj = super().create_object(group, version, plural, body, namespace, dry_run=dry_run)
        if (group, plural) == ("", "namespaces") and not dry_run:
            ns = obj["metadata"]["name"]
            if ("", "serviceaccounts") in self._kinds and (ns, "default") not in self._kinds[
                ("", "serviceaccounts")
            ].objects:
                account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}
                super().create_object("", "v1", "serviceaccounts", account, ns)
        return obj

    # ------------------------------------------------------------------ auth

    def issue_token(self, namespace: str, name: str, expiration_seconds: int = 3600) -> str:
        """A token for ServiceAccount ``namespace/name`` (what TokenRequest returns)."""
        sa = self.get_object(self.resource_type("", "v1", "serviceaccounts"), namespace, name)
        return auth.issue_token(
            self._token_key, namespace, name, sa["metadata"]["uid"], int(time.time()), expiration_seconds
        )

    def authenticate(self, header: str | None) -> auth.User | None:
        """The user an Authorization header names; None when absent and trusted; else 401."""
        if not header:
            if self.trust_unauthenticated:
                return None
            raise auth.unauthorized()
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise auth.unauthorized()
        if secrets.compare_digest(token, self.admin_token):
            return auth.ADMIN
        user = auth.verify_token(self._token_key, token, time.time())
        sa = user.service_account if user is not None else None
        if user is None or sa is None:
            raise auth.unauthorized()
        stored = self._kinds[("", "serviceaccounts")].objects.get(sa)
        if stored is None or stored["metadata"].get("uid") != user.sa_uid:
            raise auth.unauthorized()  # the ServiceAccount was deleted (or re-created)
        return user

    def rbac(self) -> auth.RBAC:
        """The RBAC objects as they are now."""

        def objects(plural: str) -> dict[tuple[str, str], dict[str, Any]]:
            kind = self._kinds.get(("rbac.authorization.k8s.io", plural))
            return kind.objects if kind is not None else {}

        return auth.RBAC(
            roles=objects("roles"),
            cluster_roles={name: obj for (_, name), obj in objects("clusterroles").items()},
            role_bindings=list(objects("rolebindings").values()),
            cluster_role_bindings=list(objects("clusterrolebindings").values()),
        )

    def _authorize(self, raw: aiohttp.web.BaseRequest, rpath: ResourcePath | None) -> auth.User | None:
        user = self.authenticate(raw.headers.get("Authorization"))
        as_user = raw.headers.get("Impersonate-User")
        if as_user:  # kubectl --as=USER [--as-group=G]: act as USER if allowed to impersonate
            user = self._impersonate(user or auth.ADMIN, as_user, tuple(raw.headers.getall("Impersonate-Group", ())))
        if user is None:
            return None
        watch = str(raw.query.get("watch", "")).lower() in ("true", "1")
        attributes = auth.attributes(raw.method, raw.path, rpath, watch)
        if not self.rbac().allows(user, attributes):
            namespaced = True
            if rpath is not None and rpath.plural is not None:
                with contextlib.suppress(RequestError):
                    namespaced = self.resource_type(rpath.group, rpath.version, rpath.plural).namespaced
            logger.debug("forbidden: %s %s for %s", raw.method, raw.path_qs, user.name)
            self.denied.append((user.name, attributes))
            raise auth.forbidden(user, attributes, namespaced)
        return user

    def _impersonate(self, actor: auth.User, name: str, groups: tuple[str, ...]) -> auth.User:
        target = auth.impersonated(name, groups)
        rbac = self.rbac()
        for attributes in auth.impersonation_attributes(target, groups):
            if not rbac.allows(actor, attributes):
                raise auth.forbidden(actor, attributes, namespaced=bool(attributes.namespace))
        return target

    def _serve_token_request(self, request: kmock.Request, namespace: str, name: str) -> aiohttp.web.Response:
        """``POST serviceaccounts/<name>/token`` (TokenRequest), as ``kubectl create token`` sends."""
        body = request.data if isinstance(request.data, dict) else {}
        raw_spec = body.get("spec")
        spec: dict[str, Any] = raw_spec if isinstance(raw_spec, dict) else {}
        expiration = spec.get("expirationSeconds", 3600)
        if not isinstance(expiration, int) or isinstance(expiration, bool) or not 600 <= expiration <= 2**32:
            raise bad_request("spec.expirationSeconds must be an integer of at least 600 (10 minutes)")
        if self.max_token_expiration_s is not None:
            expiration = min(expiration, self.max_token_expiration_s)
        token = self.issue_token(namespace, name, expiration)
        expires = datetime.datetime.fromtimestamp(time.time() + expiration, datetime.UTC)
        out = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"audiences": [auth.ISSUER], "expirationSeconds": expiration, **spec},
            "status": {"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
        }
        return aiohttp.web.json_response(out, status=201)

    async def _user_reaction(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        """Let kmock DSL reactions (``api['patch', resource] << 503``) override the store.

        This keeps kmock's fault injection: a test can make lease renewals fail or pod
        lists hang. Fallback reactions (kmock's own discovery) never shadow the store.
        """
        candidates = [p for p in self._payloads if not (p.priorities and p.priorities[0] == -math.inf)]
        candidates.sort(key=lambda p: tuple(-x for x in p.priorities), reverse=False)
        for payload in candidates:
            if payload._disabled.is_set() or request not in payload._source:
                continue
            try:
                response: aiohttp.web.StreamResponse = await payload(request)
            except ReactionMismatchError:  # depleted or not matching after all
                payload._disabled.set()
                continue
            except NotImplementedError:
                continue
            return response
        return None

    async def _serve_server_version(self, request: kmock.Request) -> dict[str, Any]:
        # Match the kubectl we ship (1.32) so it does not warn about version skew.
        return {
            "major": "1",
            "minor": "32",
            "gitVersion": "v1.32.0-pairvol-localcluster",
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "",
            "goVersion": "",
            "compiler": "pairvol",
            "platform": "linux/amd64",
        }

    async def _serve_version(self, request: kmock.Request) -> dict[str, Any]:
        # kmock reports the core group-version as "/v1"; Kubernetes says "v1".
        if request.resource is not None and not request.resource.group and request.resource.version != "v1":
            raise kmock.KubernetesNotFoundError()
        result = await super()._serve_version(request)
        assert isinstance(result, dict)
        result["groupVersion"] = result["groupVersion"].lstrip("/")
        for entry in result["resources"]:
            if "/" in entry["name"]:  # subresources have no short names or categories
                entry["shortNames"], entry["categories"] = [], []
                entry["verbs"] = ["get", "patch", "update"]
            if entry["name"].endswith("/scale"):  # what client-go's scale client resolves
                entry.update(group="autoscaling", version="v1", kind="Scale", singularName="")
        return result

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        # kmock's messages teach test authors its DSL; clients of a cluster expect Kubernetes'.
        if isinstance(exc, kmock.KubernetesNotFoundError):
            return _status_response(RequestError(404, "NotFound", "the server could not find the requested resource"))
        logger.error("internal error in the emulated API server: %r", exc)
        return _status_response(
            RequestError(500, "InternalError", f"internal error in the emulated API server: {exc!r}")
        )

    async def _serve_log(self, request: kmock.Request, namespace: str, name: str) -> aiohttp.web.StreamResponse:
        """``GET pods/<name>/log`` (``kubectl logs [-f] [--tail N]``) from the pod's log file."""
        rtype = self.resource_type("", "v1", "pods")
        pod = self.get_object(rtype, namespace, name)
        path = self.log_source(pod) if self.log_source is not None else None
        if path is None:
            raise RequestError(
                400,
                "BadRequest",
                f'no logs for pod "{name}": this cluster runs no node simulator, or the pod has not started',
            )
        tail = request.params.get("tailLines")
        try:
            data = await asyncio.to_thread(_read_log, path, int(tail) if tail else None)
        except ValueError:
            raise bad_request("tailLines must be an integer") from None
        follow = str(request.params.get("follow", "")).lower() in ("true", "1")
        if not follow:
            return aiohttp.web.Response(body=data, content_type="text/plain")
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(raw)
        await response.write(data)
        offset = await asyncio.to_thread(_file_size, path)
        try:
            while not self._closing and (namespace, name) in self._kinds[rtype.key].objects:
                chunk, offset = await asyncio.to_thread(_read_from, path, offset)
                if chunk:
                    await response.write(chunk)
                else:
                    await asyncio.sleep(0.3)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    def _serve_openapi(self, path: str) -> aiohttp.web.Response:
        """OpenAPI v3 just deep enough for kubectl to use server-side field validation.

        kubectl looks for a PATCH operation of the kind with a ``fieldValidation`` query
        parameter; finding it, it leaves validation to us (422/400 answers) instead of
        downloading the protobuf OpenAPI v2 document, which we do not serve.
        """
        path = path.rstrip("/")
        gvs = sorted({(t.group, t.version) for t in self._types.values()})

        def gv_path(group: str, version: str) -> str:
            return f"api/{version}" if not group else f"apis/{group}/{version}"

        if path == "/openapi/v3":
            # kubectl caches documents by this hash (~/.kube/cache): it must change with them.
            def url(g: str, v: str) -> str:
                doc = json.dumps(self._openapi_gv(g, v), sort_keys=True).encode()
                digest = hashlib.sha256(doc).hexdigest()[:32].upper()
                return f"/openapi/v3/{gv_path(g, v)}?hash={digest}"

            paths = {gv_path(g, v): {"serverRelativeURL": url(g, v)} for g, v in gvs}
            return aiohttp.web.json_response({"paths": paths})
        for group, version in gvs:
            if path == f"/openapi/v3/{gv_path(group, version)}":
                return aiohttp.web.json_response(self._openapi_gv(group, version))
        raise RequestError(404, "NotFound", f"no OpenAPI document at {path}")

    def _openapi_gv(self, group: str, version: str) -> dict[str, Any]:
        params = [
            {"name": n, "in": "query", "schema": {"type": "string"}}
            for n in ("dryRun", "fieldManager", "fieldValidation", "force")
        ]
        paths: dict[str, Any] = {}
        schemas: dict[str, Any] = {}
        for t in self._types.values():
            if (t.group, t.version) != (group, version):
                continue
            crd_schema = self._schemas.get(t.ident)
            if crd_schema is not None:  # lets `kubectl explain` describe our CRs
                name = ".".join([*reversed(group.split(".")), version, t.kind])
                schemas[name] = {
                    **crd_schema,
                    "x-kubernetes-group-version-kind": [{"group": group, "version": version, "kind": t.kind}],
                }
            prefix = "/api/v1" if not group else f"/apis/{group}/{version}"
            ns = "/namespaces/{namespace}" if t.namespaced else ""
            gvk = {"group": group, "version": version, "kind": t.kind}
            op = {
                "x-kubernetes-group-version-kind": gvk,
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
            }
            paths[f"{prefix}{ns}/{t.plural}"] = {"post": op}
            paths[f"{prefix}{ns}/{t.plural}/{{name}}"] = {"put": op, "patch": op}
        return {
            "openapi": "3.0.0",
            "info": {"title": "pairvol localcluster", "version": version},
            "paths": paths,
            "components": {"schemas": schemas},
        }

    async def _serve_resource(self, request: kmock.Request, rpath: ResourcePath) -> aiohttp.web.StreamResponse:
        assert rpath.plural is not None
        rtype = self.resource_type(rpath.group, rpath.version, rpath.plural)
        sub = rpath.subresource
        if sub == "log" and rtype.key == ("", "pods") and rpath.name and request.method == "GET":
            return await self._serve_log(request, rpath.namespace or "", rpath.name)
        if sub == "token" and rtype.key == ("", "serviceaccounts") and rpath.name and request.method == "POST":
            return self._serve_token_request(request, rpath.namespace or "", rpath.name)
        if sub == "scale" and rtype.key in SCALABLE and rpath.name:
            return self._serve_scale(request, rtype, self._check_namespace(rtype, request.namespace), rpath.name)
        if sub is not None and not (sub == "status" and rtype.status_subresource):
            raise RequestError(
                404, "NotFound", f"the server could not find the requested resource ({rtype.plural}/{sub})"
            )
        params = request.params
        dry_run = params.get("dryRun") == "All"
        mode = params.get("fieldValidation") or "Warn"
        if mode not in ("Strict", "Warn", "Ignore"):
            raise bad_request(f"fieldValidation must be Strict, Warn or Ignore, not {mode!r}")
        self._field_validation, self._warnings = mode, []
        response = await self._dispatch(request, rtype, rpath, params, dry_run)
        if self._warnings and not response.prepared:
            response.headers["Warning"] = ", ".join(f"299 - {json.dumps(w)}" for w in self._warnings)
        self._field_validation, self._warnings = "Ignore", []
        return response

    async def _dispatch(
        self,
        request: kmock.Request,
        rtype: ResourceType,
        rpath: ResourcePath,
        params: Any,
        dry_run: bool,
    ) -> aiohttp.web.StreamResponse:
        name, sub = rpath.name, rpath.subresource
        method = str(request.method.value).upper()
        ns_param = request.namespace
        watch = rpath.legacy_watch or str(params.get("watch", "")).lower() in ("true", "1")
        if method == "GET" and watch:
            namespace = ns_param if rtype.namespaced else None
            return await self._serve_watch(request, rtype, namespace, name)
        if name is None:
            if method == "GET":
                namespace = ns_param if rtype.namespaced else None
                if ns_param and not rtype.namespaced:
                    self._check_namespace(rtype, ns_param)
                return self._serve_list(request, rtype, namespace)
            if method == "POST":
                body = self._body(request)
                obj = self.create_object(rtype.group, rtype.version, rtype.plural, body, ns_param, dry_run=dry_run)
                return aiohttp.web.json_response(self._present(rtype, obj), status=201)
            if method == "DELETE":
                namespace = ns_param if rtype.namespaced else None
                labels = parse_label_selector(params.get("labelSelector", ""))
                fields = parse_field_selector(params.get("fieldSelector", ""))
                items = []
                for obj in self.list_objects(rtype, namespace, labels, fields):
                    meta = obj["metadata"]
                    items.append(self.delete_object(rtype, meta.get("namespace", ""), meta["name"], dry_run=dry_run))
                return aiohttp.web.json_response(self._list_body(rtype, items))
            raise RequestError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        ns = self._check_namespace(rtype, ns_param)
        if method == "GET":
            obj = self.get_object(rtype, ns, name)
            if _wants_table(request):
                return aiohttp.web.json_response(self._table(request, rtype, [obj]))
            return aiohttp.web.json_response(obj)
        if method == "PUT":
            body = self._body(request)
            obj = self.update_object(rtype, ns, name, body, sub, require_rv=True, dry_run=dry_run)
            return aiohttp.web.json_response(self._present(rtype, obj))
        if method == "PATCH":
            return self._serve_patch(request, rtype, ns, name, sub, dry_run)
        if method == "DELETE":
            options = dict(request.data) if isinstance(request.data, dict) else {}
            if "gracePeriodSeconds" in params and "gracePeriodSeconds" not in options:
                try:  # the query parameter (client libraries) as the body's field (kubectl)
                    options["gracePeriodSeconds"] = int(params["gracePeriodSeconds"])
                except ValueError:
                    wrong = params["gracePeriodSeconds"]
                    raise bad_request(f"gracePeriodSeconds must be an integer, not {wrong!r}") from None
            obj = self.delete_object(rtype, ns, name, options or None, dry_run=dry_run)
            return aiohttp.web.json_response(self._present(rtype, obj))
        raise RequestError(405, "MethodNotAllowed", f"{method} is not supported on an object")

    def _body(self, request: kmock.Request) -> dict[str, Any]:
        data = request.data
        if not isinstance(data, dict):
            text = request.text
            try:
                data = yaml.safe_load(text) if text else None
            except yaml.YAMLError as exc:
                raise bad_request(f"the request body is neither JSON nor YAML: {exc}") from None
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object (the Kubernetes object)")
        return data

    def _serve_patch(
        self,
        request: kmock.Request,
        rtype: ResourceType,
        ns: str,
        name: str,
        sub: str | None,
        dry_run: bool,
    ) -> aiohttp.web.StreamResponse:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        patcher = PATCH_TYPES.get(ctype)
        if patcher is None or (rtype.custom and "strategic" in ctype):
            accepted = [t for t in PATCH_TYPES if not (rtype.custom and "strategic" in t)]
            raise RequestError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(accepted)} (got {ctype!r})",
            )
        if ctype.startswith("application/apply-patch"):
            patch: Any = self._body(request)
        else:
            try:
                patch = json.loads(request.text or "null")
            except ValueError as exc:
                raise bad_request(f"the patch is not valid JSON: {exc}") from None
        current = self._kinds[rtype.key].objects.get((ns, name))
        if current is None:
            if ctype.startswith("application/apply-patch") and sub is None:
                obj = self.create_object(rtype.group, rtype.version, rtype.plural, patch, ns, dry_run=dry_run)
                return aiohttp.web.json_response(self._present(rtype, obj), status=201)
            raise self._not_found(rtype, name)
        if ctype.startswith("application/apply-patch") and isinstance(patch, dict):
            patch = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
        patched = patcher(self._present(rtype, current), patch)
        if not isinstance(patched, dict):
            raise bad_request("the patch must result in a JSON object")
        patched.setdefault("metadata", {})
        if isinstance(patched["metadata"], dict):
            patched["metadata"].setdefault("name", name)
        obj = self.update_object(rtype, ns, name, patched, sub, require_rv=False, dry_run=dry_run)
        return aiohttp.web.json_response(self._present(rtype, obj))

    def _serve_scale(
        self, request: kmock.Request, rtype: ResourceType, ns: str, name: str
    ) -> aiohttp.web.StreamResponse:
        """``<workload>/scale``: GET the Scale; PUT or PATCH it to set spec.replicas."""
        method = str(request.method.value).upper()
        current = self.get_object(rtype, ns, name)
        if method == "GET":
            return aiohttp.web.json_response(scale_of(current))
        if method == "PUT":
            wanted: Any = self._body(request)
        elif method == "PATCH":
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            patcher = PATCH_TYPES.get(ctype)
            if patcher is None or ctype.startswith("application/apply-patch"):
                raise RequestError(
                    415, "UnsupportedMediaType", f"a Scale takes a JSON, merge or strategic merge patch, not {ctype!r}"
                )
            try:
                patch = json.loads(request.text or "null")
            except ValueError as exc:
                raise bad_request(f"the patch is not valid JSON: {exc}") from None
            wanted = patcher(scale_of(current), patch)
        else:
            raise RequestError(405, "MethodNotAllowed", f"{method} is not supported on {rtype.plural}/scale")
        dry_run = request.params.get("dryRun") == "All"
        obj = self.update_object(rtype, ns, name, scaled(current, wanted), None, require_rv=False, dry_run=dry_run)
        return aiohttp.web.json_response(scale_of(obj))

    def _list_body(self, rtype: ResourceType, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": rtype.api_version,
            "kind": f"{rtype.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _table(self, request: kmock.Request, rtype: ResourceType, objs: list[dict[str, Any]]) -> dict[str, Any]:
        result = table(objs, list(rtype.printer_columns), str(self._rv))
        include = request.params.get("includeObject", "Metadata")
        for row, obj in zip(result["rows"], objs, strict=True):
            if include == "Object":
                row["object"] = obj
            elif include == "None":
                row.pop("object")
        return result

    def _serve_list(
        self, request: kmock.Request, rtype: ResourceType, namespace: str | None
    ) -> aiohttp.web.StreamResponse:
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))
        items = self.list_objects(rtype, namespace, labels, fields)
        if _wants_table(request):
            return aiohttp.web.json_response(self._table(request, rtype, items))
        return aiohttp.web.json_response(self._list_body(rtype, items))

    async def _serve_watch(
        self,
        request: kmock.Request,
        rtype: ResourceType,
        namespace: str | None,
        name: str | None,
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""))
        if name is not None:
            fields.append(Requirement("metadata.name", "=", (name,)))
        try:
            timeout = float(params.get("timeoutSeconds") or 1800)
        except ValueError:
            raise bad_request("timeoutSeconds must be a number") from None
        bookmarks = str(params.get("allowWatchBookmarks", "")).lower() in ("true", "1")
        as_table = _wants_table(request)
        rv_param = params.get("resourceVersion") or ""
        kind = self._kinds[rtype.key]
        watch = Watch(asyncio.Queue(), namespace)
        initial: list[tuple[str, dict[str, Any]]] = []
        # Streaming lists (WatchList, used by `kubectl wait`): initial ADDED events, then a
        # bookmark annotated k8s.io/initial-events-end, then changes.
        send_initial = str(params.get("sendInitialEvents", "")).lower() == "true"
        initial_rv = self._rv
        if rv_param in ("", "0") or send_initial:
            initial = [("ADDED", o) for o in self.list_objects(rtype, namespace, labels, fields)]
        if rv_param not in ("", "0") and not send_initial:
            try:
                since = int(rv_param)
            except ValueError:
                raise bad_request(f"invalid resourceVersion {rv_param!r}") from None
            if since < kind.compacted_rv:
                return await self._stream_gone(request, since)
            for entry in kind.history:
                if entry[0] > since and (namespace is None or entry[2]["metadata"].get("namespace") == namespace):
                    watch.queue.put_nowait(entry)
        kind.watches.append(watch)
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
            for etype, obj in initial:
                await self._write_event(response, request, rtype, etype, obj, as_table)
            if send_initial:
                await self._write_bookmark(response, rtype, initial_rv, initial_events_end=True)
            deadline = time.monotonic() + timeout
            while not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = await bounded(watch.queue.get(), timeout=min(left, 10.0))
                except TimeoutError:
                    if bookmarks:
                        await self._write_bookmark(response, rtype)
                    continue
                if item is None:
                    break
                _, etype, stored, stored_old = item
                obj = self._present(rtype, stored)
                old = self._present(rtype, stored_old) if stored_old is not None else None
                now_match = selector_matches(obj, labels, fields)
                was_match = old is not None and selector_matches(old, labels, fields)
                if etype == "MODIFIED" and now_match and not was_match:
                    etype = "ADDED"
                elif etype == "MODIFIED" and was_match and not now_match:
                    etype, now_match = "DELETED", True
                elif etype == "DELETED":
                    now_match = now_match or was_match
                if now_match:
                    await self._write_event(response, request, rtype, etype, obj, as_table)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away; nothing to clean up but the registration
        finally:
            with contextlib.suppress(ValueError):
                kind.watches.remove(watch)
        return response

    async def _write_event(
        self,
        response: aiohttp.web.StreamResponse,
        request: kmock.Request,
        rtype: ResourceType,
        etype: str,
        obj: dict[str, Any],
        as_table: bool,
    ) -> None:
        payload = self._table(request, rtype, [obj]) if as_table else obj
        raw = request._raw_request
        self.watch_events[(str(raw.get(_CLIENT_KEY, "control-plane")) if raw is not None else "?", rtype.plural)] += 1
        line = json.dumps({"type": etype, "object": payload}) + "\n"
        await response.write(line.encode())

    async def _write_bookmark(
        self,
        response: aiohttp.web.StreamResponse,
        rtype: ResourceType,
        rv: int | None = None,
        *,
        initial_events_end: bool = False,
    ) -> None:
        meta: dict[str, Any] = {"resourceVersion": str(self._rv if rv is None else rv)}
        if initial_events_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        obj = {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta}
        await response.write((json.dumps({"type": "BOOKMARK", "object": obj}) + "\n").encode())

    async def _stream_gone(self, request: kmock.Request, since: int) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        gone = RequestError(410, "Expired", f"too old resource version: {since} ({self._rv})")
        await response.write((json.dumps({"type": "ERROR", "object": gone.status()}) + "\n").encode())
        await response.write_eof()
        return response


def _read_log(path: Path, tail: int | None) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b""
    if tail is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail:]) if tail > 0 else b""
    return data


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            chunk = fh.read(1 << 16)
    except FileNotFoundError:
        return b"", offset
    return chunk, offset + len(chunk)


def _action(method: str, rpath: ResourcePath, watch: str) -> kmock.action | None:
    """kmock's name for a request, so DSL filters like ``api['list pods']`` match."""
    if method == "GET" and (rpath.legacy_watch or watch.lower() in ("true", "1")):
        return kmock.action.WATCH
    if method == "GET":
        return kmock.action.FETCH if rpath.name else kmock.action.LIST
    if method == "POST":
        return kmock.action.CREATE
    if method in ("PATCH", "PUT"):
        return kmock.action.UPDATE
    if method == "DELETE":
        return kmock.action.DELETE
    return None


@contextlib.asynccontextmanager
async def serve(
    host: str = "127.0.0.1", port: int = 0, handler: APIServer | None = None
) -> AsyncIterator[tuple[APIServer, str]]:
    """Run an :class:`APIServer` on ``host:port`` (0 = a free port); yield it and its URL."""
    api = handler if handler is not None else APIServer()
    async with api:
        server = kmock.Server(api, host=host, port=port)
        try:
            await server.__aenter__()
        except OSError as exc:
            raise APIServerError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or 0 for a free one"
            ) from exc
        url = f"http://{host}:{server.port}"
        logger.info("emulated Kubernetes API listening on %s", url)
        try:
            yield api, url
        finally:
            api.close_watches()
            await asyncio.sleep(0)  # let watch handlers see the end of their queues
            await server.__aexit__(None, None, None)
