"""Captions → ``input_ids`` [B, 20] and ``attention_mask``, as the authors feed the model.

The model was trained on BERT-base-uncased WordPiece ids: ``[CLS] tokens [SEP]``, truncated to
20 tokens, padded with ``[PAD]`` (id 0 in BERT's vocabulary), ``attention_mask`` true exactly on
the ``[CLS] tokens [SEP]`` positions. The mask is built from each caption's length, not from the
ids, so a vocabulary whose ``[PAD]`` is not id 0 works too (``CaptionTokenizer.pad_id`` says
which id pads; give it to the model as ``model.config.pad_token_id`` if you call the samplers
without a mask). Nothing is downloaded: give the
vocabulary file (``vocab.txt``) or a directory holding it, or an HF tokenizer you already have.

With the random-weight embedded default and no vocabulary, :meth:`CaptionTokenizer.fallback`
hashes words to ids. It is labelled as such (``is_fallback``) and only for exercising the
pipeline: a real checkpoint needs the real vocabulary.
"""
from __future__ import annotations

import os
import unicodedata
import zlib

MAX_LENGTH = 20
PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
_BERT_VOCAB_SIZE = 30522

VOCAB_HELP = ("give the BERT-base-uncased vocabulary with --vocab (a vocab.txt file, or a "
              "directory holding one, e.g. a local copy of 'bert-base-uncased')")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def basic_tokenize(text: str) -> list[str]:
    """BERT's uncased pre-tokenisation: lower-case, strip accents, split on spaces and punctuation."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    words, current = [], []
    for ch in text:
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf"):
            if current:
                words.append("".join(current))
                current = []
        elif _is_punctuation(ch):
            if current:
                words.append("".join(current))
                current = []
            words.append(ch)
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


class CaptionTokenizer:
    """Turns captions into the model's ``(input_ids, attention_mask)``."""

    def __init__(self, encode_words, name: str, is_fallback: bool = False, tokens=None):
        self._encode_words = encode_words  # caption -> list of token ids, no special tokens
        self._tokens = tokens  # id -> token string (None: ids cannot be read back as words)
        self.name = name
        self.is_fallback = is_fallback
        #: the ids of [PAD] (fills each row after [SEP]), [CLS] and [SEP]; BERT's are 0, 101, 102
        self.pad_id, self.cls_id, self.sep_id = 0, 101, 102

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_vocab(cls, path) -> "CaptionTokenizer":
        """WordPiece over a BERT ``vocab.txt`` (a file, or a directory holding ``vocab.txt``)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        missing = [t for t in (PAD, UNK, CLS, SEP) if t not in vocab]
        if missing:
            raise ValueError(f"{path} is not a BERT vocabulary: missing {', '.join(missing)}")
        tokens = [""] * len(vocab)
        for t, i in vocab.items():
            tokens[i] = t
        tok = cls(lambda text: _wordpiece(text, vocab), name=f"wordpiece:{path}", tokens=tokens)
        tok.pad_id, tok.cls_id, tok.sep_id = vocab[PAD], vocab[CLS], vocab[SEP]
        return tok

    @classmethod
    def from_hf(cls, tokenizer) -> "CaptionTokenizer":
        """Wrap an HF tokenizer the caller already has (no download happens here)."""
        def encode(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        tokens = None
        if hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "__len__"):
            tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        tok = cls(encode, name=f"hf:{type(tokenizer).__name__}", tokens=tokens)
        tok.pad_id = tokenizer.pad_token_id or 0
        tok.cls_id, tok.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        return tok

    @classmethod
    def fallback(cls) -> "CaptionTokenizer":
        """NOT the model's vocabulary: words hashed (crc32) into BERT's id range. For the
        random-weight default only, where any consistent ids exercise the same code."""
        def encode(text):
            return [1000 + zlib.crc32(w.encode()) % (_BERT_VOCAB_SIZE - 1000) for w in basic_tokenize(text)]

        return cls(encode, name="fallback (hashed words, not BERT WordPiece)", is_fallback=True)

    # -- use ---------------------------------------------------------------------------------

    def __call__(self, captions, max_length: int = MAX_LENGTH) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``(input_ids, attention_mask)``, both [B, max_length]: ``[CLS] tokens [SEP]``
        truncated to ``max_length``, padded with ``pad_id``; the mask is true on the
        ``[CLS] tokens [SEP]`` positions (whatever ``pad_id`` is)."""
        import torch  # here, not at the top: the CLI reads vocabularies before it loads torch

        captions = _check_captions(captions)
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        ids = torch.full((len(captions), max_length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(captions), max_length), dtype=torch.bool)
        for row, caption in enumerate(captions):
            tokens = [self.cls_id, *self._encode_words(caption)[: max_length - 2], self.sep_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            mask[row, : len(tokens)] = True
        return ids, mask

    def decode(self, ids) -> str:
        """Word ids (a caption's words, no special tokens) back to text: WordPiece's ``##``
        continuations joined to the piece before. Without a vocabulary (the fallback, whose
        hashing cannot be undone) each id reads ``[id]``."""
        ids = [int(i) for i in ids]
        if self._tokens is None:
            return " ".join(f"[{i}]" for i in ids)
        text = ""
        for i in ids:
            t = self._tokens[i] if 0 <= i < len(self._tokens) else f"[{i}]"
            text += t[2:] if t.startswith("##") and text else (" " + t if text else t)
        return text

    def token_counts(self, captions) -> list[int]:
        """Tokens each caption needs, ``[CLS]`` and ``[SEP]`` included, before truncation (a
        count above ``max_length`` means ``__call__`` cuts that caption)."""
        return [len(self._encode_words(c)) + 2 for c in _check_captions(captions)]


def _check_captions(captions) -> list[str]:
    """A non-empty list of str, each encodable as UTF-8 (a command line with undecodable bytes
    reaches Python as lone surrogates, which no tokenizer can read)."""
    if isinstance(captions, str):
        captions = [captions]
    try:
        captions = list(captions)
    except TypeError:
        raise TypeError(f"captions must be a string or a list of strings, got "
                        f"{type(captions).__name__}") from None
    if not captions:
        raise ValueError("captions must contain at least one caption")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions must be strings, got {type(caption).__name__} at index {i}")
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"captions[{i}] is not valid text: it holds {caption[e.start:e.end]!r} at "
                             f"character {e.start} (bytes that are not UTF-8?); pass UTF-8 text") from None
    return captions


def _wordpiece(text: str, vocab: dict[str, int], max_chars: int = 100) -> list[int]:
    """Greedy longest-match-first WordPiece, as BERT does it."""
    out = []
    for word in basic_tokenize(text):
        if len(word) > max_chars:
            out.append(vocab[UNK])
            continue
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    break
                end -= 1
            if end == start:  # no piece matches: the whole word is unknown
                pieces = [vocab[UNK]]
                break
            pieces.append(vocab[piece])
            start = end
        out.extend(pieces)
    return out


def load_tokenizer(vocab=None, *, real_weights: bool) -> CaptionTokenizer:
    """The tokenizer to use: ``vocab`` if given; else the fallback, allowed only for the
    random-weight default (``real_weights=False``)."""
    if vocab is not None:
        return CaptionTokenizer.from_vocab(vocab)
    if real_weights:
        raise ValueError(f"a real checkpoint needs the vocabulary it was trained with: {VOCAB_HELP}")
    return CaptionTokenizer.fallback()
