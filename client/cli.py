"""The ``quiver`` command line.

Every command that talks to the registry takes ``--json`` for scripts (one JSON document on
stdout; errors as ``{"error": {...}}``) and exits with a code that says what went wrong:

    0 ok, 1 error, 2 usage, 3 not found, 4 auth, 5 invalid or incompatible adapter,
    6 conflict, 7 registry unavailable

Heavy libraries (torch, transformers, huggingface_hub) are imported inside the commands that
need them, so the command starts fast.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from quiver.errors import (
    ChecksumMismatch, Conflict, Forbidden, IncompatibleAdapter, InvalidAdapter, InvalidReference,
    NotFound, PayloadTooLarge, QuiverError, Unauthorized, Unavailable, UnsafeFile,
    UnservableAdapter,
)

__all__ = ["app", "main", "exit_code_for", "EXIT_CODES"]

EXIT_CODES = {"ok": 0, "error": 1, "usage": 2, "not_found": 3, "auth": 4, "invalid_adapter": 5,
              "conflict": 6, "unavailable": 7}

_HELP = """Quiver: an open hub for LoRA adapters.

Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 auth (missing, wrong or too weak token),
5 invalid or incompatible adapter, 6 conflict, 7 registry unavailable.

The registry and token come from --registry/--token, QUIVER_REGISTRY_URL/QUIVER_TOKEN, or the
config file `quiver login` writes (~/.config/quiver/config.json).
"""

app = typer.Typer(help=_HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)
serve_app = typer.Typer(help="Run a Quiver service in the foreground.", no_args_is_help=True)
base_app = typer.Typer(help="Register and inspect base models.", no_args_is_help=True)
alias_app = typer.Typer(help="Point aliases such as prod or staging at versions.",
                        no_args_is_help=True)
token_app = typer.Typer(help="Create and list access tokens (admin).", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(base_app, name="base")
app.add_typer(alias_app, name="alias")
app.add_typer(token_app, name="token")

_state: dict[str, Any] = {}

JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an error."""
    if isinstance(exc, (Unauthorized, Forbidden)):
        return EXIT_CODES["auth"]
    if isinstance(exc, NotFound):
        return EXIT_CODES["not_found"]
    if isinstance(exc, InvalidReference):
        return EXIT_CODES["usage"]
    if isinstance(exc, (InvalidAdapter, IncompatibleAdapter, UnservableAdapter, UnsafeFile,
                        ChecksumMismatch, PayloadTooLarge)):
        return EXIT_CODES["invalid_adapter"]
    if isinstance(exc, Conflict):
        return EXIT_CODES["conflict"]
    if isinstance(exc, Unavailable):
        return EXIT_CODES["unavailable"]
    return EXIT_CODES["error"]


def _emit(data: Any, as_json: bool, human: Callable[[], None] | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, default=str))
    elif human is not None:
        human()
    else:
        typer.echo(json.dumps(data, indent=2, default=str))


def _dump(model) -> Any:
    if isinstance(model, list):
        return [_dump(m) for m in model]
    return model.model_dump(mode="json") if hasattr(model, "model_dump") else model


def command(group: typer.Typer = app, name: str | None = None, **kw):
    """Register a command whose Quiver errors become a message and a meaningful exit code."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except QuiverError as exc:
                if kwargs.get("as_json"):
                    typer.echo(json.dumps({"error": exc.to_dict()}, default=str))
                else:
                    typer.echo(f"error: {exc.message} [{exc.code}]", err=True)
                    if isinstance(exc.details, list):
                        for item in exc.details[:20]:
                            typer.echo(f"  - {item}", err=True)
                raise typer.Exit(exit_code_for(exc)) from None
            except (ValueError, OSError) as exc:
                if kwargs.get("as_json"):
                    typer.echo(json.dumps({"error": {"code": "error", "message": str(exc)}}))
                else:
                    typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(EXIT_CODES["error"]) from None

        return group.command(name=name, **kw)(run)

    return wrap


def _client():
    from quiver.client import Client

    return Client(_state.get("registry"), _state.get("token"))


def _progress(as_json: bool, progress: Optional[bool]) -> bool:
    if progress is not None:
        return progress and not as_json
    return not as_json and sys.stderr.isatty()


@app.callback()
def _root(registry: Optional[str] = typer.Option(None, "--registry", "-r",
                                                 help="Registry URL (QUIVER_REGISTRY_URL)."),
          token: Optional[str] = typer.Option(None, "--token", help="Access token (QUIVER_TOKEN).")
          ) -> None:
    _state["registry"] = registry
    _state["token"] = token


# --- services ------------------------------------------------------------------------------------

@serve_app.command("registry")
def serve_registry(host: Optional[str] = typer.Option(None, "--host",
                                                     help="Default: QUIVER_HOST or 127.0.0.1."),
                   port: Optional[int] = typer.Option(None, "--port",
                                                      help="Default: QUIVER_PORT or 8700."),
                   data_dir: Optional[Path] = typer.Option(
                       None, "--data-dir", help="Default: QUIVER_DATA_DIR or .quiver/registry.")
                   ) -> None:
    """Run the registry (SQLite and local blobs under the data dir unless configured otherwise)."""
    from quiver.registry.server import serve

    serve(host=host, port=port, data_dir=data_dir)


@serve_app.command("backend")
def serve_backend(model: Path = typer.Option(..., "--model", help="Base model folder."),
                  registry: Optional[str] = typer.Option(None, "--registry"),
                  base_model_name: Optional[str] = typer.Option(
                      None, "--base-model-name", help="Its name in the registry."),
                  host: Optional[str] = typer.Option(None, "--host"),
                  port: Optional[int] = typer.Option(None, "--port")) -> None:
    """Run a multi-LoRA inference backend for one base model."""
    from quiver.backend.server import serve

    serve(model_dir=model, registry_url=registry or _state.get("registry"), host=host, port=port,
          base_model_name=base_model_name)


@serve_app.command("router")
def serve_router(registry: Optional[str] = typer.Option(None, "--registry"),
                 host: Optional[str] = typer.Option(None, "--host"),
                 port: Optional[int] = typer.Option(None, "--port")) -> None:
    """Run the prompt router."""
    from quiver.routing.server import serve

    serve(registry_url=registry or _state.get("registry"), host=host, port=port)


@serve_app.command("gateway")
def serve_gateway(registry: Optional[str] = typer.Option(None, "--registry"),
                  backend: list[str] = typer.Option([], "--backend", help="Backend URL (repeat)."),
                  router: Optional[str] = typer.Option(None, "--router"),
                  host: Optional[str] = typer.Option(None, "--host"),
                  port: Optional[int] = typer.Option(None, "--port")) -> None:
    """Run the OpenAI-compatible gateway."""
    from quiver.gateway.server import serve

    serve(registry_url=registry or _state.get("registry"), backends=list(backend) or None,
          router_url=router, host=host, port=port)


# --- identity ----------------------------------------------------------------------------------

@command(name="login")
def login(token: Optional[str] = typer.Option(None, "--token", "-t",
                                              help="The token; asked for when omitted."),
          registry: Optional[str] = typer.Option(None, "--registry", "-r"),
          verify: bool = typer.Option(True, "--verify/--no-verify",
                                      help="Check the token with the registry first."),
          as_json: bool = JsonOpt) -> None:
    """Store a token (and registry URL) in the config file, mode 0600."""
    from quiver.client import Client, ClientSettings
    from quiver.client.settings import write_config_file

    token = token or typer.prompt("Token", hide_input=True)
    url = registry or _state.get("registry")
    who = None
    if verify:
        with Client(url, token) as c:
            who = c.whoami()
    updates: dict[str, Any] = {"token": token}
    if url:
        updates["registry_url"] = url
    path = write_config_file(ClientSettings().config_path, updates)
    _emit({"config_file": str(path), "whoami": who}, as_json,
          lambda: typer.echo(f"Logged in{' as ' + who['name'] if who else ''}; "
                             f"token saved to {path}"))


@command(name="logout")
def logout(as_json: bool = JsonOpt) -> None:
    """Remove the stored token from the config file."""
    from quiver.client import ClientSettings
    from quiver.client.settings import write_config_file

    path = write_config_file(ClientSettings().config_path, {"token": None})
    _emit({"config_file": str(path)}, as_json, lambda: typer.echo(f"Token removed from {path}"))


@command(name="whoami")
def whoami(as_json: bool = JsonOpt) -> None:
    """Show who the registry thinks you are."""
    with _client() as c:
        who = c.whoami()
    _emit(who, as_json, lambda: typer.echo(
        f"{who.get('name')} scopes={','.join(who.get('scopes', []))}"))


@command(token_app, name="create")
def token_create(name: str = typer.Argument(...),
                 scope: list[str] = typer.Option(["read"], "--scope", help="read, write, admin."),
                 repo: list[str] = typer.Option([], "--repo", help="Repo pattern (repeat)."),
                 as_json: bool = JsonOpt) -> None:
    """Create a token; the secret is printed once."""
    with _client() as c:
        out = c.create_token(name, scope, repo or None)
    _emit(out, as_json, lambda: typer.echo(out["token"]))


@command(token_app, name="ls")
def token_ls(as_json: bool = JsonOpt) -> None:
    """List tokens (no secrets)."""
    with _client() as c:
        items = c.list_tokens()
    _emit(items, as_json, lambda: [typer.echo(f"{t.get('id')}\t{t.get('name')}\t"
                                              f"{','.join(t.get('scopes') or [])}") for t in items])


# --- base models ---------------------------------------------------------------------------------

@command(base_app, name="add")
def base_add(config: Path = typer.Argument(..., help="config.json, or a model folder."),
             name: str = typer.Option(..., "--name"),
             revision: Optional[str] = typer.Option(None, "--revision"),
             as_json: bool = JsonOpt) -> None:
    """Register a base model from its Hugging Face config.json."""
    with _client() as c:
        info = c.add_base_model(config, name, revision)
    _emit(_dump(info), as_json, lambda: typer.echo(
        f"{info.name}: {info.architecture}, {info.num_layers} layers, hidden {info.hidden_size}"))


@command(base_app, name="ls")
def base_ls(as_json: bool = JsonOpt) -> None:
    """List registered base models."""
    with _client() as c:
        items = c.list_base_models()
    _emit(_dump(items), as_json, lambda: [typer.echo(f"{b.name}\t{b.architecture}\t"
                                                     f"{b.num_layers}x{b.hidden_size}")
                                          for b in items])


@command(base_app, name="show")
def base_show(name: str, as_json: bool = JsonOpt) -> None:
    """Show one base model."""
    with _client() as c:
        info = c.get_base_model(name)
    _emit(_dump(info), as_json)


# --- adapters ------------------------------------------------------------------------------------

def _labels(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--label")
        out[key.strip()] = value.strip()
    return out


@command(name="push")
def push(folder: Path = typer.Argument(..., help="The adapter folder."),
         repo: str = typer.Argument(..., help="Target repository, e.g. org/name."),
         base_model: str = typer.Option(..., "--base-model", help="Registered base model name."),
         examples: Optional[Path] = typer.Option(None, "--examples",
                                                 help="JSONL, CSV (text column) or text file."),
         description: Optional[str] = typer.Option(None, "--description"),
         task_description: Optional[str] = typer.Option(None, "--task-description"),
         parent: Optional[str] = typer.Option(None, "--parent", help="REF this derives from."),
         alias: list[str] = typer.Option([], "--alias", help="Alias to point here (repeat)."),
         label: list[str] = typer.Option([], "--label", help="KEY=VALUE (repeat)."),
         progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
         as_json: bool = JsonOpt) -> None:
    """Push an adapter folder as the next version of REPO; prints REPO/N."""
    labels = _labels(label)
    with _client() as c:
        info = c.push(folder, repo, base_model=base_model, examples=examples,
                      description=description, task_description=task_description,
                      parent=parent, aliases=alias or None, labels=labels or None,
                      progress=_progress(as_json, progress))
    _emit(_dump(info), as_json, lambda: typer.echo(info.ref))


@command(name="pull")
def pull(ref: str = typer.Argument(..., help="repo, repo/N, repo@alias or repo@<revision>."),
         out: Optional[Path] = typer.Option(None, "--out", "-o", help="Copy the files here."),
         progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
         as_json: bool = JsonOpt) -> None:
    """Download a version (verified, cached) and print where it is."""
    with _client() as c:
        info = c.resolve(ref)
        path = c.download_version(info, out, progress=_progress(as_json, progress))
    _emit({"ref": info.ref, "revision": info.revision, "path": str(path),
           "files": [f.path for f in info.files]}, as_json, lambda: typer.echo(str(path)))


@command(name="ls")
def ls(repo: Optional[str] = typer.Argument(None, help="List this repository's versions."),
       base_model: Optional[str] = typer.Option(None, "--base-model"),
       namespace: Optional[str] = typer.Option(None, "--namespace"),
       query: Optional[str] = typer.Option(None, "--query", "-q"),
       all_status: bool = typer.Option(False, "--all", help="Include failed versions."),
       as_json: bool = JsonOpt) -> None:
    """List repositories, or the versions of REPO."""
    with _client() as c:
        if repo:
            versions = c.list_versions(repo, status="all" if all_status else None)
            _emit(_dump(versions), as_json, lambda: [typer.echo(
                f"{v.ref}\t{v.status}\t{_size(v.size_bytes)}\t{','.join(v.aliases)}\t"
                f"{v.description or ''}") for v in versions])
            return
        repos = c.list_repos(base_model=base_model, namespace=namespace, q=query)
    _emit(_dump(repos), as_json, lambda: [typer.echo(
        f"{r.name}\tlatest={r.latest_version}\tversions={r.version_count}\t"
        + ",".join(f"{a}={n}" for a, n in r.aliases.items())) for r in repos])


@command(name="show")
def show(ref: str, as_json: bool = JsonOpt) -> None:
    """Show a version's metadata and files."""
    with _client() as c:
        info = c.resolve(ref)

    def human() -> None:
        typer.echo(f"{info.ref}  ({info.status})  revision {info.revision}")
        typer.echo(f"  base model: {info.base_model}")
        if info.peft:
            typer.echo(f"  lora: r={info.peft.r} alpha={info.peft.lora_alpha} "
                       f"modules={','.join(info.peft.target_modules)}")
        for key in ("description", "task_description", "parent", "pushed_by", "created_at"):
            if getattr(info, key):
                typer.echo(f"  {key}: {getattr(info, key)}")
        if info.aliases:
            typer.echo(f"  aliases: {', '.join(info.aliases)}")
        if info.labels:
            typer.echo("  labels: " + ", ".join(f"{k}={v}" for k, v in info.labels.items()))
        typer.echo(f"  examples: {len(info.examples)}")
        for f in info.files:
            typer.echo(f"  {f.sha256[:12]}  {_size(f.size):>9}  {f.path}")

    _emit(_dump(info), as_json, human)


@command(alias_app, name="set")
def alias_set(repo: str, alias: str, version: int, as_json: bool = JsonOpt) -> None:
    """Point ALIAS of REPO at version N."""
    with _client() as c:
        info = c.set_alias(repo, alias, version)
    _emit(_dump(info), as_json, lambda: typer.echo(f"{repo}@{alias} -> {info.ref}"))


@command(alias_app, name="rm")
def alias_rm(repo: str, alias: str, as_json: bool = JsonOpt) -> None:
    """Remove an alias."""
    with _client() as c:
        c.delete_alias(repo, alias)
    _emit({"deleted": f"{repo}@{alias}"}, as_json, lambda: typer.echo(f"removed {repo}@{alias}"))


@command(name="archive")
def archive(ref: str, as_json: bool = JsonOpt) -> None:
    """Archive a version: no longer latest, still pullable by number."""
    with _client() as c:
        info = c.archive(ref)
    _emit(_dump(info), as_json, lambda: typer.echo(f"archived {info.ref}"))


@command(name="rm")
def rm(ref: str = typer.Argument(..., help="repo/N to delete a version, repo for everything."),
       yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
       as_json: bool = JsonOpt) -> None:
    """Delete a version or a whole repository (admin)."""
    if not yes and not as_json:
        typer.confirm(f"Delete {ref}?", abort=True)
    with _client() as c:
        c.delete(ref)
    _emit({"deleted": ref}, as_json, lambda: typer.echo(f"deleted {ref}"))


# --- Hugging Face folders ------------------------------------------------------------------------

@command(name="import-hf")
def import_hf(source: str = typer.Argument(..., help="A PEFT folder, or a HF repo id in the "
                                                      "local HF cache."),
              repo: Optional[str] = typer.Option(None, "--repo", help="Target repository."),
              base_model: Optional[str] = typer.Option(None, "--base-model"),
              revision: Optional[str] = typer.Option(None, "--revision",
                                                     help="HF revision in the local cache."),
              description: Optional[str] = typer.Option(None, "--description"),
              examples: Optional[Path] = typer.Option(None, "--examples"),
              alias: list[str] = typer.Option([], "--alias"),
              hf_cache_dir: Optional[Path] = typer.Option(None, "--hf-cache-dir",
                                                          help="HF cache (default: HF_HUB_CACHE)."),
              as_json: bool = JsonOpt) -> None:
    """Push a Hugging Face-style PEFT adapter as a new version."""
    from quiver.client.hf import import_hf as run

    with _client() as c:
        info = run(c, source, repo=repo, base_model=base_model, revision=revision,
                   description=description, examples=examples, aliases=alias or None,
                   hf_cache_dir=hf_cache_dir)
    _emit(_dump(info), as_json, lambda: typer.echo(info.ref))


@command(name="export-hf")
def export_hf(ref: str, out: Path = typer.Option(..., "--out", "-o"),
              as_json: bool = JsonOpt) -> None:
    """Write a folder PeftModel.from_pretrained loads (config, safetensors, README)."""
    from quiver.client.hf import export_hf as run

    with _client() as c:
        path = run(c, ref, out)
    _emit({"ref": ref, "path": str(path)}, as_json, lambda: typer.echo(str(path)))


# --- the local stack ------------------------------------------------------------------------------

@command(name="up")
def up(data_dir: Path = typer.Option(Path(".quiver"), "--data-dir"),
       port: int = typer.Option(0, "--port", help="Gateway port; 0: 8080 plus the offset."),
       host: str = typer.Option("127.0.0.1", "--host"),
       once: bool = typer.Option(False, "--once", help="Exit after the demo table."),
       port_offset: int = typer.Option(0, "--port-offset",
                                       help="Add this to every default port."),
       demo_dir: Optional[Path] = typer.Option(None, "--demo-dir",
                                               help="A demo built by quiver.backend.demo.build."),
       as_json: bool = JsonOpt) -> None:
    """Start registry, backend, router and gateway; route the demo prompts; serve until Ctrl-C."""
    from quiver.client.up import run_up

    run_up(data_dir=data_dir, host=host, port=port, once=once, as_json=as_json,
           port_offset=port_offset, demo_dir=demo_dir)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _register_plugins() -> None:
    try:
        from quiver.routing.cli import register
    except ModuleNotFoundError as exc:
        if exc.name not in ("quiver.routing.cli", "quiver.routing"):
            raise
        return
    register(app)


_register_plugins()


def main() -> None:
    """The ``quiver`` console script."""
    app()


if __name__ == "__main__":
    main()
