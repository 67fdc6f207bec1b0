"""Storage URLs of the searches, and their passwords, which nothing writes or prints.

A search's ``storage`` option is recorded in the recipe (``recipe.yaml``, the report,
the resume folder's ``run.json``): it holds the URL *without* its password
(:func:`hide_password`, applied when the option is read). The password stays in this
process, and reaches the storage (:func:`with_password`) from, in order:

1. the URL as the user gave it to this process (its password remembered in memory);
2. ``PRUNELLA_SEARCH_STORAGE``, when it names the same URL with a password (how this
   process hands the storage to its worker processes, out of their command line);
3. the driver's own sources: ``libpq`` (PostgreSQL) reads ``PGPASSWORD`` or ``~/.pgpass``.
"""

from __future__ import annotations

import os

ENV = "PRUNELLA_SEARCH_STORAGE"
_passwords: dict[str, str] = {}  # URL without password -> the URL as given


def _url(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError:
        return None


def public_url(url: str) -> str:
    """``url`` without its password, for messages and files."""
    parsed = _url(url)
    if parsed is None or parsed.password is None:
        return url
    # URL.set(password=None) leaves the password as it is: replace the field itself
    return parsed._replace(password=None).render_as_string(hide_password=False)


def hide_password(url: str) -> str:
    """``url`` without its password, which this process remembers for :func:`with_password`."""
    parsed = _url(url)
    if parsed is None or parsed.password is None:
        return url
    public = public_url(url)
    _passwords[public] = url
    return public


def with_password(url: str) -> str:
    """The URL to connect with: ``url``'s password, if the user gave one (this process, or
    ``PRUNELLA_SEARCH_STORAGE``); else ``url`` as it is (the driver finds the password)."""
    if url in _passwords:
        return _passwords[url]
    given = os.environ.get(ENV, "")
    if given and public_url(given) == public_url(url):
        return given
    return url


def storage_url(given: str, folder) -> str:
    """The storage URL: ``given``, or an SQLite file in the search folder."""
    return given or f"sqlite:///{(folder / 'studies.db').resolve()}"
