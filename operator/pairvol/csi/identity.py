"""The Identity service: the driver's name, its capabilities, and readiness."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pairvol import __version__
from pairvol.csi import DRIVER_NAME
from pairvol.csi.proto import messages
from pairvol.csi.server import Handler

CONTROLLER_SERVICE = 1
#: the nodes report a topology (NodeGetInfo), which the spec allows only with this
VOLUME_ACCESSIBILITY_CONSTRAINTS = 2
ONLINE_EXPANSION = 1  # PluginCapability.VolumeExpansion.ONLINE: grown while a pod uses it


def identity(controller: bool, ready: Callable[[], bool]) -> dict[str, Handler]:
    """Handlers; ``controller`` = this process serves the Controller service."""
    m = messages()

    async def get_plugin_info(_: Any) -> Any:
        return m.get("GetPluginInfoResponse")(name=DRIVER_NAME, vendor_version=__version__)

    async def get_plugin_capabilities(_: Any) -> Any:
        resp = m.get("GetPluginCapabilitiesResponse")()
        if controller:
            resp.capabilities.add().service.type = CONTROLLER_SERVICE
        resp.capabilities.add().service.type = VOLUME_ACCESSIBILITY_CONSTRAINTS
        # the controller implements ControllerExpandVolume, the node NodeExpandVolume
        resp.capabilities.add().volume_expansion.type = ONLINE_EXPANSION
        return resp

    async def probe(_: Any) -> Any:
        resp = m.get("ProbeResponse")()
        resp.ready.value = ready()
        return resp

    return {
        "GetPluginInfo": get_plugin_info,
        "GetPluginCapabilities": get_plugin_capabilities,
        "Probe": probe,
    }
