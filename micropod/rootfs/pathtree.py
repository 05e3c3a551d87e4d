"""Paths as a tree of components, for the flattener's questions about a path's ancestors ("is one of
them hidden, or a file of this layer?"). Each walk is one pass over the path, so a path costs its own
length: a set of every ancestor's full path costs the sum of their lengths, quadratic in the depth.
"""

from __future__ import annotations

from collections.abc import Iterator


class PathNode:
    """One path of the tree: what higher layers decided about it."""

    __slots__ = ("children", "nondir_layer", "required", "subtree")

    def __init__(self) -> None:
        self.children: dict[str, PathNode] | None = None
        self.subtree = False  # a higher layer hides everything below this path
        self.required = False  # an emitted path lies below: this one must be a directory
        self.nondir_layer = -1  # the index of the layer that has a non-directory here


class PathTree:
    """Paths as a tree of components, so that walking a path's ancestors is one pass over it."""

    def __init__(self) -> None:
        self.root = PathNode()

    def find(self, path: str) -> PathNode | None:
        node = self.root
        for part in path.split("/") if path else ():
            child = node.children.get(part) if node.children is not None else None
            if child is None:
                return None
            node = child
        return node

    def make(self, path: str) -> PathNode:
        node = self.root
        for part in path.split("/") if path else ():
            node = self._child(node, part)
        return node

    def ancestors(self, path: str, *, create: bool = False) -> Iterator[PathNode]:
        """The proper ancestors of `path` but the root, outermost first; without `create`, those that exist."""
        node = self.root
        for part in path.split("/")[:-1]:
            if create:
                node = self._child(node, part)
            else:
                found = node.children.get(part) if node.children is not None else None
                if found is None:
                    return
                node = found
            yield node

    @staticmethod
    def _child(node: PathNode, part: str) -> PathNode:
        if node.children is None:
            node.children = {}
        child = node.children.get(part)
        if child is None:
            child = node.children[part] = PathNode()
        return child
