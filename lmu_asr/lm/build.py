"""``lmuasr lm build``: a word n-gram LM (interpolated modified Kneser-Ney, ARPA) and a lexicon from transcripts.

The estimate is the one KenLM's ``lmplz`` makes (Chen & Goodman's modified Kneser-Ney, interpolated): the highest
order keeps raw counts, lower orders use continuation counts (how many distinct words precede the n-gram),
except n-grams that start with ``<s>``, which nothing can precede and which keep raw counts; three discounts per
order from the counts of counts; the unigram distribution interpolates with a uniform one over the vocabulary and
``<unk>``. Written as ARPA (interpolated probabilities of seen n-grams, backoff weights of their contexts), which
KenLM and flashlight-text's decoder load.

Counting is vectorised: sentences become one id array, n-grams int64 keys (ids packed into bits), counts come from
``np.unique``, sums per context from ``np.bincount``; only writing the ARPA text touches every n-gram in Python.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmu_asr import UserError
from lmu_asr.fileio import atomic_write, atomic_write_with
from lmu_asr.text import SYMBOLS

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@dataclass
class Order:
    """The n-grams of one order: packed keys (sorted), interpolated log10 probabilities, log10 backoffs."""

    keys: np.ndarray
    logp: np.ndarray
    backoff: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _pack(rows: np.ndarray, bits: int) -> np.ndarray:
    key = np.zeros(len(rows), np.int64)
    for j in range(rows.shape[1]):
        key = (key << bits) | rows[:, j].astype(np.int64)
    return key


def _unpack(keys: np.ndarray, k: int, bits: int) -> np.ndarray:
    mask = (1 << bits) - 1
    return np.stack([(keys >> (bits * (k - 1 - j))) & mask for j in range(k)], axis=1)


def _discounts(counts: np.ndarray) -> np.ndarray:
    """D(1), D(2), D(3+) from the counts of counts (Chen & Goodman), clipped to a usable range."""
    t = [int((counts == c).sum()) for c in (1, 2, 3, 4)]
    if min(t) == 0:
        return np.array([0.5, 1.0, 1.5])
    y = t[0] / (t[0] + 2 * t[1])
    d = np.array([1 - 2 * y * t[1] / t[0], 2 - 3 * y * t[2] / t[1], 3 - 4 * y * t[3] / t[2]])
    return np.clip(d, 0.01, [0.99, 1.99, 2.99])


def words_of(lines: Iterable[str]) -> Iterator[list[str]]:
    for line in lines:
        words = line.split()
        if words:
            yield words


def estimate(sentences: Iterable[list[str]], order: int = 3) -> tuple[list[str], list[Order], int]:
    """(vocabulary, per-order n-gram tables, bits per id) of the modified Kneser-Ney model of ``sentences``."""
    if order < 2:
        raise UserError("--order must be at least 2 (flashlight's KenLM loads ARPA files of order >= 2)")
    vocab = {BOS: 0, EOS: 1, UNK: 2}
    ids: list[int] = []
    for words in sentences:
        ids.append(0)
        ids.extend(vocab.setdefault(w, len(vocab)) for w in words)
        ids.append(1)
    if len(ids) < 3:
        raise UserError("no text to build a language model from")
    seq = np.array(ids, np.int64)
    bits = max(1, math.ceil(math.log2(len(vocab))))
    if bits * order > 63:
        raise UserError(f"vocabulary of {len(vocab):,} words is too large for order {order} (ids must pack into 63 "
                        "bits); lower --order")
    sent = np.cumsum(seq == 0) - 1  # sentence index of every position
    tables: list[tuple[np.ndarray, np.ndarray]] = [None] * (order + 1)  # type: ignore[list-item]
    for k in range(order, 0, -1):
        starts = np.arange(len(seq) - k + 1)
        starts = starts[sent[starts] == sent[starts + k - 1]]
        rows = np.stack([seq[starts + j] for j in range(k)], axis=1)
        rows = rows[(rows[:, 1:] != 0).all(axis=1)] if k > 1 else rows[rows[:, 0] != 0]  # <s> only first
        keys, raw = np.unique(_pack(rows, bits), return_counts=True)
        if k == order:
            counts = raw
        else:  # continuation counts: distinct left words of the n-gram in the (k+1)-gram table
            higher = tables[k + 1][0]
            suffix = higher & ((1 << (bits * k)) - 1)
            cont_keys, cont = np.unique(suffix, return_counts=True)
            counts = raw.copy()
            first = _unpack(keys, k, bits)[:, 0]
            pos = np.searchsorted(cont_keys, keys)
            found = (pos < len(cont_keys)) & (cont_keys[np.minimum(pos, len(cont_keys) - 1)] == keys)
            use = found & (first != 0)
            counts[use] = cont[pos[use]]
        tables[k] = (keys, counts)
    out: list[Order] = []
    n_vocab = len(vocab) - 1  # every word but <s> can be predicted (</s> and <unk> included)
    lower_p: np.ndarray | None = None
    for k in range(1, order + 1):
        keys, counts = tables[k]
        if k == 1:  # <s> is never predicted: it takes no probability mass (but is a context)
            keys, counts = keys[keys != 0], counts[keys != 0]
        d = _discounts(counts)
        disc = d[np.minimum(counts, 3) - 1]
        ctx = keys >> bits if k > 1 else np.zeros(len(keys), np.int64)
        ctx_keys, ctx_inv = np.unique(ctx, return_inverse=True)
        total = np.bincount(ctx_inv, weights=counts)
        n_by = [np.bincount(ctx_inv, weights=(np.minimum(counts, 3) == j)) for j in (1, 2, 3)]
        gamma = (d[0] * n_by[0] + d[1] * n_by[1] + d[2] * n_by[2]) / total
        u = (counts - disc) / total[ctx_inv]
        if k == 1:
            uniform = gamma[0] / n_vocab  # interpolation with a uniform distribution over the vocabulary
            p = u + uniform
            extra = [(0, 0.0)] + ([] if (keys == 2).any() else [(2, uniform)])  # <s>, and <unk> if unseen
            keys = np.append(keys, [e[0] for e in extra])
            p = np.append(p, [e[1] for e in extra])
            sort = np.argsort(keys)
            keys, p = keys[sort], p[sort]
        else:
            suffix = keys & ((1 << (bits * (k - 1))) - 1)
            pos = np.searchsorted(out[-1].keys, suffix)
            p = u + gamma[ctx_inv] * lower_p[pos]  # type: ignore[index]
            prev = out[-1]  # the contexts' backoff weights live on the (k-1)-grams
            prev.backoff[np.searchsorted(prev.keys, ctx_keys)] = np.log10(gamma)
        logp = np.where(p > 0, np.log10(np.maximum(p, 1e-300)), -99.0)
        out.append(Order(keys, logp, np.zeros(len(keys))))
        lower_p = p
    words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return words, out, bits


def write_arpa(words: list[str], tables: list[Order], bits: int, f) -> None:  # noqa: ANN001 (binary file)
    f.write(b"\\data\\\n")
    for k, t in enumerate(tables, 1):
        f.write(f"ngram {k}={len(t.keys)}\n".encode())
    for k, t in enumerate(tables, 1):
        f.write(f"\n\\{k}-grams:\n".encode())
        rows = _unpack(t.keys, k, bits)
        last = k == len(tables)
        lines = []
        for r, lp, bo in zip(rows.tolist(), t.logp.tolist(), t.backoff.tolist(), strict=True):
            text = " ".join(words[i] for i in r)
            lines.append(f"{lp:.6f}\t{text}\n" if last or bo == 0 else f"{lp:.6f}\t{text}\t{bo:.6f}\n")
            if len(lines) >= 100_000:
                f.write("".join(lines).encode())
                lines.clear()
        f.write("".join(lines).encode())
    f.write(b"\n\\end\\\n")


def spell(word: str) -> str | None:
    """The lexicon's spelling of a word in the model's letters, or None if it has a letter the model lacks."""
    return " ".join(word) if word and all(c in SYMBOLS and c != " " for c in word) else None


def build_lm(texts: Iterable[str], out: Path, order: int = 3, sources: list[str] | None = None) -> dict:
    """Write ``lm.arpa``, ``lexicon.txt`` (word, then its letters) and ``lm.json`` into ``out``."""
    t0 = time.time()
    lines = list(texts)
    words, tables, bits = estimate(words_of(lines), order)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out / "lm.arpa", lambda f: write_arpa(words, tables, bits, f))
    lexicon = [(w, spell(w)) for w in words[3:]]
    atomic_write(out / "lexicon.txt", "".join(f"{w}\t{s}\n" for w, s in lexicon if s))
    info = {"order": order, "sentences": len(lines), "words": sum(len(x.split()) for x in lines),
            "vocabulary": len(words) - 3, "ngrams": [len(t.keys) for t in tables],
            "unspellable_words": sum(1 for _, s in lexicon if not s), "seconds": round(time.time() - t0, 2),
            "sources": sources or [], "method": "interpolated modified Kneser-Ney (KenLM's estimate), ARPA"}
    atomic_write(out / "lm.json", json.dumps(info, indent=1))
    return info


def shard_texts(directory: Path) -> list[str]:
    """The transcripts of a prep output (index.parquet's text column)."""
    import pyarrow.parquet as pq

    index = directory / "index.parquet"
    if not index.is_file():
        raise UserError(f"{directory} is not a prep output (no index.parquet)")
    return [str(t) for t in pq.read_table(index, columns=["text"]).column("text").to_pylist()]
