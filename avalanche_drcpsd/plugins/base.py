"""What the package's plugins share: their run state as ``state_dict()`` / ``load_state_dict()``."""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Tuple

from avalanche.training.plugins import SupervisedPlugin

__all__ = ["StatefulPlugin"]


class StatefulPlugin(SupervisedPlugin):
    """An Avalanche plugin whose run state (what changes while it trains, as opposed to its settings, which its
    constructor takes) is the attributes named in :attr:`state_attributes`: plain data and tensors, read and
    written with :meth:`state_dict` / :meth:`load_state_dict` as a torch module's are. The phase checkpoint saves
    exactly these; large members with their own format (a generator, teachers, the embedding buffer) are saved by
    the checkpoint beside them."""

    #: the attributes that make up :meth:`state_dict`
    state_attributes: Tuple[str, ...] = ()

    def state_dict(self, *, copy_values: bool = True) -> Dict[str, Any]:
        """The run state: ``{name: value}`` for every name in :attr:`state_attributes`, copied, or with
        ``copy_values=False`` the live objects (for a reader that copies or only inspects them, as the phase
        checkpoint's encoder does)."""
        if not copy_values:
            return {name: getattr(self, name) for name in self.state_attributes}
        return {name: copy.deepcopy(getattr(self, name)) for name in self.state_attributes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a missing or unknown entry is a ``KeyError`` that names it."""
        missing = [name for name in self.state_attributes if name not in state]
        unexpected = [name for name in state if name not in self.state_attributes]
        if missing or unexpected:
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing {missing}, unexpected {unexpected}; "
                           f"expected the entries {list(self.state_attributes)}")
        for name in self.state_attributes:
            setattr(self, name, copy.deepcopy(state[name]))
