"""The taxonomy as an ete3 tree: built from the metadata, stored as Newick, queried by rank.

File format (``results/data/taxonomy.nwk``): one Newick line written by ete3 with
``format=1`` (internal node names kept), ``quoted_node_names=True`` (names keep spaces and
punctuation; labels may not contain double quotes, which metadata validation rejects) and NHX
features on every node::

    (("Homo sapiens":1[&&NHX:n_images=12:rank=species])"Homo":1[&&NHX:...:rank=genus])"root":...;

A synthetic node named ``root`` with rank ``root`` holds the coarsest rank's classes. Every
other node's name is its class label and ``rank`` its level name. Branch lengths mean nothing.
Read it back with :func:`load_taxonomy` (which passes the same quoting flag).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd
from ete3 import Tree

ROOT_RANK = "root"
NEWICK_FORMAT = 1
FEATURES = ["rank", "n_images"]


def build_taxonomy(table: pd.DataFrame, levels: Sequence[str]) -> Tree:
    """A tree with one node per (rank, label); ``table`` must already form a tree."""
    root = Tree(name=ROOT_RANK)
    root.add_features(rank=ROOT_RANK, n_images=len(table))
    nodes: dict[tuple[str, ...], Tree] = {(): root}
    lineages = table.groupby(list(levels), sort=True).size()
    for lineage, n_images in lineages.items():
        # A single-level groupby yields scalar keys, several levels yield tuples.
        lineage = lineage if isinstance(lineage, tuple) else (lineage,)
        for depth, rank in enumerate(levels):
            key = lineage[: depth + 1]
            if key not in nodes:
                node = nodes[key[:-1]].add_child(name=key[-1])
                node.add_features(rank=rank, n_images=0)
                nodes[key] = node
            nodes[key].n_images += int(n_images)
    return root


def to_newick(tree: Tree) -> str:
    return tree.write(
        format=NEWICK_FORMAT, features=FEATURES, format_root_node=True, quoted_node_names=True
    )


def load_taxonomy(path: str | os.PathLike) -> Tree:
    """Read a taxonomy written by :func:`to_newick`; ``rank`` and ``n_images`` come back too."""
    tree = Tree(str(path), format=NEWICK_FORMAT, quoted_node_names=True)
    for node in tree.traverse():
        # NHX values are read back as strings.
        node.n_images = int(node.n_images)
    return tree


def ranks(tree: Tree) -> list[str]:
    """Rank names from coarse to fine, read off the first root-to-leaf path."""
    path = [tree.get_leaves()[0], *tree.get_leaves()[0].get_ancestors()]
    return [node.rank for node in reversed(path) if node.rank != ROOT_RANK]


def find_node(tree: Tree, rank: str, name: str) -> Tree:
    matches = tree.search_nodes(rank=rank, name=name)
    if not matches:
        raise KeyError(f"no {rank} named {name!r} in the taxonomy")
    return matches[0]


def classes_at_rank(tree: Tree, rank: str) -> list[str]:
    """Sorted class names at ``rank``."""
    names = sorted(node.name for node in tree.search_nodes(rank=rank))
    if not names:
        raise KeyError(f"rank {rank!r} not in the taxonomy (ranks: {ranks(tree)})")
    return names


def lineage(tree: Tree, rank: str, name: str) -> dict[str, str]:
    """``{rank: label}`` from the coarsest rank down to (and including) ``rank``."""
    node = find_node(tree, rank, name)
    path = [node, *node.get_ancestors()]
    return {n.rank: n.name for n in reversed(path) if n.rank != ROOT_RANK}


def siblings(tree: Tree, rank: str, name: str) -> list[str]:
    """Other classes at ``rank`` with the same parent (for the coarsest rank: all others)."""
    node = find_node(tree, rank, name)
    return sorted(child.name for child in node.up.children if child is not node)
