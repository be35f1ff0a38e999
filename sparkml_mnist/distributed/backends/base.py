"""The backend interface: environment before the framework is imported, a strategy after."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from sparkml_mnist.distributed.spec import RankSpec


class Backend(ABC):
    """How one rank joins the others. Runs in the rank's fresh training process."""

    name: str

    @abstractmethod
    def environment(self, spec: RankSpec) -> dict[str, str]:
        """Variables the training process must have before it imports the framework (e.g. TF_CONFIG)."""

    @abstractmethod
    def strategy(self, spec: RankSpec) -> Any:
        """The framework object that runs collectives across ranks (made once per process, on demand)."""
