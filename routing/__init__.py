"""The embedding router: picks the adapter that should answer a prompt, or none.

One router per base model, trained from the registry's adapter versions (task descriptions and
example prompts), kept current from registry events. ``quiver.routing.app`` serves it over HTTP;
the torch-based encoder is imported only when an :class:`Encoder` is built.
"""

from __future__ import annotations

from quiver.routing.classifier import Classifier, ClassifierConfig, fit_classifier, fit_threshold
from quiver.routing.data import LabelledExample, load_labelled, prompt_text
from quiver.routing.settings import RouterSettings

__all__ = [
    "Classifier", "ClassifierConfig", "fit_classifier", "fit_threshold", "LabelledExample",
    "load_labelled", "prompt_text", "RouterSettings", "Encoder", "RouterService", "create_app",
]


def __getattr__(name: str):
    if name == "Encoder":
        from quiver.routing.encoder import Encoder

        return Encoder
    if name == "RouterService":
        from quiver.routing.service import RouterService

        return RouterService
    if name == "create_app":
        from quiver.routing.app import create_app

        return create_app
    raise AttributeError(name)
