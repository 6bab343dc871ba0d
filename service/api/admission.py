"""What every route that creates work checks before anything is recorded: the spec's feasibility on
its data, this service's limits, where its callbacks may go. Each refusal is a 4xx naming the field.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from models.data import InvalidData, describe
from models.spec.plan import InfeasibleArchitecture, NetworkPlan, plan_network
from models.spec.trial import TrialSpec
from service.api.errors import FieldError, InfeasibleSpec, InvalidSpec
from service.api.settings import ApiSettings

__all__ = ["admit_trial", "check_callback_url", "check_feasible"]


def admit_trial(spec: TrialSpec, settings: ApiSettings, field_prefix: str = "") -> NetworkPlan | None:
    """Check a trial spec against this service's limits; its network plan (None when only workers see its data)."""
    if spec.optim.epochs > settings.max_epochs:
        _refuse(f"{field_prefix}optim.epochs", f"at most {settings.max_epochs} epochs are allowed on this service")
    check_callback_url(spec.callback_url, settings.callback_hosts, f"{field_prefix}callback_url")
    plan = check_feasible(spec, settings.data_root, field_prefix)
    if plan is not None and plan.params > settings.max_params:
        _refuse(f"{field_prefix}model.channels", f"the network has {plan.params:,} parameters; this service allows at most {settings.max_params:,}")
    return plan


def check_feasible(spec: TrialSpec, data_root: Path | None, field_prefix: str = "") -> NetworkPlan | None:
    """Size the network on its data without torch; None when only the workers can see the data.

    Raises InvalidSpec when user data is unusable and InfeasibleSpec naming the layer and sizes.
    """
    try:
        info = describe(spec.data, data_root)
    except InvalidData as exc:
        raise InvalidSpec(str(exc), errors=[FieldError(field=f"{field_prefix}data.path", message=str(exc))]) from exc
    if info is None:
        return None
    try:
        return plan_network(spec.model, info)
    except InfeasibleArchitecture as exc:
        raise InfeasibleSpec(str(exc), errors=[FieldError(field=f"{field_prefix}{exc.field}", message=str(exc))]) from exc


def check_callback_url(url: object | None, allowed: list[str] | None, field: str) -> None:
    """Refuse (422 on ``field``) a callback URL whose host is not in ``allowed``, when there is such a list.

    Workers POST to the URL from inside the network: without a list, a token holder can aim them at
    internal addresses (``CONVTUNE_CALLBACK_HOSTS``).
    """
    if url is None or allowed is None:
        return
    host = (urlsplit(str(url)).hostname or "").lower()
    for pattern in (p.lower() for p in allowed):
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return
    _refuse(field, f"callbacks may only go to {', '.join(allowed) or 'no host'} on this service, not {host!r}")


def _refuse(field: str, message: str) -> None:
    raise InvalidSpec(message, errors=[FieldError(field=field, message=message)])
