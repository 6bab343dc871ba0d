"""The state dict internals models.compat.torch_state relies on, against the installed torch.

A module's ``state_dict()`` carries each submodule's version in ``_metadata``, and
``load_state_dict`` hands that version to the submodule's ``_load_from_state_dict``: a rebuilt
copy given the metadata by the adapter loads as the original does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from models.compat import CompatError, torch_state


class _Versioned(nn.Module):
    """A module of version 5 that records the version each load hands it."""

    _version = 5

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        self.loaded_versions: list[object] = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        self.loaded_versions.append(local_metadata.get("version"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


@pytest.fixture()
def fresh_check() -> Iterator[None]:
    torch_state.check_load_metadata.cache_clear()
    yield
    torch_state.check_load_metadata.cache_clear()


def test_a_rebuilt_state_dict_given_the_metadata_loads_with_each_submodules_version(fresh_check: None):
    torch_state.check_load_metadata()
    net = nn.Sequential(nn.Linear(2, 2), _Versioned())
    state = net.state_dict()
    rebuilt = OrderedDict((k, v.clone()) for k, v in state.items())
    torch_state.copy_load_metadata(state, rebuilt)
    assert rebuilt._metadata == state._metadata and rebuilt._metadata is not state._metadata

    net.load_state_dict(rebuilt)
    del rebuilt._metadata  # what a copy without it would hand over
    net.load_state_dict(rebuilt)
    assert net[1].loaded_versions == [5, None]


def test_a_plain_dict_without_metadata_is_left_without(fresh_check: None):
    rebuilt: dict = {}
    torch_state.copy_load_metadata({"lr": 0.1}, rebuilt)
    assert not hasattr(rebuilt, "_metadata")


def test_a_torch_whose_state_dicts_carry_no_metadata_is_named_in_a_clear_error(fresh_check: None, monkeypatch: pytest.MonkeyPatch):
    state_dict = nn.Module.state_dict

    def without_metadata(self: nn.Module, *args: object, **kwargs: object) -> OrderedDict:
        return OrderedDict(state_dict(self, *args, **kwargs))  # a plain copy: no _metadata

    monkeypatch.setattr(nn.Module, "state_dict", without_metadata)
    with pytest.raises(
        CompatError, match=r"torch .* models\.compat\.torch_state assumes: a module's state_dict\(\) carries its submodules' versions"
    ):
        torch_state.copy_load_metadata(OrderedDict(), OrderedDict())
