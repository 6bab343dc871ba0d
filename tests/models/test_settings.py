"""models.settings.SharedSettings: what the API and the workers both read is declared once, and read alike by both."""

from __future__ import annotations

import pytest

from models.settings import SharedSettings
from service.api.settings import ApiSettings
from workers.settings import WorkerSettings

PROCESSES = (ApiSettings, WorkerSettings)


@pytest.mark.parametrize("process", PROCESSES)
def test_a_process_declares_none_of_the_shared_settings_again(process: type[SharedSettings]):
    assert issubclass(process, SharedSettings)
    declared_here = set(process.__annotations__)
    assert not declared_here & set(SharedSettings.model_fields), "declare a setting both processes read once, in models.settings"


def test_both_processes_read_a_shared_setting_from_the_same_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CONVTUNE_MAX_PARAMS", "1234")
    monkeypatch.setenv("CONVTUNE_UNSERVED_QUEUE_S", "60")
    monkeypatch.setenv("CONVTUNE_EXPERIMENT", "vision")
    for process in PROCESSES:
        settings = process()
        assert (settings.max_params, settings.unserved_queue_s, settings.experiment) == (1234, 60, "vision")


def test_the_defaults_both_processes_must_agree_on():
    def default(process: type[SharedSettings], name: str) -> object:
        return process.model_fields[name].get_default(call_default_factory=True)

    for name in SharedSettings.model_fields:
        assert default(ApiSettings, name) == default(WorkerSettings, name), name
    limits = ("max_params", "max_flops_per_sample", "unserved_queue_s", "visibility_timeout_s")
    assert [default(ApiSettings, name) for name in limits] == [200_000_000, 50 * 10**9, 900, 4 * 3600]


@pytest.mark.parametrize("process", PROCESSES)
def test_an_experiment_name_no_team_experiment_could_sit_under_is_refused_by_both(process: type[SharedSettings]):
    with pytest.raises(ValueError, match="experiment"):
        process(experiment="a/b")
