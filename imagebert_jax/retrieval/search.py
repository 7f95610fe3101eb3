"""Search one's own images and texts with a trained ImageBERT: an index on disk, then queries.

    # Index a folder of photos (through the region detector), region files, or a built dataset split
    python -m imagebert_jax.retrieval.search index --model runs/demo --index my_index \\
        --images photos/ --detector_weights faster_rcnn_from_caffe_attr.pkl
    python -m imagebert_jax.retrieval.search index --model runs/demo --index my_index --regions 'feat/*.ibrf'
    python -m imagebert_jax.retrieval.search index --model runs/demo --index my_index --dataset data/f30k \\
        --split test [--image_root flickr30k_images/]

    # Texts -> the top images; an image -> the top texts of a file
    python -m imagebert_jax.retrieval.search query --index my_index --query "a red bicycle next to a bench" \\
        [--query ... | --queries questions.txt] [--top_k 10] [--rerank_k 16] \\
        [--json results.json] [--html report.html [--boxes]]
    python -m imagebert_jax.retrieval.search query --index my_index --image photos/cat.jpg --texts captions.txt

The index folder holds `index.json` (the model it was built with: its folder, config digest and
weights digest; the source; the detector) and `parts/part-NNNNNN.npz`, each a batch of images: ids,
paths, contrastive embeddings, the regions (features, boxes, image size). A build shows images/s
and the time left, writes a part every `--part_size` images, and a rerun continues after the last
part written. Querying with another model than the index was built with is refused.

Queries run in two stages (imagebert_jax.retrieval.inference): the embeddings rank every candidate, the
cross-encoder rescores the top `--rerank_k` (0: every candidate). The JSON output has, per query,
the final ranking (ids, cross-encoder scores, first-stage scores and places) and the first stage's
own top list; the HTML report is one self-contained file (thumbnails inlined) that opens from disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import sys
import time
from typing import Any, Iterator

import numpy as np
from etils import epath

from imagebert_jax import cli, paths
from imagebert_jax.errors import Error, SearchError
from imagebert_jax.model.inputs import region_locations

log = logging.getLogger("imagebert_jax.retrieval.search")

MANIFEST = "index.json"
PARTS = "parts"
FORMAT = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


# ------------------------------------------------------------------------------------------------
# The index on disk.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class IndexData:
  image_ids: list[str]
  paths: list[str]              # '' where the image file is not known
  embeddings: np.ndarray        # [N, E] float32
  region_feat: np.ndarray       # [N, R, D] float16
  boxes: np.ndarray             # [N, R, 4] pixels (zeros past num_regions)
  num_regions: np.ndarray       # [N]
  image_w: np.ndarray           # [N]
  image_h: np.ndarray           # [N]

  def __len__(self) -> int:
    return len(self.image_ids)

  def locations(self) -> np.ndarray:
    """[N, R, 5] box locations as the model takes them (zeros at padding)."""
    loc = region_locations(self.boxes, self.image_w[:, None], self.image_h[:, None])
    valid = np.arange(self.boxes.shape[1])[None, :] < self.num_regions[:, None]
    return np.where(valid[..., None], loc, 0.0).astype(np.float32)


class Index:
  """An index folder (local or a bucket URL)."""

  def __init__(self, folder: str):
    self.folder = epath.Path(folder)
    self.manifest_path = self.folder / MANIFEST

  def exists(self) -> bool:
    return self.manifest_path.exists()

  def manifest(self) -> dict:
    if not self.exists():
      raise SearchError(f"{self.folder}: not an index (no {MANIFEST}); build one with "
                        "`python -m imagebert_jax.retrieval.search index`")
    return json.loads(self.manifest_path.read_text())

  def write_manifest(self, value: dict) -> None:
    paths.makedirs(str(self.folder))
    paths.write_text(str(self.manifest_path), json.dumps(value, indent=1) + "\n")

  def parts(self) -> list[epath.Path]:
    folder = self.folder / PARTS
    if not folder.exists():
      return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("part-")
                  and p.name.endswith(".npz"))

  def _read_part(self, path: epath.Path) -> dict:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}

  def ids(self) -> set[str]:
    out = set()
    for p in self.parts():
      out.update(str(x) for x in self._read_part(p)["image_ids"])
    return out

  def write_part(self, arrays: dict[str, np.ndarray]) -> epath.Path:
    """The next part, whole or not at all (imagebert_jax.paths.write_bytes)."""
    folder = self.folder / PARTS
    paths.makedirs(str(folder))
    existing = self.parts()
    number = int(existing[-1].name[5:11]) + 1 if existing else 0
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = folder / f"part-{number:06d}.npz"
    paths.write_bytes(str(path), buffer.getvalue())
    return path

  def load(self) -> IndexData:
    parts = [self._read_part(p) for p in self.parts()]
    if not parts:
      raise SearchError(f"{self.folder}: the index holds no images yet")
    cat = lambda k: np.concatenate([p[k] for p in parts])
    return IndexData([str(x) for x in cat("image_ids")], [str(x) for x in cat("paths")],
                     cat("embeddings").astype(np.float32), cat("region_feat"), cat("boxes"),
                     cat("num_regions"), cat("image_w"), cat("image_h"))


def model_entry(model) -> dict:
  return {"source": model.source, "stage": model.stage_config.get("stage", ""),
          "config_digest": model.config_digest, "weights_digest": model.weights_digest,
          "itc_dim": model.cfg.itc_dim, "max_regions": model.cfg.max_regions,
          "region_feature_dim": model.cfg.region_feature_dim}


def check_model(index: Index, manifest: dict, model) -> None:
  """Refuses a model other than the one the index was built with (one line)."""
  built = manifest["model"]
  if built["config_digest"] != model.config_digest:
    raise SearchError(
        f"{index.folder} was built with another model ({built['source']}, config "
        f"{built['config_digest'][:12]}); {model.source} has config {model.config_digest[:12]}: "
        "query the index with the model it was built with, or build a new index")
  if built["weights_digest"] != model.weights_digest:
    raise SearchError(
        f"{index.folder} was built with other weights of this model ({built['source']}); "
        f"{model.source} differs: query the index with the weights it was built with, or build "
        "a new index")


# ------------------------------------------------------------------------------------------------
# Sources of images.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Item:
  image_id: str
  path: str
  record: Any  # a RegionRecord (features, boxes, image_w, image_h, object_conf)


def find_image(root: str, image_id: str) -> str:
  """`root/<id><ext>` for the usual image extensions, or '' when there is none."""
  if not root:
    return ""
  for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
    path = paths.join(root, image_id + ext)
    if paths.isfile(path):
      return path
  return ""


def photo_items(folder: str) -> list[tuple[str, str]]:
  """(path, id) of the images of a folder or list file; the id is the path below the folder."""
  from imagebert_jax.detector.extract import list_images
  images, root = list_images(folder)
  return [(p, paths.relative_to(p, root)) for p in images]


def select(record, options: dict, max_regions: int):
  """The regions the model sees, chosen as the training data's were (confidence threshold,
  min and max boxes; at most the model's max_regions)."""
  from imagebert_jax.data.records import RecordOptions, select_regions
  opts = RecordOptions(feature_dim=record.features.shape[1],
                       min_boxes=int(options.get("min_boxes", 10)),
                       max_boxes=min(int(options.get("max_boxes", max_regions)), max_regions),
                       conf_threshold=float(options.get("conf_threshold", 0.2)))
  return select_regions(record, opts)


def region_file_paths(spec: str) -> list[str]:
  out = []
  for pattern in [s.strip() for s in spec.split(",") if s.strip()]:
    found = paths.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
    if not found or not all(paths.isfile(p) for p in found):
      raise SearchError(f"--regions {pattern}: no such region file")
    out.extend(found)
  return out


# ------------------------------------------------------------------------------------------------
# Building.
# ------------------------------------------------------------------------------------------------
def _source(args) -> dict:
  given = [k for k in ("images", "regions", "dataset") if getattr(args, k)]
  if len(given) != 1:
    raise SearchError("give exactly one of --images, --regions or --dataset")
  kind = given[0]
  source = {"kind": kind, "spec": str(getattr(args, kind)), "image_root": args.image_root or ""}
  if kind == "images":
    if not args.detector_weights:
      raise SearchError("--images needs --detector_weights (the region detector's weights)")
    from imagebert_jax.detector import DetectorConfig
    cfg = DetectorConfig()
    if args.detector_config:
      try:
        cfg = DetectorConfig.from_dict(json.loads(epath.Path(args.detector_config).read_text()))
      except (OSError, ValueError, TypeError) as e:
        raise SearchError(f"--detector_config {args.detector_config}: {e}") from None
    source["detector"] = {"weights": paths.absolute(args.detector_weights),
                          "config": cfg.to_dict()}
  if kind == "dataset":
    if not args.split:
      raise SearchError("--dataset needs --split (the split to index)")
    source["split"] = args.split
  return source


def _new_items(source: dict, done: set[str], max_regions: int, options: dict,
               detector_batch: int, skipped: list) -> tuple[Iterator[Item], int]:
  """(the images not in the index yet, their number)."""
  kind = source["kind"]
  if kind == "images":
    from imagebert_jax.detector import DetectorConfig, WeightsError, load_detectron2_weights
    from imagebert_jax.detector.extract import extract_regions
    todo = [(p, i) for p, i in photo_items(source["spec"]) if i not in done]
    cfg = DetectorConfig.from_dict(source["detector"]["config"])
    try:
      params = load_detectron2_weights(source["detector"]["weights"], cfg)
    except (WeightsError, OSError) as e:
      raise SearchError(f"--detector_weights: {e}") from None

    def photos():
      for path, key, record, error in extract_regions(todo, params, cfg,
                                                      batch_size=detector_batch):
        if record is None:
          log.warning("skipping %s: %s", path, error)
          skipped.append({"path": path, "id": key, "error": error})
          yield None
          continue
        yield Item(key, path, select(record, options, max_regions))

    return photos(), len(todo)
  root = source["image_root"]
  if kind == "regions":
    from imagebert_jax.data.regionfile import count_records, read_region_file
    files = region_file_paths(source["spec"])
    total = sum(count_records(p) for p in files)

    def regions():
      for path in files:
        for record in read_region_file(path):
          if record.image_id not in done:
            yield Item(record.image_id, find_image(root, record.image_id),
                       select(record, options, max_regions))

    return regions(), total - len(done)
  from imagebert_jax.data import pipeline, records
  try:
    info = records.read_info(source["spec"])
  except FileNotFoundError as e:
    raise SearchError(f"--dataset {e}") from None
  if source["split"] not in info["splits"]:
    raise SearchError(f"--dataset {source['spec']}: no split {source['split']!r}; it has "
                      f"{sorted(info['splits'])}")
  total = info["splits"][source["split"]]["records"]

  def dataset():
    for record in pipeline.split_records(source["spec"], source["split"]):
      if record.image_id not in done:
        yield Item(record.image_id, find_image(root, record.image_id),
                   select(record, options, max_regions))

  return dataset(), total - len(done)


def _part_arrays(model, items: list[Item]) -> dict[str, np.ndarray]:
  records = [it.record for it in items]
  feat, loc, count = model.pack(records)
  r = model.cfg.max_regions
  boxes = np.zeros((len(items), r, 4), np.float32)
  for i, rec in enumerate(records):
    boxes[i, :count[i]] = np.asarray(rec.boxes, np.float32)[:count[i]]
  return {"image_ids": np.asarray([it.image_id for it in items]),
          "paths": np.asarray([it.path for it in items]),
          "embeddings": model.embed_images((feat, loc, count)).astype(np.float32),
          "region_feat": feat, "boxes": boxes, "num_regions": count,
          "image_w": np.asarray([rec.image_w for rec in records], np.int32),
          "image_h": np.asarray([rec.image_h for rec in records], np.int32)}


def build(args) -> dict:
  from tqdm import tqdm
  from imagebert_jax.retrieval.inference import TrainedModel
  source = _source(args)
  index = Index(args.index)
  manifest = index.manifest() if index.exists() else None
  model_path = args.model or (manifest or {}).get("model", {}).get("source")
  if not model_path:
    raise SearchError("--model: give the run, stage or checkpoint folder of the model")
  model = TrainedModel.load(model_path, stage=args.stage, batch_size=args.batch_size)
  if manifest is None:
    manifest = {"format": FORMAT, "model": model_entry(model), "source": source,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "skipped": []}
    index.write_manifest(manifest)
  else:
    check_model(index, manifest, model)
    same = lambda d: json.dumps({k: v for k, v in d.items() if k != "image_root"},
                                sort_keys=True)
    if same(manifest["source"]) != same(source):
      raise SearchError(f"{index.folder} indexes {manifest['source']['kind']} "
                        f"{manifest['source']['spec']}; use a new --index folder for "
                        f"{source['kind']} {source['spec']}")
  done = index.ids()
  skipped: list = []
  items, todo = _new_items(source, done, model.cfg.max_regions,
                           model.stage_config.get("data_options", {}), args.detector_batch_size,
                           skipped)
  if args.max_images:
    todo = min(todo, args.max_images)
  log.info("%s: %d images already indexed, %d to do", index.folder, len(done), todo)
  bar = tqdm(total=todo, unit="img", desc="indexing", smoothing=0.1, mininterval=1.0,
             disable=args.no_progress)
  pending: list[Item] = []
  written = 0
  parts = 0
  started = time.time()
  for item in items:
    if item is not None:
      pending.append(item)
    bar.update(1)
    if len(pending) >= args.part_size:
      index.write_part(_part_arrays(model, pending))
      written, parts, pending = written + len(pending), parts + 1, []
    if args.max_images and written + len(pending) + len(skipped) >= args.max_images:
      break
  if pending:
    index.write_part(_part_arrays(model, pending))
    written, parts = written + len(pending), parts + 1
  bar.close()
  seconds = time.time() - started
  if hasattr(items, "close"):
    items.close()
  manifest["skipped"] = [s for s in manifest.get("skipped", []) if s["id"] not in done
                         and s["id"] not in {x["id"] for x in skipped}] + skipped
  manifest["images"] = len(done) + written
  index.write_manifest(manifest)
  summary = {"index": str(index.folder), "written": written, "already": len(done),
             "skipped": skipped, "parts": parts, "images": len(done) + written,
             "images_per_s": written / max(seconds, 1e-9)}
  print(f"{index.folder}: {summary['images']} images indexed ({written} new, {len(done)} "
        f"before, {len(skipped)} skipped), {summary['images_per_s']:.2f} images/s", flush=True)
  return summary


# ------------------------------------------------------------------------------------------------
# Queries.
# ------------------------------------------------------------------------------------------------
def _read_lines(path: str) -> list[str]:
  lines = [line.strip() for line in epath.Path(path).read_text().splitlines()]
  return [line for line in lines if line and not line.startswith("#")]


def _query_image(spec: str, data: IndexData, manifest: dict, args, model):
  """(label, path, packed regions, boxes, w, h) of an --image: an id in the index, or
  an image file (regions from the detector the index was built with, or --detector_weights)."""
  if spec in data.image_ids:
    i = data.image_ids.index(spec)
    n = int(data.num_regions[i])
    packed = (data.region_feat[i:i + 1], data.locations()[i:i + 1], data.num_regions[i:i + 1])
    return spec, data.paths[i], packed, data.boxes[i, :n], int(data.image_w[i]), int(
        data.image_h[i])
  if not paths.isfile(spec):
    raise SearchError(f"--image {spec}: neither an image id of the index nor an image file")
  detector = manifest["source"].get("detector")
  weights = args.detector_weights or (detector or {}).get("weights")
  if not weights:
    raise SearchError(f"--image {spec}: a new image needs --detector_weights (the index was not "
                      "built from images)")
  from imagebert_jax.detector import DetectorConfig, load_detectron2_weights
  from imagebert_jax.detector.extract import extract_regions
  cfg = DetectorConfig.from_dict(detector["config"]) if detector else DetectorConfig()
  if args.detector_config:
    cfg = DetectorConfig.from_dict(json.loads(epath.Path(args.detector_config).read_text()))
  params = load_detectron2_weights(weights, cfg)
  (_, _, record, error), = list(extract_regions([(spec, spec)], params, cfg))
  if record is None:
    raise SearchError(f"--image {spec}: {error}")
  record = select(record, model.stage_config.get("data_options", {}), model.cfg.max_regions)
  packed = model.pack([record])
  return spec, spec, packed, np.asarray(record.boxes), record.image_w, record.image_h


def _result(hit, ident: str, extra: dict) -> dict:
  return {"rank": hit.rank + 1, "id": ident, "score": hit.score, "itc_score": hit.itc_score,
          "itc_rank": hit.itc_rank + 1, **extra}


def query(args) -> dict:
  from imagebert_jax.retrieval.inference import TrainedModel, two_stage_rank
  index = Index(args.index)
  manifest = index.manifest()
  texts = list(args.query)
  for path in args.queries:
    texts.extend(_read_lines(path))
  if not texts and not args.image:
    raise SearchError("nothing to ask: give --query, --queries or --image")
  if args.image and not args.texts:
    raise SearchError("--image needs --texts (a file of texts to rank, one per line)")
  model = TrainedModel.load(args.model or manifest["model"]["source"], stage=args.stage,
                            batch_size=args.batch_size)
  check_model(index, manifest, model)
  data = index.load()
  out = {"index": str(index.folder), "model": model.source, "images": len(data),
         "top_k": args.top_k, "rerank_k": args.rerank_k, "queries": []}
  image_info: dict[str, dict] = {}
  depth = max(args.top_k, args.rerank_k)

  def info(ident, path, boxes, w, h):
    image_info[ident] = {"path": path, "boxes": np.asarray(boxes).tolist(), "image_w": int(w),
                         "image_h": int(h)}

  if texts:
    loc = data.locations()
    t0 = time.time()
    ids = model.tokenize(texts)
    first = model.embed_texts(ids) @ data.embeddings.T
    t1 = time.time()
    cross = lambda q, j: model.score_pairs((data.region_feat[j], loc[j], data.num_regions[j]),
                                           ids[q])
    hits = two_stage_rank(first, cross, k=args.top_k, rerank_k=args.rerank_k,
                          itc_weight=model.itc_weight)
    t2 = time.time()
    pairs = len(texts) * (len(data) if args.rerank_k <= 0 else min(args.rerank_k, len(data)))
    for q, text in enumerate(texts):
      order = np.argsort(-first[q], kind="stable")[:depth]
      results = []
      for h in hits[q]:
        ident = data.image_ids[h.index]
        info(ident, data.paths[h.index], data.boxes[h.index, :data.num_regions[h.index]],
             data.image_w[h.index], data.image_h[h.index])
        results.append(_result(h, ident, {"path": data.paths[h.index]}))
      out["queries"].append({
          "kind": "text", "query": text, "results": results,
          "first_stage": [{"id": data.image_ids[j], "itc_score": float(first[q, j])}
                          for j in order]})
    out["timing"] = {"text_queries": len(texts), "first_stage_s": round(t1 - t0, 4),
                     "cross_encoder_s": round(t2 - t1, 4), "pairs_scored": int(pairs)}
  if args.image:
    candidates = []
    for path in args.texts:
      candidates.extend(_read_lines(path))
    if not candidates:
      raise SearchError(f"--texts {', '.join(args.texts)}: no texts in it")
    gallery = model.text_gallery(candidates)
    for spec in args.image:
      label, path, packed, boxes, w, h = _query_image(spec, data, manifest, args, model)
      hits = model.rank_texts(packed, gallery, k=args.top_k, rerank_k=args.rerank_k)[0]
      first = (model.embed_images(packed) @ gallery.embeddings.T)[0]
      info(label, path, boxes, w, h)
      out["queries"].append({
          "kind": "image", "query": label, "path": path,
          "results": [_result(h, candidates[h.index], {"text_index": h.index}) for h in hits],
          "first_stage": [{"text": candidates[j], "itc_score": float(first[j])}
                          for j in np.argsort(-first, kind="stable")[:depth]]})
  if args.json:
    epath.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
  if args.html:
    from imagebert_jax.retrieval.report import write_report
    write_report(args.html, out, image_info, boxes=args.boxes)
  _print(out)
  return out


def _print(out: dict) -> None:
  for q in out["queries"]:
    print(f"{q['kind']} query: {q['query']}")
    for r in q["results"]:
      score = "-" if r["score"] is None else f"{r['score']:.3f}"
      print(f"  {r['rank']:>3}. {r['id']}  (cross-encoder {score}, embeddings "
            f"{r['itc_score']:.3f}, #{r['itc_rank']})")
  sys.stdout.flush()


# ------------------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------------------
PROG = "imagebert-search"
USAGE = "index|query [flags]"
# The flags that only one of the two commands takes.
INDEX_FLAGS = ("images", "regions", "dataset", "split", "image_root", "part_size", "max_images",
               "no_progress")
QUERY_FLAGS = ("query", "queries", "image", "texts", "top_k", "rerank_k", "json", "html", "boxes")


def _flags():
  """The command's flags (imagebert_jax.cli's convention); `index` and `query` share the first
  ones and refuse each other's (INDEX_FLAGS, QUERY_FLAGS)."""
  from absl import flags
  fv = cli.new_flags()
  d = dict(flag_values=fv)
  flags.DEFINE_string("index", None, "The index folder (local or gs://).", **d)
  flags.DEFINE_string("model", "", "Run, stage, checkpoints or step folder of the model "
                      "(default: the one the index was built with).", **d)
  flags.DEFINE_string("stage", None, "With a run folder: the stage to load.", **d)
  flags.DEFINE_integer("batch_size", 32, "Pairs or images per call.", lower_bound=1, **d)
  flags.DEFINE_string("detector_weights", "", "detectron2-format .pkl of the region detector "
                      "(for image files).", **d)
  flags.DEFINE_string("detector_config", "", "JSON file of DetectorConfig fields that differ "
                      "from the public model.", **d)
  flags.DEFINE_integer("detector_batch_size", 1, "Images per detector call.", lower_bound=1, **d)
  # index
  flags.DEFINE_string("images", "", "index: a folder of images (recursive) or a list file.", **d)
  flags.DEFINE_string("regions", "", "index: region files (.ibrf): paths or globs, commas.", **d)
  flags.DEFINE_string("dataset", "", "index: a built dataset folder (with --split).", **d)
  flags.DEFINE_string("split", "", "index: the dataset split to index.", **d)
  flags.DEFINE_string("image_root", "", "index: where the image files of region files or a "
                      "dataset are (<id>.jpg ...), for the report's thumbnails.", **d)
  flags.DEFINE_integer("part_size", 256, "index: images per part file.", lower_bound=1, **d)
  flags.DEFINE_integer("max_images", 0, "index: index at most this many new images in this run "
                       "(0: all).", **d)
  flags.DEFINE_bool("no_progress", False, "index: log instead of a progress bar.", **d)
  # query
  flags.DEFINE_multi_string("query", [], "query: a text query (repeat for several).", **d)
  flags.DEFINE_multi_string("queries", [], "query: a file of text queries, one per line.", **d)
  flags.DEFINE_multi_string("image", [], "query: an image query: an image id of the index or an "
                            "image file.", **d)
  flags.DEFINE_multi_string("texts", [], "query: a file of texts to rank for --image.", **d)
  flags.DEFINE_integer("top_k", 10, "query: results per query.", lower_bound=1, **d)
  flags.DEFINE_integer("rerank_k", 16, "query: candidates per query the cross-encoder rescores "
                       "(0: all).", lower_bound=0, **d)
  flags.DEFINE_string("json", "", "query: write the results here.", **d)
  flags.DEFINE_string("html", "", "query: write a self-contained HTML report here.", **d)
  flags.DEFINE_bool("boxes", False, "query: draw the region boxes in the report.", **d)
  flags.mark_flags_as_required(["index"], flag_values=fv)
  return fv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line's settings (argv without the program; None: sys.argv's): `command`
  ('index' or 'query') and every flag."""
  fv = _flags()
  rest = cli.parse_flags(fv, [PROG, *(sys.argv[1:] if argv is None else argv)], prog=PROG,
                         usage=USAGE, about=__doc__.split("\n\n")[0])
  if len(rest) != 1 or rest[0] not in ("index", "query"):
    cli.refuse(PROG, f"want one command, index or query, before or among the flags; got {rest}")
  command = rest[0]
  other = QUERY_FLAGS if command == "index" else INDEX_FLAGS
  given = [f"--{n}" for n in other if fv[n].present]
  if given:
    cli.refuse(PROG, f"{command} does not take {', '.join(given)}")
  return argparse.Namespace(command=command, **{name: fv[name].value for name in fv})


def main(argv: list[str] | None = None) -> dict:
  """Runs the command; returns its summary (build) or results (query). A problem the user can
  fix is one line, `imagebert-search: error: ...`, and exit status 2."""
  args = parse_args(argv)
  for handler in logging.getLogger().handlers:
    cli.quiet_libraries(handler, args.verbosity)
  try:
    return build(args) if args.command == "index" else query(args)
  except Error as e:
    cli.refuse(PROG, str(e))


def command() -> None:
  """The console command `imagebert-search` (python -m imagebert_jax.retrieval.search)."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  main()


if __name__ == "__main__":
  command()
