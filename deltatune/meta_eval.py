"""`deltatune meta-eval RUN_DIR`: how well a meta-learned start adapts to classes it never saw, against the plain
pretrained start, on the same episodes with the same adaptation.

Episodes are N-way K-shot draws (the run's ways, shots and queries) from the meta-test pool the run saved, over its
rows in every split (meta-training never drew from those classes). Each start is adapted to an episode's support
set by the run's inner steps and inner learning rate (`objective.inner_steps`, `inner_lr`), then scored on the query set; the
result is the mean query accuracy over E episodes with a 95% confidence interval (1.96 standard errors), and the same
for the per-episode difference (the starts share their episodes, so this paired interval is the sharper one), written to
`RUN_DIR/meta_eval.json`. The pretrained start is the run's model before training: the same seeded head and method
initialisation the meta-training started from, and with `model.init_from` that run's weights loaded over them, so
the difference measures meta-training alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deltatune.errors import UserError
from deltatune.training.device import to_device


def meta_evaluate(path: str | Path, episodes: int = 100, queries: int | str | None = None,
                  echo=print) -> dict[str, dict[str, float]]:
    """Mean episode accuracy (and its 95% interval) of the meta-learned and the pretrained start. `queries`: the
    query examples per class (at most: a class with fewer gives all it has beyond the shots), or "all"; None keeps
    the run's `objective.queries`."""
    from safetensors.torch import load_file

    from deltatune.data.episodes import check_disjoint
    from deltatune.models.hf import align_padding
    from deltatune.objectives.meta_learning import MetaLearning
    from deltatune.preparation import build_model, start_from_run
    from deltatune.runs import open_run

    if episodes < 2:
        raise UserError(f"--episodes is {episodes}; use at least 2 (a confidence interval needs a spread)")
    queries = parsed_queries(queries)
    saved = open_run(path)
    require_meta_learning(saved.config, f"{path} was trained with objective {saved.config.objective.name!r}; "
                                        "meta-eval reads runs of a meta-learning objective (deltatune meta-train)")
    run = saved.load(with_data=True)
    objective = run.objective
    assert isinstance(objective, MetaLearning)
    data = run.data
    objective.label_names = data.label_names
    objective.attach_examples(data.by_split(),
                              lambda chosen: to_device(data.collate(chosen), run.device))
    kind = "tasks" if objective.task_names is not None else "classes"
    pools = {side: load_file(saved.run_dir.path / "precomputed" / f"meta_{side}_{kind}.safetensors")["values"].tolist()
             for side in ("train", "test")}
    check_disjoint(pools["train"], pools["test"])  # a run directory whose saved pools were edited to overlap
    meta_test = pools["test"]
    examples = [*data.train, *data.validation, *data.test]
    episode_pools = objective.meta_test_pools(examples, meta_test)
    config = objective.config
    per_class = query_count(queries, episode_pools, config.queries)
    num_labels = run.config.model.num_labels or data.num_labels
    pretrained, method = build_model(run.config, run.task, num_labels)
    align_padding(pretrained, run.processor)
    if run.config.model.init_from is not None:  # meta-training started from that run's weights, not the bare base
        try:
            start_from_run(pretrained, method, run.config)
        except UserError as error:
            raise UserError(f"meta-eval compares with the start this run trained from, model.init_from="
                            f"{run.config.model.init_from}, which it cannot read now: {error}") from None
    pretrained = pretrained.to(run.device).eval()
    starts = {"meta-learned": run.model.eval(), "pretrained": pretrained}
    accuracies: dict[str, list[float]] = {name: [] for name in starts}
    for number in range(episodes):
        episode = objective.next_episode(episode_pools, 2, number, per_class)
        support, query = objective.episode_batches(examples, episode)
        for name, model in starts.items():
            _, adapted = objective.adapted(model, support)
            accuracies[name].append(objective.query_scores(model, adapted, query)[1])
    result = {name: _interval(values) for name, values in accuracies.items()}
    # Both starts adapt on the very same episodes, so the per-episode difference is the sharper test of the gain.
    result["difference"] = _interval([meta - plain for meta, plain in zip(*accuracies.values())])
    queries_said = config.queries if queries is None else queries
    result["settings"] = {"episodes": episodes, "ways": config.ways, "shots": config.shots, "queries": queries_said,
                          "inner_steps": config.inner_steps, "inner_lr": config.inner_lr, f"meta_test_{kind}": meta_test}
    (saved.run_dir.path / "meta_eval.json").write_text(json.dumps(result, indent=1))
    _print_result(result, f"{kind} {_named(meta_test, objective)}", echo)
    return result


def _print_result(result: dict[str, Any], pool: str, echo) -> None:
    settings = result["settings"]
    for name in ("meta-learned", "pretrained"):
        echo(f"{name:>12}: episode accuracy {result[name]['mean']:.4f} ± {result[name]['ci95']:.4f} (95% CI, "
             f"{settings['episodes']} episodes of {settings['ways']}-way {settings['shots']}-shot, "
             f"{settings['queries']} queries a class, on {pool})")
    echo(f"  difference: {result['difference']['mean']:+.4f} ± {result['difference']['ci95']:.4f} (95% CI of the "
         f"per-episode gain, meta-learned − pretrained, on the same episodes)")


def parsed_queries(queries: int | str | None) -> int | str | None:
    """`--queries` as None (the run's own), a positive number, or "all"; anything else is a UserError."""
    if queries is None or queries == "all":
        return queries
    if isinstance(queries, str) and queries.isdigit():
        queries = int(queries)
    if not isinstance(queries, int) or isinstance(queries, bool) or queries < 1:
        raise UserError(f"--queries is {queries!r}; give a number of query examples per class (≥ 1) or 'all'")
    return queries


def query_count(queries: int | str | None, pools: dict[int, dict[int, list[int]]], run_queries: int) -> int:
    """Queries per class to draw: the run's own, the number given, or for "all" as many as the largest class has."""
    if queries is None:
        return run_queries
    if queries == "all":
        return max(len(rows) for pool in pools.values() for rows in pool.values())
    return int(queries)


def require_meta_learning(config: Any, message: str) -> None:
    """A UserError with `message` unless the config's objective is meta-learning (checked by its class, so a
    registered variant of it counts too)."""
    from deltatune.objectives import get_objective
    from deltatune.objectives.meta_learning import MetaLearning
    from deltatune.preparation import run_task

    if not issubclass(get_objective(config.objective.name, run_task(config)), MetaLearning):
        raise UserError(message)


def _interval(values: list[float]) -> dict[str, Any]:
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    return {"mean": mean, "ci95": 1.96 * spread / math.sqrt(len(values))}


def _named(ids: list[int], objective: Any) -> list[Any]:
    """Meta-test tasks or classes by name where the data names them, else by id."""
    names = objective.task_names if objective.task_names is not None else objective.label_names
    return [names[i] for i in ids] if names else ids
