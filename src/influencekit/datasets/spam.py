"""Spam data for Koh & Liang (2017), §5.4: Enron-spam folders, or a generated bag-of-words corpus.

The paper used the ``enron1`` part of the public Enron-spam corpus (Metsis et al. 2006): 3,672 ham
and 1,500 spam e-mails, one text file each, split 80/20 into 4,137 training and 1,035 test
e-mails, turned into word counts (scikit-learn's ``CountVectorizer(min_df=5)`` over words
lemmatised by spaCy, stop words removed), label 1 = spam. :func:`enron_spam` reads such a folder
from a path the user gives (nothing is downloaded); :func:`generate_spam_corpus` builds a corpus of
word counts with the same shape for when no folder is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer

from ..errors import InputError
from .images import Split

# Alphabetic words of two letters or more (spaCy's is_alpha in the authors' pipeline).
TOKEN_PATTERN = r"(?u)\b[a-zA-Z][a-zA-Z]+\b"
ENRON1_TRAIN, ENRON1_TEST = 4137, 1035


@dataclass
class BagOfWordsSplit(Split):
    """A :class:`Split` of word-count rows ``(n, V)`` with the words of its columns.

    Labels are int64, 1 = spam, 0 = ham; counts are float64.
    """

    vocabulary: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------- reading


def _class_folders(folder: Path) -> list[tuple[Path, int]]:
    """``(subfolder, label)`` pairs: ``folder/ham``, ``folder/spam``, or ``folder/*/ham`` etc."""
    found = []
    for parent in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        for name, label in (("ham", 0), ("spam", 1)):
            if (parent / name).is_dir():
                found.append((parent / name, label))
    return found


def read_enron_folder(folder: str | Path) -> tuple[list[str], np.ndarray]:
    """Texts and labels (1 = spam) of every file under the ham/ and spam/ folders of ``folder``.

    Accepted layouts: ``FOLDER/ham/*`` and ``FOLDER/spam/*`` (one Enron-spam part such as
    ``enron1``), or ``FOLDER/enron1/ham/*``, ``FOLDER/enron1/spam/*``, ``FOLDER/enron2/...``
    (several parts, read together). Files are read as Latin-1, as the authors did. Files are
    sorted by path, so the order does not depend on the file system; hidden files are skipped.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist. Expected a folder of the Enron-spam "
                                "corpus with ham/ and spam/ subfolders (e.g. enron1/).")
    if not folder.is_dir():
        raise InputError(f"{folder} is a file; --data for sec54-mislabel expects a folder with "
                         "ham/ and spam/ subfolders of e-mails, one text file each (e.g. the "
                         "extracted enron1/ of the Enron-spam corpus).")
    pairs = _class_folders(folder)
    if not pairs:
        inside = sorted(p.name for p in folder.iterdir())[:8]
        raise InputError(
            f"{folder} has no ham/ or spam/ subfolder (it holds {inside or 'nothing'}). Expected "
            "FOLDER/ham/*.txt and FOLDER/spam/*.txt, or FOLDER/enron1/ham/*.txt, ... as in the "
            "public Enron-spam corpus; point --data at the folder that holds them.")
    texts: list[str] = []
    labels: list[int] = []
    for subfolder, label in pairs:
        for path in sorted(p for p in subfolder.rglob("*")
                           if p.is_file() and not p.name.startswith(".")):
            texts.append(path.read_bytes().decode("latin-1"))
            labels.append(label)
    counts = np.bincount(np.array(labels, dtype=np.int64), minlength=2)
    if counts.min() == 0:
        missing = "ham" if counts[0] == 0 else "spam"
        raise InputError(f"{folder}: found {counts[0]} ham and {counts[1]} spam e-mails; the "
                         f"experiment needs both classes. Add files under a {missing}/ folder.")
    return texts, np.array(labels, dtype=np.int64)


def enron_spam(folder: str | Path, test_fraction: float = 0.2, seed: int = 0,
               min_df: int | None = None, max_features: int | None = 1000) -> BagOfWordsSplit:
    """Enron-spam e-mails from ``folder`` as word counts, split into training and test sets.

    The e-mails are shuffled with ``seed`` and the first ``1 − test_fraction`` of them train (the
    authors' 80/20 split). The vocabulary is learnt on the training e-mails only: lower-cased
    alphabetic words of two or more letters, scikit-learn's English stop words removed, words in
    at least ``min_df`` training e-mails (default 5, as the authors; 1 below 500 e-mails), the
    ``max_features`` most frequent kept (default 1,000, so that the explicit Hessian stays small;
    ``None`` keeps all). Returns counts ``(n, V)`` float64 and labels (1 = spam).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    texts, labels = read_enron_folder(folder)
    if len(texts) < 10:
        raise InputError(f"{folder}: only {len(texts)} e-mails; the experiment needs at least 10 "
                         "(the paper's enron1 has 5,172).")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_train = round((1.0 - test_fraction) * len(texts))
    train, test = order[:n_train], order[n_train:]
    if min_df is None:
        min_df = 5 if n_train >= 500 else 1
    vectorizer = CountVectorizer(token_pattern=TOKEN_PATTERN, stop_words="english",
                                 min_df=min_df, max_features=max_features)
    try:
        X_train = vectorizer.fit_transform([texts[i] for i in train])
    except ValueError as error:
        raise InputError(f"{folder}: no words are left after removing stop words and words in "
                         f"fewer than {min_df} training e-mails ({error}). Use more e-mails or a "
                         "smaller min_df.") from error
    X_test = vectorizer.transform([texts[i] for i in test])
    vocabulary = tuple(vectorizer.get_feature_names_out().tolist())
    name = (f"Enron-spam e-mails from {folder} ({len(train):,} train / {len(test):,} test, "
            f"{labels.mean():.0%} spam, {len(vocabulary):,} words)")
    return _as_split(X_train.toarray(), labels[train], X_test.toarray(), labels[test], name,
                     vocabulary)


def _as_split(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
              name: str, vocabulary: tuple[str, ...]) -> BagOfWordsSplit:
    return BagOfWordsSplit(torch.tensor(X_train, dtype=torch.float64), torch.tensor(y_train),
                           torch.tensor(X_test, dtype=torch.float64), torch.tensor(y_test), name,
                           vocabulary)


# ---------------------------------------------------------------------------------- generating


@dataclass(frozen=True)
class CorpusSettings:
    """How :func:`generate_spam_corpus` writes e-mails.

    Attributes:
        spam_share: fraction of spam (enron1: 1,500 of 5,172).
        ham_topics, spam_topics: topics per class; each e-mail is about one topic of its class.
        topic_words: words per topic, drawn uniformly from the vocabulary (rare words included).
        topic_concentration: Dirichlet concentration of a topic's word weights (small = few
            dominant words).
        background: share of an e-mail's words drawn from the Zipfian background vocabulary
            shared by both classes.
        zipf_exponent: the background word frequency falls as rank^−exponent.
        mean_log_length, sd_log_length: e-mail length in words is log-normal.
        min_df: words in fewer training e-mails are dropped (the authors' CountVectorizer).
    """

    spam_share: float = 0.29
    ham_topics: int = 30
    spam_topics: int = 15
    topic_words: int = 60
    topic_concentration: float = 0.3
    background: float = 0.3
    zipf_exponent: float = 1.2
    mean_log_length: float = 4.0
    sd_log_length: float = 1.0
    min_df: int = 5


def _topics(rng: np.random.Generator, count: int, vocabulary: int,
            settings: CorpusSettings) -> np.ndarray:
    """``(count, vocabulary)`` word distributions, each on ``topic_words`` random words."""
    topics = np.zeros((count, vocabulary))
    for row in topics:
        words = rng.choice(vocabulary, size=settings.topic_words, replace=False)
        row[words] = rng.dirichlet(np.full(settings.topic_words, settings.topic_concentration))
    return topics


def generate_spam_corpus(n_train: int = ENRON1_TRAIN, n_test: int = ENRON1_TEST,
                         vocabulary: int = 1000, seed: int = 0,
                         settings: CorpusSettings | None = None) -> BagOfWordsSplit:
    """Word counts of generated ham and spam e-mails, shaped like the paper's enron1 split.

    Each e-mail has a class (spam with probability ``spam_share``), a topic of that class, and a
    log-normal length L; its L words are drawn from ``background``·Zipf + (1 − background)·topic
    (the vocabulary is shared, so classes overlap through common words and shared topic words).
    Words used by fewer than ``min_df`` training e-mails are dropped. Columns are named
    ``w0000``, ``w0001``, ... by background frequency rank.
    """
    settings = settings or CorpusSettings()
    if n_train < 10 or n_test < 1 or vocabulary < 10:
        raise ValueError(f"need n_train ≥ 10, n_test ≥ 1 and vocabulary ≥ 10, got {n_train}, "
                         f"{n_test}, {vocabulary}.")
    rng = np.random.default_rng(seed)
    background = np.arange(1, vocabulary + 1, dtype=np.float64) ** -settings.zipf_exponent
    background /= background.sum()
    topics = [_topics(rng, settings.ham_topics, vocabulary, settings),
              _topics(rng, settings.spam_topics, vocabulary, settings)]
    n = n_train + n_test
    labels = (rng.random(n) < settings.spam_share).astype(np.int64)
    lengths = np.clip(np.round(np.exp(rng.normal(settings.mean_log_length,
                                                 settings.sd_log_length, n))), 2, 5000)
    word_probabilities = np.empty((n, vocabulary))
    for label in (0, 1):
        rows = np.flatnonzero(labels == label)
        chosen = rng.integers(len(topics[label]), size=len(rows))
        word_probabilities[rows] = (settings.background * background
                                    + (1.0 - settings.background) * topics[label][chosen])
    counts = rng.multinomial(lengths.astype(np.int64), word_probabilities).astype(np.float64)
    kept = (counts[:n_train] > 0).sum(axis=0) >= settings.min_df
    counts = counts[:, kept]
    words = tuple(f"w{k:04d}" for k in np.flatnonzero(kept))
    name = (f"generated bag-of-words spam/ham corpus ({n_train:,} train / {n_test:,} test, "
            f"{labels.mean():.0%} spam, {len(words):,} words, seed {seed})")
    return _as_split(counts[:n_train], labels[:n_train], counts[n_train:], labels[n_train:], name,
                     words)
