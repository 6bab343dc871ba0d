"""What every route that creates work checks before anything is recorded: the spec's feasibility on
its data, this service's limits, where its callbacks may go, whether a worker serves its queue. Each
refusal is a 4xx naming the field.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as ResolveTimeout
from typing import NoReturn
from urllib.parse import urlsplit

import redis
from pydantic import ValidationError

from models.data import DataRoot, InvalidData, data_root_for, describe
from models.messages import QUEUES
from models.spec.plan import InfeasibleArchitecture, NetworkPlan, plan_network, size_problem
from models.spec.space import MAX_COMBINATIONS, SearchedStudy, apply_params, corner_points, param_values
from models.spec.trial import TrialSpec
from models.store import fleet
from service.api.errors import FieldError, InfeasibleSpec, InvalidSpec, ServiceUnavailable
from service.api.settings import ApiSettings

__all__ = ["admit_trial", "check_callback_url", "check_dataset_size", "check_epochs", "check_feasible", "check_params", "check_space", "served_queue"]

log = logging.getLogger(__name__)
RESOLVE_TIMEOUT_S = 2.0  # a callback host's DNS lookup at submit; past it the callback worker's check at connect decides
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="callback-dns")


def admit_trial(spec: TrialSpec, settings: ApiSettings, team: str | None, field_prefix: str = "") -> NetworkPlan | None:
    """Check a trial spec of ``team`` against this service's limits; its network plan (None when only workers see its data)."""
    check_epochs(spec.optim.epochs, settings, f"{field_prefix}optim.epochs")
    check_callback_url(spec.callback_url, settings, f"{field_prefix}callback_url")
    plan = check_feasible(spec, data_root_for(settings.data_root, team), field_prefix)
    _check_size(plan, settings, field_prefix)
    check_dataset_size(spec, settings, field_prefix)
    return plan


def served_queue(client: redis.Redis, queue: str | None, settings: ApiSettings, field: str) -> str:
    """The queue work asking for ``queue`` goes to (the service's default when None); 422 on ``field`` when no worker serves it.

    A queue is served while some worker's heartbeat named it in the last ``unserved_queue_s``
    (:mod:`models.store.fleet`): work sent anywhere else would wait for ever. The check is off with
    ``unserved_queue_s`` 0, and passes while Redis has no record of any worker at all (a new
    deployment, or Redis restarted empty: the workers' first beats are seconds away); the reconciler
    ends what no worker takes within ``unserved_queue_s``. Raises ServiceUnavailable when Redis fails.
    """
    chosen = queue or settings.default_queue
    if settings.unserved_queue_s <= 0:
        return chosen
    try:
        served = fleet.served_queues(client, QUEUES)
        if chosen in served or not fleet.has_record(client, QUEUES):
            return chosen
        # Read again: a worker's first beat may have landed between the two reads (it marks its queues before the record).
        served = fleet.served_queues(client, QUEUES)
        if chosen in served:
            return chosen
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"the broker (Redis) is unreachable: {exc}") from exc
    which = f"queue {chosen!r}" if queue else f"queue {chosen!r} (this service's default, CONVTUNE_DEFAULT_QUEUE)"
    now = f"the queues served now: {', '.join(sorted(served))}" if served else "no queue is served now: are the workers up?"
    _refuse(field, f"no worker has served {which} in the last {_span(settings.unserved_queue_s)}, so nothing would ever run it; {now}")


def _span(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


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


def check_params(spec: TrialSpec, settings: ApiSettings, team: str | None, field_prefix: str = "") -> None:
    """The size limit alone, for a study's base: its feasibility is the search space's to judge (a searched
    field may replace what makes the base infeasible), so an infeasible base is not refused here."""
    try:
        plan = check_feasible(spec, data_root_for(settings.data_root, team), field_prefix)
    except InvalidSpec:
        return
    _check_size(plan, settings, field_prefix)


def check_space(spec: SearchedStudy, settings: ApiSettings, team: str | None) -> None:
    """A study's limits beyond its base (``team``'s data): the epochs its space may set, and the size of every configuration it makes.

    Each corner combination of the space (:func:`models.spec.space.corner_points`: a range's ends, every
    choice) that is a feasible trial is sized like one; one over a limit is a 422 naming the searched
    field that makes it so (a value too large with every other, else the first model field of the
    combination). A space with more than ``MAX_COMBINATIONS`` corners is checked on its first ones here
    and every sampled configuration again by the worker.
    """
    searched = spec.search_space.get("optim.epochs")
    if searched is not None:
        check_epochs(max(param_values(searched)), settings, "search_space.optim.epochs")
    if not any(key == "model" or key.startswith("model.") for key in spec.search_space):
        return  # the network is the base's, which check_params sized
    try:
        info = describe(spec.base.data, data_root_for(settings.data_root, team))
    except InvalidData:
        return  # the study's data check refuses it, naming base.data.path
    if info is None:
        return  # only the workers see the data: they size each sampled configuration
    fitting: set[tuple[str, str]] = set()
    over: list[tuple[dict, str]] = []
    for combo in itertools.islice(corner_points(spec), MAX_COMBINATIONS):
        try:
            plan = plan_network(apply_params(spec.base, combo).model, info)
        except (ValidationError, InfeasibleArchitecture):
            continue  # never trained as it is: the space's own checks judge it
        values = {(key, json.dumps(value, sort_keys=True)) for key, value in combo.items()}
        problem = size_problem(plan, settings.max_params, settings.max_flops_per_sample)
        if problem is None:
            fitting |= values
        else:
            over.append((combo, problem))
    if not over:
        return
    combo, problem = over[0]
    culprits = [key for combo_, _ in over for key, value in combo_.items() if (key, json.dumps(value, sort_keys=True)) not in fitting]
    field = culprits[0] if culprits else next(k for k in combo if k == "model" or k.startswith("model."))
    _refuse(f"search_space.{field}", f"the configuration {json.dumps(combo, sort_keys=True)} of the search space is too large: {problem}")


def check_epochs(epochs: int, settings: ApiSettings, field: str) -> None:
    """Refuse (422 on ``field``) ``epochs``, a trial's or the most a study's space reaches, above this service's ``max_epochs``."""
    if epochs > settings.max_epochs:
        _refuse(field, f"at most {settings.max_epochs} epochs are allowed on this service (CONVTUNE_MAX_EPOCHS), not {epochs}")


def _check_size(plan: NetworkPlan | None, settings: ApiSettings, field_prefix: str) -> None:
    problem = size_problem(plan, settings.max_params, settings.max_flops_per_sample) if plan is not None else None
    if problem:
        _refuse(f"{field_prefix}model.channels", problem)


def check_feasible(spec: TrialSpec, data_root: DataRoot | None, field_prefix: str = "") -> NetworkPlan | None:
    """Size the network on its data (``data_root``: as its team sees it) without torch; None when only the workers can see the data.

    Raises InvalidSpec when user data is unusable (missing, another team's, unreadable: a 422 naming
    ``data.path``) and InfeasibleSpec naming the layer and sizes.
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

    Callbacks need the service's secret key (it seals the URL in MLflow and signs the events). A host
    must match ``CONVTUNE_CALLBACK_HOSTS`` when that list is set. Its address, a literal or every
    address its name resolves to now, must be public (or in ``CONVTUNE_CALLBACK_ALLOWED_NETWORKS``) and
    its port allowed. A name that does not resolve here in ``RESOLVE_TIMEOUT_S`` passes: the callback
    worker checks the addresses it connects to, whatever this check saw (no DNS rebinding).
    """
    if url is None:
        return
    if not settings.master_key:
        _refuse(field, "this service has no secret key (CONVTUNE_SECRET_KEY), so callbacks are off: it could neither keep the URL secret nor sign the events")
    parts = urlsplit(str(url))
    host = (parts.hostname or "").lower().removesuffix(".")  # "localhost." is localhost
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allowed = settings.callback_hosts
    if allowed is not None and not any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in (p.lower() for p in allowed)):
        _refuse(field, f"callbacks may only go to {', '.join(allowed) or 'no host'} on this service, not {host!r} (CONVTUNE_CALLBACK_HOSTS)")
    try:
        addresses, literal = [str(ipaddress.ip_address(host))], True
    except ValueError:
        addresses, literal = _resolve(host, port), False  # a name
    for address in addresses:
        problem = settings.destination_problem(address, port)
        if problem:
            where = f"{host}:{port}" if literal else f"{host}:{port} (it resolves to {address})"
            _refuse(field, f"callbacks may not go to {where}: {problem}")


def _resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to now; none when it does not resolve in time (the worker decides then)."""
    try:
        infos = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(timeout=RESOLVE_TIMEOUT_S)
    except ResolveTimeout:
        log.warning("callback host %s did not resolve within %.0fs; the callback worker checks it when it connects", host, RESOLVE_TIMEOUT_S)
        return []
    except (OSError, UnicodeError, ValueError):
        return []  # no such name (yet): the callback worker checks it when it connects
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _refuse(field: str, message: str) -> NoReturn:
    raise InvalidSpec(message, errors=[FieldError(field=field, message=message)])
