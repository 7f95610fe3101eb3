"""WordPiece tokenization compatible with bert-base-uncased, through the `tokenizers` library.

The vocabulary file is the plain BERT `vocab.txt` (one token per line, the line number is its id).
Special ids are read from it, so nothing downstream hard-codes them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import numpy as np

from imagebert_jax import paths

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_RESERVED = re.compile(r"^\[[^\]]+\]$")  # [PAD], [unused0], ...: never drawn as a random token


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  vocab_size: int
  # Random replacement tokens for masked language modelling are drawn from [low, high).
  random_token_range: tuple[int, int]


def read_vocab(path: str) -> list[str]:
  if not paths.isfile(path):
    raise FileNotFoundError(f"config.text.vocab_file: no such file: {path}")
  text = paths.read_text(path).replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads
  tokens = (text[:-1] if text.endswith("\n") else text).split("\n") if text else []
  if tokens and tokens[-1] == "":
    tokens.pop()
  return tokens


@functools.lru_cache(maxsize=8)
def special_ids(vocab_file: str) -> SpecialIds:
  """Special token ids and the random-token range of a BERT vocabulary file."""
  tokens = read_vocab(vocab_file)
  index = {t: i for i, t in enumerate(tokens)}
  missing = [t for t in SPECIAL_TOKENS if t not in index]
  if missing:
    raise ValueError(f"{vocab_file}: vocabulary lacks the special tokens {missing}")
  first_regular = next((i for i, t in enumerate(tokens) if not _RESERVED.match(t)), None)
  if first_regular is None:
    raise ValueError(f"{vocab_file}: vocabulary has no regular tokens")
  return SpecialIds(pad_id=index["[PAD]"], unk_id=index["[UNK]"], cls_id=index["[CLS]"],
                    sep_id=index["[SEP]"], mask_id=index["[MASK]"], vocab_size=len(tokens),
                    random_token_range=(first_regular, len(tokens)))


class Tokenizer:
  """Lower-cased WordPiece with [CLS] ... [SEP], truncated to `max_len` ids in all."""

  def __init__(self, vocab_file: str, max_len: int, lowercase: bool = True):
    from tokenizers import BertWordPieceTokenizer  # local: not needed by the model side

    self.vocab_file = vocab_file
    self.ids = special_ids(vocab_file)
    self.max_len = max_len
    # A vocabulary in a bucket is handed over as {token: id}; a local one by its path.
    vocab = ({t: i for i, t in enumerate(read_vocab(vocab_file))} if paths.is_url(vocab_file)
             else vocab_file)
    self._tok = BertWordPieceTokenizer(vocab, lowercase=lowercase)
    self._tok.enable_truncation(max_length=max_len)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts))]

  def encode_padded(self, texts: Sequence[str]) -> np.ndarray:
    """[N, max_len] ids: [CLS] words [SEP], truncated, padded with the pad id."""
    out = np.full((len(texts), self.max_len), self.ids.pad_id, np.int32)
    for i, tokens in enumerate(self.encode_batch(texts)):
      out[i, :len(tokens)] = tokens
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(int(i) for i in ids))


def write_vocab(path: str, words: Sequence[str]) -> None:
  """A BERT-layout vocabulary: the special tokens first, then `words` (for the synthetic demo)."""
  seen = set(SPECIAL_TOKENS)
  lines = list(SPECIAL_TOKENS)
  for w in words:
    if w not in seen:
      seen.add(w)
      lines.append(w)
  paths.write_text(path, "".join(t + "\n" for t in lines))
