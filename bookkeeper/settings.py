"""The bookkeeper's process settings, built once in ``main()`` and passed down."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from common.config import BOOKKEEPER_API_KEY_ENV, BOOKKEEPER_TOKEN_PLACEHOLDER, Config
from common.errors import ConfigError

DATABASE_URL_ENV: Final = "DATABASE_URL"
"""PostgreSQL (``postgresql://user:password@host:port/db``) or any SQLAlchemy URL; when unset,
the embedded SQLite file ``<data_root>/state/bookkeeper.sqlite3``."""
SQLITE_FILE: Final = "bookkeeper.sqlite3"
MIN_TOKEN_LENGTH: Final = 16
DEFAULT_MAX_BATCH: Final = 5000
DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024 * 1024


class Settings(BaseModel):
    """Everything the bookkeeper process needs; the token is never shown in a repr."""

    model_config = ConfigDict(frozen=True)

    database_url: str
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    token: SecretStr
    max_batch: Annotated[int, Field(ge=1)] = DEFAULT_MAX_BATCH
    """Most events accepted in one ``POST /v1/events``; more is answered 413."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_BODY_BYTES
    """Largest request body accepted; larger is answered 413."""

    @field_validator("token")
    @classmethod
    def _real_secret(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if not secret.strip():
            raise ValueError("a token is required")
        if secret == BOOKKEEPER_TOKEN_PLACEHOLDER:
            raise ValueError("the placeholder token must be replaced by a random secret")
        if len(secret) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the token must be at least {MIN_TOKEN_LENGTH} characters long")
        return value

    @field_validator("database_url")
    @classmethod
    def _parsable(cls, value: str) -> str:
        try:
            make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        return value

    def url(self) -> URL:
        return make_url(self.database_url)

    def safe_database_url(self) -> str:
        """The database URL with its password hidden, for logs."""
        return self.url().render_as_string(hide_password=True)

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str]) -> Settings:
        """Settings from the configuration and the environment; :class:`ConfigError` naming the
        setting when they are unusable (no token, a placeholder or short one, a bad address)."""
        if not config.bookkeeper_api_key:
            raise ConfigError(
                "bookkeeper_api_key: the bookkeeper needs a token (set it in the configuration "
                f"or in {BOOKKEEPER_API_KEY_ENV})"
            )
        host, port = parse_listen(config.bookkeeper)
        database_url = environ.get(DATABASE_URL_ENV) or sqlite_url(
            config.spool_paths().state / SQLITE_FILE
        )
        try:
            return cls(
                database_url=database_url,
                host=host,
                port=port,
                token=SecretStr(config.bookkeeper_api_key),
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            field = {"token": "bookkeeper_api_key", "database_url": DATABASE_URL_ENV}.get(
                str(error["loc"][0]), "bookkeeper"
            )
            raise ConfigError(f"{field}: {error['msg']}") from None


def sqlite_url(path: Path) -> str:
    return URL.create("sqlite", database=str(path)).render_as_string()


def parse_listen(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as a pair; :class:`ConfigError` when malformed."""
    host, sep, port_text = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"bookkeeper: expected host:port, not {address!r}")
    return host, int(port_text)
