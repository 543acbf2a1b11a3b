"""What the package's plugins share: their run state as ``state_dict()`` / ``load_state_dict()``; and the
callbacks of DR-CPSD's phases, for plugins of the :class:`~avalanche_drcpsd.strategy.DRCPSD` strategy."""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Tuple

from avalanche.training.plugins import SupervisedPlugin

__all__ = ["StatefulPlugin", "DRCPSDPlugin"]


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


class DRCPSDPlugin(SupervisedPlugin):
    """A plugin of the :class:`~avalanche_drcpsd.strategy.DRCPSD` strategy (its ``PLUGIN_CLASS``): a
    :class:`SupervisedPlugin` that may also implement the callbacks of DR-CPSD's phases
    (:data:`~avalanche_drcpsd.utils.PHASES`), called by the strategy as a phase begins and after it ends with
    ``(strategy, experience=<the experience's id>)``. They do nothing here, as Avalanche's own callbacks do in
    :class:`SupervisedPlugin`; override those you need."""

    def before_generation(self, strategy, *, experience: int, **kwargs):
        """Before the replay set is drawn from the generator."""

    def after_generation(self, strategy, *, experience: int, **kwargs):
        """After the replay set is drawn."""

    def before_classifier(self, strategy, *, experience: int, **kwargs):
        """Before the classifier trains on the experience's real data (the template's training loop)."""

    def after_classifier(self, strategy, *, experience: int, **kwargs):
        """After the classifier's training on the real data."""

    def before_generator(self, strategy, *, experience: int, **kwargs):
        """Before the generator learns the experience's new classes."""

    def after_generator(self, strategy, *, experience: int, **kwargs):
        """After the generator phase."""

    def before_cpsd(self, strategy, *, experience: int, **kwargs):
        """Before the CPSD embeddings of the new classes are learned."""

    def after_cpsd(self, strategy, *, experience: int, **kwargs):
        """After the CPSD phase (the new classes' embeddings are in the buffer)."""

    def before_replay(self, strategy, *, experience: int, **kwargs):
        """Before dream replay trains the student on real and synthetic batches."""

    def after_replay(self, strategy, *, experience: int, **kwargs):
        """After dream replay (the student is the strategy's model)."""
