"""N-way K-shot episodes for meta-learning: classes split into disjoint meta-train and meta-test pools, and episodes
drawn from a pool as a support set (K examples of each of N classes) and a query set (Q more of each), with the N
classes renumbered 0..N−1 in a random order per episode, so a meta-learned start cannot memorise which class sits
at which output (Finn et al. 2017; Nichol et al. 2018 do the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from deltatune.errors import UserError


@dataclass(frozen=True)
class Episode:
    classes: tuple[int, ...]  # the original class of episode label 0, 1, ...
    support: tuple[int, ...]  # example indices, `shots` per class, class by class
    support_labels: tuple[int, ...]
    query: tuple[int, ...]
    query_labels: tuple[int, ...]


def split_classes(classes: Sequence[int], meta_test: Sequence[int] | int, seed: int,
                  kind: str = "class") -> tuple[list[int], list[int]]:
    """(meta-train classes, meta-test classes): the meta-test ones as listed, or that many drawn with `seed`.
    Listed classes must exist and not repeat; the two pools never share a class. `kind` names what is split in the
    messages ("task" when the pools are tasks)."""
    kinds = "classes" if kind == "class" else f"{kind}s"
    known = sorted(set(classes))
    if isinstance(meta_test, int):
        if not 0 < meta_test < len(known):
            raise UserError(f"meta-test takes {meta_test} of the {len(known)} {kinds}; leave at least one {kind} on "
                            f"each side")
        chosen = sorted(np.random.default_rng(seed).choice(known, size=meta_test, replace=False).tolist())
    else:
        chosen = sorted(meta_test)
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise UserError(f"meta-test {kinds} {unknown} are not in the data (its {kinds}: {known})")
        if len(set(chosen)) != len(chosen):
            raise UserError(f"meta-test {kinds} {list(meta_test)} name a {kind} twice")
    train = [label for label in known if label not in chosen]
    if not train:
        raise UserError(f"every {kind} is a meta-test {kind}; leave some to meta-train on")
    return train, chosen


def pools_by_task(tasks: Sequence[int], labels: Sequence[int], chosen: Sequence[int], ways: int, shots: int,
                  queries: int) -> dict[int, dict[int, list[int]]]:
    """For each chosen task, the indices of its rows by class, keeping the classes with at least `shots + queries`
    rows; a task left with fewer than `ways` such classes cannot make an episode and is dropped."""
    rows: dict[int, dict[int, list[int]]] = {task: {} for task in chosen}
    for index, (task, label) in enumerate(zip(tasks, labels)):
        if task in rows:
            rows[task].setdefault(label, []).append(index)
    pools = {}
    for task, by_class in rows.items():
        usable = {label: indices for label, indices in sorted(by_class.items()) if len(indices) >= shots + queries}
        if len(usable) >= ways:
            pools[task] = usable
    return pools


def check_disjoint(meta_train: Sequence[int], meta_test: Sequence[int]) -> None:
    """Meta-test tasks that meta-training saw would measure memory, not fast adaptation."""
    shared = sorted(set(meta_train) & set(meta_test))
    if shared:
        raise UserError(f"classes {shared} are both meta-train and meta-test classes; the two pools must be disjoint")


def examples_by_class(labels: Sequence[int], pool: Sequence[int]) -> dict[int, list[int]]:
    """The indices of each pool class's examples, in order."""
    wanted = set(pool)
    by_class: dict[int, list[int]] = {label: [] for label in pool}
    for index, label in enumerate(labels):
        if label in wanted:
            by_class[label].append(index)
    return by_class


def check_episode_shape(by_class: dict[int, list[int]], ways: int, shots: int, queries: int, pool_name: str) -> None:
    """Enough classes for N ways and enough examples in every class for K + Q."""
    if ways < 2 or shots < 1 or queries < 1:
        raise UserError(f"episodes need ways ≥ 2, shots ≥ 1 and queries ≥ 1 (got {ways}, {shots}, {queries})")
    if len(by_class) < ways:
        raise UserError(f"{ways}-way episodes need {ways} classes but the {pool_name} pool has {len(by_class)}; "
                        f"lower the ways or move classes into it")
    short = {label: len(indices) for label, indices in by_class.items() if len(indices) < shots + queries}
    if short:
        label, count = min(short.items(), key=lambda item: item[1])
        raise UserError(f"class {label} of the {pool_name} pool has {count} examples, fewer than shots + queries = "
                        f"{shots} + {queries}; lower the shots or queries, or leave that class out")


def sample_episode(by_class: dict[int, list[int]], ways: int, shots: int, queries: int,
                   generator: np.random.Generator) -> Episode:
    """One episode: N classes of the pool in a random order (episode label = position), and for each, K support
    and Q query examples drawn without replacement. A class with fewer than K + Q examples gives every one it has
    beyond its K as queries: pools are checked for the run's own Q, so only a wider evaluation (meta-eval
    `--queries`) meets one, and its episodes then score each class on all it has."""
    classes = generator.choice(sorted(by_class), size=ways, replace=False).tolist()
    support, support_labels, query, query_labels = [], [], [], []
    for episode_label, label in enumerate(classes):
        rows = by_class[label]
        drawn = generator.choice(rows, size=min(len(rows), shots + queries), replace=False).tolist()
        support += drawn[:shots]
        support_labels += [episode_label] * shots
        query += drawn[shots:]
        query_labels += [episode_label] * (len(drawn) - shots)
    return Episode(tuple(classes), tuple(support), tuple(support_labels), tuple(query), tuple(query_labels))
