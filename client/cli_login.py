"""``artifactfs login`` / ``logout`` / ``whoami``: the API key of a registry server, kept in a
0600 file (:mod:`client.credentials`) instead of an environment variable."""

from __future__ import annotations

import os
from typing import Any

import click

from . import credentials, settings


def _server_url(url: str | None) -> str:
    """URL given, else ARTIFACTFS_STORE when it is a server, else the registry logged in last."""
    if url:
        if not settings.is_server_url(url):
            raise click.BadParameter("give the registry's http:// or https:// URL", param_hint="URL")
        return credentials.normalise_url(url)
    location = settings.store_location()
    if settings.is_server_url(location):
        return credentials.normalise_url(location)
    raise click.UsageError("which registry? give its URL (e.g. artifactfs login https://registry.internal:8600)")


def _identity(url: str, key: str | None) -> dict[str, Any]:
    from .store.http import HttpStore

    store = HttpStore(url, key, attempts=3)
    try:
        return store.whoami()
    finally:
        store.close()


@click.command("login")
@click.argument("url", required=False)
@click.option("--key", metavar="KEY", help="the API key (default: prompt, or read from stdin; "
                                           "an option is visible in the process list)")
def login_cmd(url: str | None, key: str | None) -> None:
    """Check an API key with the registry at URL and save it (mode 0600) as the default registry."""
    url = _server_url(url)
    if key is None:
        key = click.prompt(f"API key for {url}", hide_input=True, err=True)
    key = key.strip()
    who = _identity(url, key)  # a refused key raises AuthenticationError: nothing is saved
    entity = credentials.entity_of(who)
    path = credentials.save_login(url, key, str(who["user"]), entity)
    click.echo(f"logged in to {url} as {who['user']} (default entity {entity}); key saved in {path}")
    if os.environ.get("ARTIFACTFS_API_KEY"):
        click.echo("note: ARTIFACTFS_API_KEY is set and is used instead of the saved key", err=True)


@click.command("logout")
@click.argument("url", required=False)
def logout_cmd(url: str | None) -> None:
    """Forget the key saved for URL (default: the current registry).  The key stays valid on the
    server; an admin revokes it with ``artifactfs admin revoke-key``."""
    url = _server_url(url)
    if credentials.forget_login(url):
        click.echo(f"logged out of {url} (the saved key was removed from {credentials.credentials_path()})")
    else:
        click.echo(f"no key saved for {url}")


@click.command("whoami")
def whoami_cmd() -> None:
    """Who the registry takes you for: user, default entity, teams and where the key comes from."""
    location = settings.store_location()
    if not settings.is_server_url(location):
        click.echo(f"embedded store at {location} (no login); default entity {settings.default_entity()}")
        return
    key = settings.api_key(location)
    source = ("ARTIFACTFS_API_KEY" if os.environ.get("ARTIFACTFS_API_KEY")
              else str(credentials.credentials_path()) if key else "none")
    who = _identity(location, key)
    teams = ", ".join(f"{t['name']}:{t['role']}" for t in who.get("teams", []))
    click.echo(f"registry        {location}")
    click.echo(f"user            {who['user']}")
    click.echo(f"default entity  {settings.default_entity()}")
    click.echo(f"teams           {teams}")
    click.echo(f"key             afs_{who['key_id']}_… (from {source})")


def register(group: click.Group) -> None:
    for cmd in (login_cmd, logout_cmd, whoami_cmd):
        group.add_command(cmd)


__all__ = ["register"]
