"""The ``quiver route`` commands.

    quiver route "PROMPT" [--base-model NAME] [--router URL]   show the routing decision
    quiver route eval --train FILE --test FILE [--json]        accuracy, refusals, latency
    quiver route fit --train FILE --heldout FILE               fit the abstain threshold

Without ``--router`` the decision is made in-process from the registry's current state (the
same training as the router service); with it, the running router service is asked.
"""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

__all__ = ["register", "route_app"]


class _RouteGroup(TyperGroup):
    """``quiver route PROMPT`` runs the hidden ``ask`` command; named subcommands run as usual."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["ask", *args]
        return super().parse_args(ctx, args)


route_app = typer.Typer(cls=_RouteGroup, no_args_is_help=True,
                        help="Choose an adapter for a prompt, and evaluate routers.")


def _print(data: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(data, default=str))
    else:
        for line in lines:
            typer.echo(line)


def _decision_lines(d: dict) -> list[str]:
    lines = [f"adapter:    {d['adapter'] or '(base model)'}",
             f"action:     {d['action']}",
             f"base model: {d['base_model']}",
             f"confidence: {d['confidence']:.3f}",
             f"router:     {d.get('router_version')}"]
    if d.get("latency_ms") is not None:
        lines.append(f"latency:    {d['latency_ms']:.1f} ms")
    for c in d.get("candidates", []):
        lines.append(f"  {c['score']:.3f}  {c['adapter']}")
    return lines


async def _route_local(prompt: str, base_model: str | None, top_k: int, registry: str | None,
                       token: str | None, encoder: Path | None) -> dict:
    from quiver.client import AsyncClient
    from quiver.routing.service import RouterService
    from quiver.routing.settings import RouterSettings

    overrides = {"encoder_path": encoder} if encoder else {}
    settings = RouterSettings(**overrides)
    client = AsyncClient(registry, token)
    service = RouterService(settings, _load_encoder(encoder), client=client)
    try:
        await service.start(watch=False)
        await service.sync()
        decision = await service.route(prompt=prompt, base_model=base_model, top_k=top_k)
        return decision.model_dump(mode="json")
    finally:
        await service.close()
        await client.aclose()


def _route_remote(url: str, prompt: str, base_model: str | None, top_k: int) -> dict:
    import httpx

    from quiver.errors import Unavailable
    from quiver.http import raise_for_status

    try:
        r = httpx.post(url.rstrip("/") + "/v1/route", timeout=30.0,
                       json={"prompt": prompt, "base_model": base_model, "top_k": top_k})
    except httpx.TransportError as exc:
        raise Unavailable(f"cannot reach the router at {url}: {exc}") from exc
    raise_for_status(r)
    return r.json()


@functools.lru_cache(maxsize=2)
def _load_encoder(path: Path | None):
    """The encoder, loaded once per process and path."""
    from quiver.routing.encoder import Encoder

    return Encoder(path, cache_size=1000)


def register(app: typer.Typer) -> None:
    """Add the ``route`` command group to the ``quiver`` app."""
    from quiver.client.cli import _state, command

    @command(route_app, name="ask", hidden=True)
    def ask(prompt: str = typer.Argument(..., help="The prompt to route."),
            base_model: Optional[str] = typer.Option(None, "--base-model", "-b"),
            top_k: int = typer.Option(3, "--top-k"),
            router: Optional[str] = typer.Option(None, "--router",
                                                 help="A running router service's URL."),
            encoder: Optional[Path] = typer.Option(None, "--encoder",
                                                   help="Local sentence-transformers folder."),
            as_json: bool = typer.Option(False, "--json")) -> None:
        """Show which adapter would answer PROMPT."""
        if router:
            decision = _route_remote(router, prompt, base_model, top_k)
        else:
            decision = asyncio.run(_route_local(prompt, base_model, top_k, _state.get("registry"),
                                                _state.get("token"), encoder))
        _print(decision, as_json, _decision_lines(decision))

    @command(route_app, name="eval")
    def eval_(train: Path = typer.Option(..., "--train", help="Labelled JSONL or CSV."),
              test: Path = typer.Option(..., "--test", help="Labelled JSONL or CSV."),
              target_precision: float = typer.Option(0.95, "--target-precision"),
              threshold: Optional[float] = typer.Option(None, "--threshold",
                                                        help="Fixed threshold (else fitted)."),
              latency_samples: int = typer.Option(200, "--latency-samples"),
              encoder: Optional[Path] = typer.Option(None, "--encoder"),
              per_class: bool = typer.Option(True, "--per-class/--no-per-class"),
              as_json: bool = typer.Option(False, "--json")) -> None:
        """Train on TRAIN, test on TEST: accuracy, out-of-scope recall, latency vs the encoder."""
        from quiver.routing.classifier import ClassifierConfig
        from quiver.routing.data import load_labelled
        from quiver.routing.evaluate import evaluate, train_classifier

        train_rows, test_rows = load_labelled(train), load_labelled(test)
        enc = _load_encoder(encoder)
        clf = train_classifier(train_rows, enc, ClassifierConfig(target_precision=target_precision))
        res = evaluate(clf, test_rows, enc, threshold=threshold, latency_samples=latency_samples)

        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.1f} %"

        lines = [f"classes: {len(clf.labels)}   test: {res['in_scope']} in scope, "
                 f"{res['out_of_scope']} out of scope   threshold: {res['threshold']:.3f}",
                 f"in-scope accuracy:      {pct(res['accuracy'])}   "
                 f"(top-1 ignoring the threshold: {pct(res['closed_accuracy'])})",
                 f"out-of-scope recall:    {pct(res['oos_recall'])}",
                 f"coverage:               {pct(res['coverage'])}"]
        if "p50_ms" in res:
            lines.append(f"latency p50/p99: router {res['p50_ms']:.2f}/{res['p99_ms']:.2f} ms, "
                         f"bare encoder {res['encoder_p50_ms']:.2f}/{res['encoder_p99_ms']:.2f} ms,"
                         f" classifier {res['classifier_p50_ms']:.3f} ms")
        if per_class:
            lines.append(f"{'class':<40} precision  recall  support")
            for label, m in res["per_class"].items():
                lines.append(f"{label[:40]:<40} {pct(m['precision']):>9}  {pct(m['recall']):>6}"
                             f"  {m['support']:>7}")
        _print(res, as_json, lines)

    @command(route_app, name="fit")
    def fit(train: Path = typer.Option(..., "--train", help="Labelled JSONL or CSV."),
            heldout: Path = typer.Option(..., "--heldout",
                                         help="Labelled held-out data (oos rows must be refused)."),
            target_precision: float = typer.Option(0.95, "--target-precision"),
            encoder: Optional[Path] = typer.Option(None, "--encoder"),
            as_json: bool = typer.Option(False, "--json")) -> None:
        """Fit the abstain threshold on held-out data for a target precision."""
        from quiver.routing.classifier import ClassifierConfig
        from quiver.routing.data import load_labelled
        from quiver.routing.evaluate import fit_threshold_on, train_classifier

        if not 0.0 < target_precision <= 1.0:
            raise ValueError("--target-precision must lie in (0, 1]")
        enc = _load_encoder(encoder)
        clf = train_classifier(load_labelled(train), enc,
                               ClassifierConfig(target_precision=target_precision))
        res = fit_threshold_on(clf, load_labelled(heldout), enc, target_precision)
        lines = [f"threshold: {res['threshold']:.4f}  (set QUIVER_THRESHOLD to use it)",
                 f"precision: {100 * res['precision']:.1f} %   coverage: "
                 f"{100 * res['coverage']:.1f} %"]
        if res["oos_recall"] is not None:
            lines.append(f"out-of-scope recall: {100 * res['oos_recall']:.1f} %")
        _print(res, as_json, lines)

    app.add_typer(route_app, name="route")
