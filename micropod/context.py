"""What every command works against: the state root, its state store and image store, opened lazily."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from micropod.paths import StateRoot

if TYPE_CHECKING:
    from micropod.image.store import ImageStore
    from micropod.state import StateStore
    from micropod.state.pods import PodStore
    from micropod.volumes import VolumeStore


class Context:
    def __init__(self, root: StateRoot, debug: bool = False) -> None:
        self.root = root
        self.debug = debug

    @cached_property
    def state(self) -> StateStore:
        from micropod.state import StateStore  # sqlite and the schema: not every command opens them (pull)

        self.root.ensure()
        return StateStore(self.root.db)

    @cached_property
    def pods(self) -> PodStore:
        from micropod.state.pods import PodStore

        self.root.ensure()
        return PodStore(self.root.db)

    @cached_property
    def volumes(self) -> VolumeStore:
        from micropod.volumes import VolumeStore

        self.root.ensure()
        return VolumeStore(self.root.volumes, self.root.db)

    @cached_property
    def images(self) -> ImageStore:
        from micropod.image.store import ImageStore

        self.root.ensure()
        return ImageStore(self.root.images)
