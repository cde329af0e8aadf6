"""METEOR (Banerjee & Lavie 2005, "METEOR: An Automatic Metric for MT Evaluation with Improved
Correlation with Human Judgments"), computed by NLTK's `nltk.translate.meteor_score`.

METEOR aligns the words of a hypothesis with those of a reference in stages: exact matches
first, then words whose Porter stems match, then WordNet synonyms. From the m aligned words,
precision P = m / hypothesis length and recall R = m / reference length are combined into
Fmean = P R / (alpha P + (1 - alpha) R), recall-weighted. A fragmentation penalty
gamma * (chunks / m) ** beta punishes an alignment that falls into many pieces (chunks are
runs of words adjacent and in the same order on both sides); the score is
Fmean * (1 - penalty). NLTK's defaults alpha=0.9, beta=3, gamma=0.5 are the paper's formula
(Fmean = 10 P R / (R + 9 P), penalty 0.5 (chunks / m) ** 3). With several references a
prediction takes its best one.

Synonym matching needs the WordNet 3.0 database. NLTK looks for it in its own data folders
(`corpora/wordnet`), which `nltk.download` fills from the internet; offline, Debian's
`wordnet-base` package installs the same database to /usr/share/wordnet. NLTK cannot read
that folder as it stands: it lacks the `lexnames` file NLTK opens first, and NLTK refuses
folders that are not among its data paths. `use_wordnet(path)` deals with both (see its
docstring). Without WordNet, METEOR here uses exact and stem matches only, and the result
says so (`settings["synonyms"] is False`): such scores are lower than full METEOR and must
not be compared with it.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .base import MetricError, MetricResult, check_pairs

# Environment variable naming a WordNet database folder, read when no folder was given to
# `use_wordnet`.
WORDNET_ENV = "GENFORGE_WORDNET"
# Where Debian and Ubuntu's `wordnet-base` package puts the database.
SYSTEM_WORDNET_DIR = Path("/usr/share/wordnet")

# The WordNet 3.0 database files NLTK's reader needs; `lexnames` is supplied when absent.
WORDNET_FILES = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")) + tuple(
    f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")
)

# WordNet 3.0's 45 lexicographer files in file-number order (documented in lexnames(5WN), which
# Debian ships as a man page although it leaves the file itself out). The data files refer
# to them by number, and NLTK's reader loads this list before anything else.
_LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def lexnames_text() -> str:
    """The `lexnames` file of WordNet 3.0: "NN<tab>name<tab>category" per line."""
    return "".join(f"{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES))


class NoSynonyms:
    """A WordNet stand-in that knows no word: NLTK's METEOR functions take it as `wordnet=` and
    then align by exact and stem matches only. Used when no WordNet data is available."""

    def synsets(self, word: str, *args: Any, **kwargs: Any) -> list:
        return []

    def __repr__(self) -> str:
        return "NoSynonyms()"


# ------------------------------------------------------------------------------- WordNet data
_lock = threading.Lock()
_state: dict[str, Any] = {"resolved": False, "reader": None, "source": None}


def _missing_files(directory: Path) -> list[str]:
    return [name for name in WORDNET_FILES if not (directory / name).is_file()]


def _open_reader(directory: Path):
    """An NLTK WordNet reader over `directory`, which holds the WordNet 3.0 database files."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.data import FileSystemPathPointer

    class _FolderWordNet(WordNetCorpusReader):
        # Debian leaves `lexnames` out; the list is fixed for WordNet 3.0, so serve it from memory.
        def open(self, file):  # NLTK's name
            if file == "lexnames" and not (directory / "lexnames").is_file():
                return io.StringIO(lexnames_text())
            return super().open(file)

        # NLTK maps sense keys from its own "wordnet" corpus onto a loaded database to serve
        # the Open Multilingual Wordnet. That needs index.sense and NLTK's downloaded corpus;
        # METEOR uses neither, and no multilingual reader is attached here.
        def map_wn(self, version="wordnet"):
            return None

    # NLTK (3.9.3 and later) only opens files under its data paths, so the folder is added to
    # them: the sanctioned way to authorise a folder, and it affects only that folder.
    if not any(Path(str(p)).expanduser().resolve() == directory for p in nltk.data.path if isinstance(p, str)):
        nltk.data.path.append(str(directory))
    with warnings.catch_warnings():
        # "multilingual functions are not available": expected, there is no OMW reader.
        warnings.simplefilter("ignore")
        return _FolderWordNet(FileSystemPathPointer(str(directory)), None)


def use_wordnet(path: str | os.PathLike) -> Path:
    """Use the WordNet 3.0 database in the folder `path` for METEOR's synonym stage.

    The folder may be Debian's (`apt-get install wordnet-base` puts it in /usr/share/wordnet)
    or NLTK's own layout (`.../nltk_data/corpora/wordnet`, unzipped). It must hold the data,
    index and exception files of the four parts of speech (data.noun, index.noun, noun.exc,
    ...); `lexnames` is supplied from memory when missing, as it is in Debian's package. The
    folder is appended to `nltk.data.path`, because NLTK refuses to open files elsewhere.
    Loading takes about a second; the reader is kept for the rest of the process. Returns the
    resolved folder.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise MetricError(
            f"use_wordnet: {str(directory)!r} is not a folder; give the folder holding WordNet's "
            "data.noun, index.noun, ... (Debian: apt-get install wordnet-base, then /usr/share/wordnet)"
        )
    directory = directory.resolve()
    missing = _missing_files(directory)
    if missing:
        raise MetricError(
            f"use_wordnet: {str(directory)!r} lacks the WordNet 3.0 file(s) {', '.join(missing)}; "
            f"a WordNet folder holds {', '.join(WORDNET_FILES)}"
        )
    try:
        reader = _open_reader(directory)
        reader.synsets("dog")  # reads the index and one data file: a broken database fails here, not mid-metric
    except Exception as err:  # NLTK raises many kinds; all mean "not readable"
        raise MetricError(
            f"use_wordnet: NLTK could not read WordNet in {str(directory)!r}: {type(err).__name__}: {err}"
        ) from err
    with _lock:
        _state.update(resolved=True, reader=reader, source=str(directory))
    return directory


def _nltk_data_wordnet() -> bool:
    """Whether NLTK finds its own WordNet (downloaded earlier, or put under NLTK_DATA)."""
    import nltk

    for resource in ("corpora/wordnet.zip/wordnet/", "corpora/wordnet"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def _resolve() -> tuple[Any, str | None]:
    """(reader or None, where it came from), looked up once per process: `use_wordnet`'s
    folder, else $GENFORGE_WORDNET, else NLTK's own data, else /usr/share/wordnet."""
    with _lock:
        if _state["resolved"]:
            return _state["reader"], _state["source"]
    configured = os.environ.get(WORDNET_ENV)
    if configured:
        use_wordnet(configured)  # a wrong folder named on purpose is an error, not a silent fallback
    elif _nltk_data_wordnet():
        from nltk.corpus import wordnet

        with _lock:
            _state.update(resolved=True, reader=wordnet, source="nltk_data")
    elif not _missing_files(SYSTEM_WORDNET_DIR):
        try:
            use_wordnet(SYSTEM_WORDNET_DIR)
        except MetricError:  # found by guessing, unreadable: carry on without synonyms
            with _lock:
                _state.update(resolved=True, reader=None, source=None)
    else:
        with _lock:
            _state.update(resolved=True, reader=None, source=None)
    with _lock:
        return _state["reader"], _state["source"]


def wordnet_source() -> str | None:
    """Where METEOR's synonyms come from: a folder, "nltk_data", or None when no WordNet
    data was found (then METEOR matches exact words and stems only)."""
    return _resolve()[1]


# ----------------------------------------------------------------------------------- METEOR
def _default_tokenizer() -> Callable[[str], list[str]]:
    # NLTK's word tokenizer without its sentence splitter: word_tokenize needs the punkt model,
    # which is downloaded data; for one sentence the two give the same tokens.
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize


def meteor(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
    synonyms: bool | None = None,
    tokenizer: Callable[[str], list[str]] | None = None,
) -> MetricResult:
    """METEOR (Banerjee & Lavie 2005) through NLTK, mean of sentence scores on 0-1; `score` is
    that mean. See the module docstring for the formula.

    synonyms: None (default) matches WordNet synonyms when WordNet data is found (see
        `use_wordnet`) and exact + stem only otherwise; True requires WordNet; False never
        uses it. `settings["synonyms"]` records what happened; compare scores only between
        runs where it is the same.
    tokenizer: text -> list of tokens; default NLTK's Treebank-style word tokenizer
        (`NLTKWordTokenizer`, what `word_tokenize` applies within a sentence). Tokens are
        lowercased before matching, as NLTK does (its Porter stemmer lowercases anyway, so
        a case-sensitive variant would differ only in which stage matched).

    Each prediction takes its best-scoring reference. This is the sentence-level METEOR of
    NLTK (and of Hugging Face `evaluate`); the original system-level METEOR pools alignment
    counts over the corpus, which gives a different number.
    """
    predictions, grouped = check_pairs(predictions, references, "meteor")
    if not 0.0 <= alpha <= 1.0:
        raise MetricError(f"meteor: alpha weighs precision against recall and must lie in [0, 1], got {alpha}")
    if beta < 0:
        raise MetricError(f"meteor: beta is the penalty's exponent and must be >= 0, got {beta}")
    if not 0.0 <= gamma <= 1.0:
        raise MetricError(f"meteor: gamma is the largest penalty and must lie in [0, 1], got {gamma}")
    if synonyms not in (None, True, False):
        raise MetricError(f"meteor: synonyms must be None (use WordNet if found), True or False, got {synonyms!r}")

    import nltk
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import meteor_score

    reader, source = (None, None) if synonyms is False else _resolve()
    if synonyms is True and reader is None:
        raise MetricError(
            "meteor: synonyms=True but no WordNet data was found; install it with "
            "`apt-get install wordnet-base` (then it is found in /usr/share/wordnet), or call "
            f"use_wordnet(folder), or set ${WORDNET_ENV}; or pass synonyms=False"
        )
    wordnet = reader if reader is not None else NoSynonyms()
    split = tokenizer or _default_tokenizer()
    stemmer = PorterStemmer()  # NLTK's default stemmer for METEOR, made once rather than per call

    scores = []
    for prediction, refs in zip(predictions, grouped):
        scores.append(
            meteor_score(
                [split(r) for r in refs],
                split(prediction),
                preprocess=str.lower,
                stemmer=stemmer,
                wordnet=wordnet,
                alpha=alpha,
                beta=beta,
                gamma=gamma,
            )
        )
    mean = sum(scores) / len(scores)
    tokenizer_name = "nltk_word_tokenizer" if tokenizer is None else getattr(tokenizer, "__name__", "custom")
    stages = "exact, porter stem, wordnet synonyms" if reader is not None else "exact, porter stem"
    settings: dict[str, Any] = {
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "stages": stages,
        "synonyms": reader is not None,
        "wordnet": source,
        "tokenizer": tokenizer_name,
        "lowercase": True,
        "aggregate": "mean of sentence scores",
        "multiple_references": "best score per prediction",
        "implementation": f"nltk {nltk.__version__} meteor_score",
    }
    if synonyms is False:
        settings["note"] = "synonym matching switched off (synonyms=False)"
    elif reader is None:
        settings["note"] = (
            "no WordNet data found, so no synonym matching (exact and stem only): lower than full "
            "METEOR and not comparable with it; see use_wordnet"
        )
    return MetricResult("meteor", mean, {"meteor": mean}, settings)


__all__ = ["NoSynonyms", "WORDNET_ENV", "lexnames_text", "meteor", "use_wordnet", "wordnet_source"]
