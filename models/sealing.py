"""The service's secret key, and the secrets it keeps out of MLflow.

Some fields of a spec are secrets (:data:`SECRET_FIELDS`: a ``callback_url`` often carries a token).
Anyone who reads MLflow reads a run's tags, params and artifacts, so none of them holds a secret:

- a trial's or range test's ``convtune.spec`` tag holds its spec with every secret field null, and
  its ``convtune.sealed`` tag holds those fields encrypted (Fernet: AES-128-CBC and HMAC-SHA256)
  with a key derived from the service's secret key, which only the API and the workers hold. MLflow
  stays the system of record: the reconciler re-sends a run, its callback included, from its tags.
- a study keeps its whole spec in the Optuna storage (the service's own database); its MLflow copies
  (``convtune.study_spec``, ``study/spec.json``) and its trials' specs have the secret fields null.

The same secret key derives each team's webhook key (:func:`models.callbacks.webhook_key`). Without a
key the service takes no callbacks. This module is torch-free: the API and the workers share it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator

from models.callbacks import DEFAULT_TEAM, shown_url, webhook_key
from models.errors import ConvtuneError

__all__ = ["SECRET_FIELDS", "SealBroken", "Sealer", "SecretKeySettings", "shown_secrets", "split_secrets", "with_secrets"]

# Fields of a spec, at any depth (``callback_url``, ``base.callback_url``, ``trial.callback_url``), never written to MLflow.
SECRET_FIELDS = frozenset({"callback_url"})


class SealBroken(ConvtuneError, ValueError):
    """A sealed value that this service's key does not open (another key, or altered)."""


class Sealer:
    """Seals and opens a run's secret fields with a key derived from the service's secret key."""

    def __init__(self, secret_key: str):
        from cryptography.fernet import Fernet

        derived = hmac.new(secret_key.encode(), b"convtune-seal:1", hashlib.sha256).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, secrets: dict[str, Any]) -> str:
        """``secrets`` (dotted path -> value) as one opaque string, safe to store anywhere."""
        return self._fernet.encrypt(json.dumps(secrets, separators=(",", ":")).encode()).decode()

    def unseal(self, sealed: str) -> dict[str, Any]:
        """The secrets :meth:`seal` sealed; raises SealBroken when this key did not seal them."""
        from cryptography.fernet import InvalidToken

        try:
            return json.loads(self._fernet.decrypt(sealed.encode()))
        except (InvalidToken, ValueError) as exc:
            raise SealBroken("the sealed secrets do not open with this service's secret key (CONVTUNE_SECRET_KEY changed?)") from exc


def split_secrets(document: Any) -> tuple[Any, dict[str, Any]]:
    """``document`` (a spec as JSON) with every secret field null, and those fields' values by dotted path."""
    found: dict[str, Any] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                at = f"{path}.{key}" if path else key
                if key in SECRET_FIELDS:
                    if item is not None:
                        found[at] = item
                    out[key] = None
                else:
                    out[key] = walk(item, at)
            return out
        if isinstance(value, list):
            return [walk(item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value)]
        return value

    return walk(document, ""), found


def with_secrets(document: Any, secrets: dict[str, Any]) -> Any:
    """A copy of ``document`` with ``secrets`` (from :func:`split_secrets`) put back at their paths."""
    merged = copy.deepcopy(document)
    for path, value in secrets.items():
        *parents, last = path.split(".")
        node = merged
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = value
    return merged


def shown_secrets(document: Any) -> Any:
    """``document`` with every secret field's value as logs may show it (``https://host:port/...``), or null."""
    if isinstance(document, dict):
        return {k: (shown_url(str(v)) if k in SECRET_FIELDS and v is not None else shown_secrets(v)) for k, v in document.items()}
    if isinstance(document, list):
        return [shown_secrets(v) for v in document]
    return document


class SecretKeySettings(BaseModel):
    """The secret key and the webhook key versions: settings the API and the workers share (both need the same)."""

    secret_key: SecretStr | None = Field(
        default=None,
        description=(
            "The service's master key: seals callback URLs in MLflow and derives each team's webhook signing key. "
            "The API and every worker need the same one; unset, the service refuses callbacks."
        ),
    )
    callback_secret: SecretStr | None = Field(default=None, description="The former name of secret_key (CONVTUNE_CALLBACK_SECRET), read when it is unset.")
    webhook_key_versions: dict[str, int | list[int]] = Field(
        default_factory=dict,
        description=(
            "Each team's webhook key version (JSON map, default 1); a list [new, old] while a team rotates: deliveries are signed "
            "with both until its receivers take the new key, then set the new version alone. The team of callbacks without auth is 'default'."
        ),
    )

    @field_validator("webhook_key_versions")
    @classmethod
    def _versions(cls, value: dict[str, int | list[int]]) -> dict[str, int | list[int]]:
        for team, versions in value.items():
            listed = versions if isinstance(versions, list) else [versions]
            if not listed or any(v < 1 for v in listed):
                raise ValueError(f"team {team!r}: webhook key versions are whole numbers from 1")
        return value

    @property
    def master_key(self) -> str | None:
        """The secret key (or its former name's value); None when neither is set."""
        for value in (self.secret_key, self.callback_secret):
            if value is not None:
                text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
                if text:
                    return text
        return None

    def sealer(self) -> Sealer | None:
        """What seals and opens runs' secrets; None without a secret key."""
        key = self.master_key
        return Sealer(key) if key else None

    def webhook_versions(self, team: str | None) -> list[int]:
        """The versions of ``team``'s webhook key that sign its callbacks, the current one first."""
        versions = self.webhook_key_versions.get(team or DEFAULT_TEAM, 1)
        return list(versions) if isinstance(versions, list) else [versions]

    def webhook_keys(self, team: str | None) -> list[bytes]:
        """The keys that sign ``team``'s callbacks, the current one first; none without a secret key."""
        key = self.master_key
        return [webhook_key(key, team, v) for v in self.webhook_versions(team)] if key else []
