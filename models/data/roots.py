"""Where a data path leads: each team reads its own folder of the data root, and the shared folder.

    <data_root>/
      shared/       every team's: a path 'shared/<rest>' is <data_root>/shared/<rest>
      team-a/       team-a's: its path 'cifar/train.npz' is <data_root>/team-a/cifar/train.npz
      team-b/

The team is the submitting token's (``convtune.team`` on the run); the API and the workers only
read these folders. With no team (authentication off: the one-host local stack, most tests) a path
is relative to the data root itself, as it always was.

A path that leaves the folder it is looked up in (``..``, an absolute path, a symlink out of it,
another team's folder) is answered exactly as a path that does not exist: a team learns nothing of
another's files. No team may be named ``shared`` (nor ``.`` or ``..``): :data:`RESERVED_TEAM_NAMES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.errors import ConvtuneError

__all__ = ["RESERVED_TEAM_NAMES", "SHARED_FOLDER", "DataRoot", "InvalidData", "data_root_for"]

SHARED_FOLDER = "shared"
# Names whose folder would be the shared one, or the data root and its parent.
RESERVED_TEAM_NAMES = frozenset({SHARED_FOLDER, ".", ".."})


class InvalidData(ConvtuneError, ValueError):
    """The data set named by a spec cannot be used; the message says why, in a person's words."""


@dataclass(frozen=True)
class DataRoot:
    """The data root as one team sees it: its own folder and the shared one (everything, with no team)."""

    path: Path
    team: str | None = None

    def folder_of(self, relative: str) -> Path | None:
        """The folder ``relative`` must stay in, symlinks followed; None when it does not exist.

        Raises InvalidData when the data root itself does not exist: a deployment's mistake, not the caller's.
        """
        looked_up = self._lookup(relative)
        return None if looked_up is None else looked_up[1]

    def find(self, relative: str) -> Path | None:
        """Where ``relative`` leads, symlinks followed; None when it leaves its folder (or the folder is missing).

        It may not exist: the caller answers a None exactly as a path that does not.
        """
        looked_up = self._lookup(relative)
        return None if looked_up is None else inside(looked_up[0], looked_up[1])

    def _lookup(self, relative: str) -> tuple[Path, Path] | None:
        """(``relative`` joined to its folder, not resolved; the folder, resolved), or None when the folder is missing."""
        try:
            root = self.path.resolve(strict=True)
        except OSError as exc:
            raise InvalidData("the data root does not exist on this machine") from exc
        if self.team is None:
            folder, joined = root, root / relative
        elif relative.split("/", 1)[0] == SHARED_FOLDER:
            folder, joined = root / SHARED_FOLDER, root / relative
        elif self.team in RESERVED_TEAM_NAMES:
            return None  # refused where tokens are configured; a run tagged so by hand reads nothing
        else:
            folder = root / self.team
            joined = folder / relative
        try:
            return joined, folder.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, unreadable, a symlink loop
            return None


def inside(path: Path, folder: Path) -> Path | None:
    """``path`` resolved, when it stays in ``folder`` (resolved); else None."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError):
        return None
    return target if target.is_relative_to(folder) else None


def data_root_for(root: Path | None, team: str | None) -> DataRoot | None:
    """The data root (None: this process has none) as ``team`` sees it."""
    return None if root is None else DataRoot(root, team)
