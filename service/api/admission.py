"""What every route that creates work checks before anything is recorded: the spec's feasibility on
its data, this service's limits, where its callbacks may go. Each refusal is a 4xx naming the field.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from models.data import InvalidData, describe
from models.spec.plan import InfeasibleArchitecture, NetworkPlan, plan_network
from models.spec.trial import TrialSpec
from service.api.errors import FieldError, InfeasibleSpec, InvalidSpec
from service.api.settings import ApiSettings

__all__ = ["admit_trial", "check_callback_url", "check_dataset_size", "check_feasible", "check_params"]


def admit_trial(spec: TrialSpec, settings: ApiSettings, field_prefix: str = "") -> NetworkPlan | None:
    """Check a trial spec against this service's limits; its network plan (None when only workers see its data)."""
    if spec.optim.epochs > settings.max_epochs:
        _refuse(f"{field_prefix}optim.epochs", f"at most {settings.max_epochs} epochs are allowed on this service")
    check_callback_url(spec.callback_url, settings, f"{field_prefix}callback_url")
    plan = check_feasible(spec, settings.data_root, field_prefix)
    _check_size(plan, settings, field_prefix)
    check_dataset_size(spec, settings, field_prefix)
    return plan


def check_dataset_size(spec: TrialSpec, settings: ApiSettings, field_prefix: str = "") -> None:
    """Refuse a generated data set larger than ``max_dataset_bytes`` in a worker's memory (float32 images)."""
    data = spec.data
    if data.name != "shapes":
        return  # digits is small; a team's own files are as large as the team made them
    size = data.num_samples * 3 * data.image_size**2 * 4
    if size > settings.max_dataset_bytes:
        _refuse(
            f"{field_prefix}data.num_samples",
            f"{data.num_samples:,} images of {data.image_size}x{data.image_size} take {size / 2**30:.1f} GiB in a worker's memory; "
            f"this service allows {settings.max_dataset_bytes / 2**30:.1f} GiB (fewer or smaller images)",
        )


def check_params(spec: TrialSpec, settings: ApiSettings, field_prefix: str = "") -> None:
    """The size limit alone, for a study's base: its feasibility is the search space's to judge (a searched
    field may replace what makes the base infeasible), so an infeasible base is not refused here."""
    try:
        plan = check_feasible(spec, settings.data_root, field_prefix)
    except InvalidSpec:
        return
    _check_size(plan, settings, field_prefix)


def _check_size(plan: NetworkPlan | None, settings: ApiSettings, field_prefix: str) -> None:
    if plan is not None and plan.params > settings.max_params:
        _refuse(f"{field_prefix}model.channels", f"the network has {plan.params:,} parameters; this service allows at most {settings.max_params:,}")
    if plan is not None and plan.flops > settings.max_flops_per_sample:
        _refuse(
            f"{field_prefix}model.channels",
            f"the network costs {plan.flops:,} FLOPs per sample; this service allows at most {settings.max_flops_per_sample:,} (CONVTUNE_MAX_FLOPS_PER_SAMPLE)",
        )


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


def check_callback_url(url: object | None, settings: ApiSettings, field: str) -> None:
    """Refuse (422 on ``field``) a callback URL the workers may not POST to from inside the network.

    A literal address must be public (or in ``CONVTUNE_CALLBACK_ALLOWED_NETWORKS``) and its port
    allowed; a host name must match ``CONVTUNE_CALLBACK_HOSTS`` when that list is set. What a name
    resolves to is checked again by the callback worker when it connects (no DNS rebinding).
    """
    if url is None:
        return
    parts = urlsplit(str(url))
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass  # a name: the worker checks the addresses it resolves to
    else:
        problem = settings.destination_problem(host, port)
        if problem:
            _refuse(field, f"callbacks may not go to {host}:{port}: {problem}")
    allowed = settings.callback_hosts
    if allowed is None:
        return
    for pattern in (p.lower() for p in allowed):
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return
    _refuse(field, f"callbacks may only go to {', '.join(allowed) or 'no host'} on this service, not {host!r}")


def _refuse(field: str, message: str) -> None:
    raise InvalidSpec(message, errors=[FieldError(field=field, message=message)])
