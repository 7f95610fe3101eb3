"""Every shipped config passes its own check against small stand-in datasets made by the README's
build commands (parsed from README.md and run as they are written, on tiny source files at the
paths they name), with the overrides each of its documented commands gives (parsed from the
config's docstring and from README.md, the TPU slice command included)."""

from __future__ import annotations

import json
import os
import shlex

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
DIM, BOXES = 2048, 10  # the paper's region features; the README's builds keep >= 10 regions


def commands(text: str, program: str) -> list[list[str]]:
  """The command lines of `text` that start with `program`, continuation lines joined, split as
  a shell would (the arguments after the program)."""
  out, lines = [], text.replace("\\\n", " ").splitlines()
  for line in lines:
    line = line.strip().strip('"')
    at = line.find(program)
    if at >= 0 and (at == 0 or line[:at].rstrip().endswith(("&&", "python"))):
      words = shlex.split(line[at + len(program):].split(" && ")[0].rstrip('"'))
      out.append([w for w in words if w not in ("[", "]")])
  return out


def readme() -> str:
  """README.md and the documents in docs/ it links (the commands are in both)."""
  docs = os.path.join(ROOT, "docs")
  texts = []
  for path in [os.path.join(ROOT, "README.md")] + sorted(
      os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md")):
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  return "\n".join(texts)


# ------------------------------------------------------------------------------------------------
# Stand-in sources at the paths the README's commands name.
# ------------------------------------------------------------------------------------------------
def _regions(rng, image_id: str):
  from imagebert_jax.data.regionfile import RegionRecord
  xy = rng.uniform(0, 300, (BOXES, 2))
  return RegionRecord(image_id=image_id, image_w=500, image_h=400,
                      boxes=np.concatenate([xy, xy + 60], 1).astype(np.float32),
                      features=rng.uniform(0, 2, (BOXES, DIM)).astype(np.float32),
                      object_id=rng.integers(0, 1600, BOXES).astype(np.int32),
                      object_conf=rng.uniform(0.3, 1, BOXES).astype(np.float32))


def _ibrf(path: str, ids: list[str], rng) -> None:
  from imagebert_jax.data.regionfile import RegionFileWriter
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with RegionFileWriter(path) as w:
    for i in ids:
      w.write(_regions(rng, i))


def _bua_tsv(path: str, ids: list[str], rng) -> None:
  import base64
  os.makedirs(os.path.dirname(path), exist_ok=True)
  b64 = lambda a: base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode()
  with open(path, "w") as f:
    for i in ids:
      r = _regions(rng, i)
      f.write("\t".join([i, "500", "400", str(BOXES), b64(r.boxes), b64(r.features)]) + "\n")


def _karpathy(path: str, splits: dict[str, list[str]], coco: bool) -> None:
  images = []
  for split, ids in splits.items():
    for i in ids:
      entry = {"split": split, "sentences": [{"raw": f"a photo number {i} of {split}"}] * 5}
      entry.update({"cocoid": int(i)} if coco else {"filename": f"{i}.jpg"})
      images.append(entry)
  with open(path, "w") as f:
    json.dump({"images": images}, f)


def make_sources(rng) -> None:
  """Everything the README's build commands read, in the current folder."""
  from imagebert_jax.data.realistic import write_vocab_file
  os.makedirs("bert-base-uncased", exist_ok=True)
  write_vocab_file("bert-base-uncased/vocab.txt")
  # BERT-base's shape (config.json) for init.bert; the weights are not read by the check.
  with open("bert-base-uncased/config.json", "w") as f:
    json.dump({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "intermediate_size": 3072, "type_vocab_size": 2, "vocab_size": 30522,
               "max_position_embeddings": 512}, f)
  open("bert-base-uncased/model.safetensors", "wb").close()
  # Flickr30k: bottom-up-attention TSV, Karpathy JSON with file names.
  flickr = {"train": ["1001", "1002", "1003", "1004"], "val": ["2001", "2002"],
            "test": ["3001", "3002"]}
  _bua_tsv("flickr30k_features/part0.tsv", sum(flickr.values(), []), rng)
  _karpathy("dataset_flickr30k.json", flickr, coco=False)
  # COCO: UNITER npz (coco_<split>2014_<12 digits>.npz), Karpathy JSON with cocoids.
  coco = {"train": ["11", "12"], "restval": ["13"], "val": ["21", "22"],
          "test": [str(31 + i) for i in range(10)]}
  for split, ids in coco.items():
    prefix = "coco_train2014" if split in ("train", "restval") else "coco_val2014"
    os.makedirs(f"img_db/{prefix}", exist_ok=True)
    for i in ids:
      r = _regions(rng, i)
      soft = rng.dirichlet(np.ones(1601), BOXES).astype(np.float32)
      np.savez(f"img_db/{prefix}/{prefix}_{int(i):012d}.npz", features=r.features,
               norm_bb=np.concatenate([r.boxes / 500, np.zeros((BOXES, 3))], 1), conf=r.object_conf,
               soft_labels=soft)
  _karpathy("dataset_coco.json", coco, coco=True)
  # Conceptual Captions: the TSV's line number is the id.
  with open("Train_GCC-training.tsv", "w") as f:
    f.writelines(f"a web caption {i}\thttp://example.invalid/{i}.jpg\n" for i in range(4))
  _ibrf("cc_features/cc-0.ibrf", [str(i) for i in range(4)], rng)
  # SBU: captions and URLs, line by line; the Flickr photo id is the id.
  photo_ids = ["4385058960", "5148648301", "1240023551", "2843412237"]
  with open("SBU_captioned_photo_dataset_captions.txt", "w") as f:
    f.writelines(f"an sbu caption {i}\n" for i in range(4))
  with open("SBU_captioned_photo_dataset_urls.txt", "w") as f:
    f.writelines(f"http://static.flickr.com/2723/{p}_b0f291553e.jpg\n" for p in photo_ids)
  _ibrf("sbu_features/sbu-0.ibrf", photo_ids, rng)
  # One's own web pairs.
  with open("pairs-0.jsonl", "w") as f:
    f.writelines(json.dumps({"image_id": f"w{i}", "caption": f"web pair {i}"}) + "\n"
                 for i in range(4))
  _ibrf("web_features/web-0.ibrf", [f"w{i}" for i in range(4)], rng)
  # The realistic scenes, by the README's generator command (a few images instead of 1,150).
  from imagebert_jax.data import realistic
  for args in commands(readme(), "python -m imagebert_jax.data.realistic"):
    out_dir = args[args.index("--out_dir") + 1]
    splits = realistic.parse_splits(args[args.index("--images") + 1])
    realistic.generate(out_dir, {k: 2 for k in splits}, realistic.RealisticSpec(seed=0))
  # A pretraining checkpoints folder for the retrieval configs (the check needs its step).
  os.makedirs("runs/pretrain/stage2/checkpoints/1/state", exist_ok=True)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
  """A folder with the README's datasets built by its own commands; the current folder while
  the tests of this module run."""
  from imagebert_jax.data import build
  folder = tmp_path_factory.mktemp("readme_datasets")
  old = os.getcwd()
  os.chdir(folder)
  try:
    make_sources(np.random.default_rng(0))
    built = []
    for args in commands(readme(), "python -m imagebert_jax.data.build"):
      out_dir = args[args.index("--out_dir") + 1]
      info = build.run_command(["build", *args])
      # A folder built twice (Flickr30k: in this process, then on every core) holds the same.
      assert dict(built).get(out_dir, info)["splits"] == info["splits"], out_dir
      built.append((out_dir, info))
    yield folder, dict(built)
  finally:
    os.chdir(old)


def test_readme_build_commands_make_the_datasets_the_configs_read(stand_ins):
  _, built = stand_ins
  assert sorted(built) == ["data/cc", "data/coco", "data/flickr30k", "data/sbu", "data/scenes",
                           "data/web"]
  assert sorted(built["data/scenes"]["splits"]) == ["test", "train", "val"]
  assert sorted(built["data/flickr30k"]["splits"]) == ["test", "train", "val"]
  assert sorted(built["data/coco"]["splits"]) == ["restval", "test", "train", "val"]
  for name in ("data/cc", "data/sbu", "data/web"):
    assert sorted(built[name]["splits"]) == ["train"], name
    assert built[name]["splits"]["train"]["records"] == 4, name
  # Every summary names its vocabulary inside the dataset's folder, a copy of the one given.
  for name, info in built.items():
    assert info["vocab_file"] == "vocab.txt"
    with open(os.path.join(name, "vocab.txt"), "rb") as a, \
        open("bert-base-uncased/vocab.txt", "rb") as b:
      assert a.read() == b.read()


def documented_overrides(name: str) -> list[list[str]]:
  """The --config.* overrides of each documented command of configs/<name>.py: in its docstring
  and in README.md (none: the command uses the defaults)."""
  import ast
  with open(os.path.join(ROOT, "configs", name + ".py"), encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  runs = [args for args in commands(doc, "python -m imagebert_jax.main")
          + commands(readme(), "python -m imagebert_jax.main")
          + commands(readme(), ".venv/bin/python -m imagebert_jax.main")
          if f"configs/{name}.py" in args]
  # The README's bucket (gs://bucket/...) is stood in for by the same folders here;
  # tests/test_gcs.py runs a work directory and a dataset in a bucket for real.
  return [[a.replace("gs://bucket/", "") for a in args if a.startswith("--config.")]
          for args in runs] or [[]]


def apply_overrides(config, overrides: list[str]) -> None:
  for override in overrides:
    key, _, value = override[len("--config."):].partition("=")
    *parents, field = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    current = node[field]
    node[field] = type(current)(value) if isinstance(current, (int, float)) else value


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_passes_its_check_with_its_documented_command(
    name, stand_ins, tmp_path, monkeypatch):
  from conftest import load_config
  from imagebert_jax.retrieval import evaluate
  from imagebert_jax.config import validate
  # The stand-in test splits are small: protocols count folds of 2 images instead of 1,000.
  monkeypatch.setattr(validate, "protocol_images",
                      lambda p: 2 * (evaluate.protocol_folds(p) or (0, 0))[0])
  variants = documented_overrides(name)
  if name in ("flickr30k_retrieval", "coco_retrieval", "imagebert_paper"):
    assert any(v for v in variants), f"configs/{name}.py documents no command with its paths"
  for overrides in variants:
    config = load_config(name)
    apply_overrides(config, overrides)
    validate.validate(config, str(tmp_path / "run"))
    for stage_name in validate.run_names(config):
      data = config.stages[stage_name].data
      if not data.synthetic.enabled:
        for d in data.dir.split(","):
          assert os.path.isdir(d), (name, stage_name, d)


def test_demo_variants_pass_their_check(tmp_path):
  """`demo.py:smoke` (the tests' demo), `demo.py:minilm` (fine-tuning from the MiniLM
  checkpoint the test install ships) and `demo.py:rerank`."""
  from conftest import load_config
  from imagebert_jax.config import validate
  for arg in ("smoke", "minilm", "rerank"):
    config = load_config("demo", arg)
    validate.validate(config, str(tmp_path / arg))
  config = load_config("demo", "minilm")
  assert config.run == "finetune,finetuned" and config.stages.finetune.init.bert
  assert os.path.isfile(config.text.vocab_file)
  config = load_config("demo", "rerank")
  assert config.model.itm_pool == "align"
  assert config.stages.pretrain.objective.itm_negatives == "hard"
  with pytest.raises(ValueError, match=r"configs/demo.py:large"):
    load_config("demo", "large")


def test_paper_config_reads_every_readme_dataset(stand_ins):
  """The README's Cloud TPU command runs configs/imagebert_paper.py with its default paths: they
  are the folders the README's build commands write."""
  from conftest import load_config
  config = load_config("imagebert_paper")
  dirs = {d for s in config.stages.values() for d in s.data.dir.split(",")}
  assert dirs == {"data/web", "data/cc", "data/sbu", "data/flickr30k"}
  tpu = [args for args in commands(readme(), ".venv/bin/python -m imagebert_jax.main")
         if "configs/imagebert_paper.py" in args]
  assert len(tpu) == 1
  # The slice's hosts share no disk: its work directory and every dataset are in the bucket.
  assert tpu[0][tpu[0].index("--workdir") + 1].startswith("gs://")
  given = dict(a[len("--config."):].split("=", 1) for a in tpu[0] if a.startswith("--config."))
  assert {d for k in ("web_data", "cc_sbu_data", "flickr_data") for d in given[k].split(",")} \
      == {f"gs://bucket/{d}" for d in dirs}
