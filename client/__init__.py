"""The Python client and the ``quiver`` command line of the Quiver registry.

``Client`` (sync) pushes, pulls and manages adapter versions; ``AsyncClient`` offers the read
operations and verified downloads to services running an event loop. Both read
``QUIVER_REGISTRY_URL`` and ``QUIVER_TOKEN`` (then the config file ``quiver login`` writes).
"""

from __future__ import annotations

from quiver.client._async import AsyncClient
from quiver.client._client import Client
from quiver.client.settings import ClientSettings

__all__ = ["Client", "AsyncClient", "ClientSettings"]
