"""Kubernetes access for every part of pairvol: the one layer below the agent and the operator.

Why a layer of its own: the agent (its Lease, the fence of the primary) and the operator
(everything it manages outside kopf's watches) talk to the same API with the same
credentials and share the Lease protocol and the names on the objects; neither may import
the other (tests/unit/test_import_layers.py holds them to it). So both import this:

* :mod:`pairvol.kube.config`: where the credentials come from — kubeconfig files (merged as
  kubectl merges ``$KUBECONFIG``), ``exec`` credential plugins, the in-cluster
  ServiceAccount — loaded by the official ``kubernetes`` client, plus a token file that is
  re-read whenever it changes (projected ServiceAccount tokens rotate);
* :mod:`pairvol.kube.client`: the async client (the ``kubernetes`` client's ApiClient in a
  thread pool of its own), with typed errors for the answers that are decisions;
* :mod:`pairvol.kube.paths`: REST paths of the resources pairvol uses;
* :mod:`pairvol.kube.lease`: the coordination.k8s.io Lease protocol that fences the primary;
* :mod:`pairvol.kube.names`: annotation names that both sides read or write.

kopf keeps its own connection for the operator's watches; it is given the same credentials
(:func:`pairvol.kube.config.kopf_connection`).
"""
