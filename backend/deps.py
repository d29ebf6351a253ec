"""Route dependencies as ``Annotated`` aliases: the runtime and the parts routes use."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from quiver.backend.generation import Generation
from quiver.backend.residency import Residency
from quiver.backend.runtime import Runtime
from quiver.errors import Unavailable

__all__ = ["RuntimeDep", "GenerationDep", "ResidencyDep", "get_runtime"]


def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise Unavailable("the backend is starting", retry_after=1.0)
    return runtime


def _generation(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Generation:
    return runtime.generation


def _residency(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Residency:
    return runtime.residency


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
GenerationDep = Annotated[Generation, Depends(_generation)]
ResidencyDep = Annotated[Residency, Depends(_residency)]
