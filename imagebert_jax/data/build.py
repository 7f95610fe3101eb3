"""Builds a dataset from region features and captions: `python -m imagebert_jax.data.build ...`.

Regions are streamed file by file; captions go to an on-disk index first; each image's record gets
its captions, tokenized once. Memory stays bounded whatever the dataset size. A build can be split
over machines (`--num_shards N --shard_index i` on each, by a hash of the image id; then one
`--finalize_only` run), is deterministic, logs records/s, and ends with a report of what was kept
and what was skipped and why. See the README for one command per public dataset.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import tempfile
import time
import zlib
from typing import Iterable

from imagebert_jax import paths
from imagebert_jax.data import builder, captions as captions_lib, formats, records
from imagebert_jax.data.regionfile import RegionRecord
from imagebert_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class BuildSpec:
  name: str
  out_dir: str
  regions: list[str]
  captions: list[str]
  caption_source: str = "jsonl"
  region_format: str = "auto"
  split: str = "train"             # the split of sources that name none (cc, sbu, jsonl)
  vocab_file: str = ""
  max_text_len: int = 44
  feature_dim: int = 2048
  min_boxes: int = 10
  max_boxes: int = 100
  conf_threshold: float = 0.2
  class_probs_dim: int = 0         # >0: store the full class distribution (UNITER npz, region
                                   # files), e.g. 1600; needed by the KL variant of MOC
  image_id_mode: str = "none"      # see formats.canonical_id
  shard_index: int = 0
  num_shards: int = 1
  log_every: int = 10_000
  extra_info: dict = dataclasses.field(default_factory=dict)  # more fields for the summary file


def shard_of(image_id: str, num_shards: int) -> int:
  return zlib.crc32(image_id.encode("utf-8")) % num_shards


def _has_labels(spec: BuildSpec, region_paths: list[str]) -> bool:
  """Whether the region source carries class labels (decided before anything is written)."""
  fmt = spec.region_format
  if fmt in formats.LABELLED:
    return formats.LABELLED[fmt]
  for path in region_paths:
    kind = formats.detect_format(path)
    if kind != "tsv":
      return formats.LABELLED[kind]
    try:
      with paths.open(path, "rb") as f:
        return len(f.readline().split(b"\t")) == len(formats.D2_FIELDS)
    except OSError:
      continue
  return True


def build_dataset(spec: BuildSpec, *, finalize: bool | None = None) -> dict:
  """Writes this shard of every split; finalises when there is one shard (or when asked)."""
  start = time.time()
  region_paths = formats.expand_paths(spec.regions)
  if not region_paths:
    raise ValueError(f"--regions {spec.regions}: no files")
  has_labels = _has_labels(spec, region_paths)
  if not has_labels:
    logging.warning("%s: the region features carry no object class labels (bottom-up-attention "
                    "TSV): masked object classification will be turned off for this dataset",
                    spec.name)
  opts = _record_options(spec, has_labels)
  tokenizer = Tokenizer(spec.vocab_file, max_len=spec.max_text_len)
  report = builder.BuildReport()
  paths.makedirs(spec.out_dir)

  # ---- Captions: this shard's, into an on-disk index ------------------------------------------
  # Beside the dataset when it is local (it can be large); in the temporary folder otherwise.
  fd, index_path = tempfile.mkstemp(prefix=f".{spec.name}-captions-", suffix=".sqlite",
                                    dir=None if paths.is_url(spec.out_dir) else spec.out_dir)
  os.close(fd)
  index = captions_lib.CaptionIndex(index_path)
  splits: set[str] = set()

  def all_captions():
    for item in captions_lib.read_captions(spec.caption_source, spec.captions, spec.split):
      if isinstance(item, captions_lib.Caption):
        splits.add(item.split)
      yield item

  n_captions = index.add_all(
      all_captions(), keep=lambda i: shard_of(i, spec.num_shards) == spec.shard_index,
      id_mode=spec.image_id_mode, on_problem=lambda p: report.skip(p.reason, p.message, p.count))
  logging.info("%s: indexed %d captions of this shard (splits %s)", spec.name, n_captions,
               sorted(splits))
  if not splits:
    raise ValueError(f"--captions {spec.captions}: no usable captions")

  # ---- Regions: stream, join, write ---------------------------------------------------------
  writers = {s: builder.ShardWriter(spec.out_dir, spec.name, s, opts,
                                    shard_index=spec.shard_index, num_shards=spec.num_shards,
                                    log_every=spec.log_every)
             for s in sorted(splits)}
  n_items = 0
  try:
    for where, item in formats.read_regions(region_paths, spec.region_format, spec.feature_dim):
      n_items += 1
      if isinstance(item, formats.Problem):
        report.skip(item.reason, item.message)
        continue
      image_id = formats.canonical_id(item.image_id, spec.image_id_mode)
      if shard_of(image_id, spec.num_shards) != spec.shard_index:
        continue
      if opts.class_probs_dim and (item.class_probs is None
                                   or item.class_probs.shape[1] != opts.class_probs_dim):
        report.skip("class_probs", f"{where}: no class distribution of "
                                   f"{opts.class_probs_dim} classes, which --class_probs_dim "
                                   "asks for")
        continue
      if not index.first_time(image_id):
        report.skip("duplicate_image_id", f"{where}: a second set of region features for image "
                                          f"{image_id}; the first is kept")
        continue
      found = index.lookup(image_id)
      if not found:
        report.skip("image_without_captions", f"{where}: region features but no captions")
        continue
      if item.num_boxes > opts.max_boxes:
        report.note("too_many_boxes", f"{where}: {item.num_boxes} boxes, the best "
                                      f"{opts.max_boxes} are kept")
      _write(item, image_id, found, opts, tokenizer, writers)
      if spec.log_every and n_items % spec.log_every == 0:
        logging.info("%s shard %d/%d: %d region records read, %.0f/s", spec.name,
                     spec.shard_index, spec.num_shards, n_items, n_items / (time.time() - start))
    images, caps, ids = index.unused()
    if caps:
      report.skip("captions_without_image",
                  f"{caps} captions of {images} images have no region features "
                  f"(e.g. images {', '.join(ids[:5])})", count=caps)
  finally:
    index.close()
  for writer in writers.values():
    part = writer.close()
    report.records += part.records
    report.pairs += part.pairs
    report.num_bytes += part.num_bytes
  report.seconds = time.time() - start
  builder.write_shard_report(spec.out_dir, spec.name, spec.shard_index, spec.num_shards, report,
                             extra={"has_object_labels": has_labels})
  logging.info("%s shard %d/%d: %s in %.1fs", spec.name, spec.shard_index, spec.num_shards,
               report.summary(), report.seconds)
  if finalize if finalize is not None else spec.num_shards == 1:
    return finalize_dataset(spec)
  return {"shard": report.to_json()}


def _write(record: RegionRecord, image_id: str, found, opts, tokenizer, writers) -> None:
  selected = records.select_regions(dataclasses.replace(record, image_id=image_id), opts)
  by_split = collections.defaultdict(list)
  for split, text, _ in found:
    by_split[split].append(text)
  for split, texts in by_split.items():
    example = records.make_example(selected, texts, tokenizer.encode_batch(texts), opts,
                                   source_order=found[0][2])
    writers[split].write(example)


def _record_options(spec: BuildSpec, has_object_labels: bool) -> records.RecordOptions:
  return records.RecordOptions(
      feature_dim=spec.feature_dim, min_boxes=spec.min_boxes, max_boxes=spec.max_boxes,
      conf_threshold=spec.conf_threshold, has_object_labels=has_object_labels,
      class_probs_dim=spec.class_probs_dim)


def keep_vocab(vocab_file: str, out_dir: str) -> str:
  """Copies the vocabulary into the dataset's folder (unless it is there already) and returns its
  name there: the summary names it relative to the folder, so the folder can be moved or copied
  to a bucket whole."""
  kept = paths.join(out_dir, records.VOCAB_FILE)
  if paths.absolute(vocab_file) != paths.absolute(kept):
    paths.write_bytes(kept, paths.read_bytes(vocab_file))
  return records.VOCAB_FILE


def finalize_dataset(spec: BuildSpec) -> dict:
  """Checks all shards are there; writes TFDS metadata and the summary; prints the report."""
  shard_reports = builder.read_shard_reports(spec.out_dir, spec.name)
  labels = all(r.get("has_object_labels", True) for r in shard_reports)
  opts = _record_options(spec, labels)
  skipped, repaired = collections.Counter(), collections.Counter()
  for r in shard_reports:
    skipped.update(r["skipped"])
    repaired.update(r.get("repaired", {}))
  info = builder.finalize(spec.out_dir, spec.name, opts, extra_info={
      "vocab_file": keep_vocab(spec.vocab_file, spec.out_dir), "max_text_len": spec.max_text_len,
      "skipped": dict(skipped), "repaired": dict(repaired), "image_id_mode": spec.image_id_mode,
      "sources": {"regions": spec.regions, "captions": spec.captions,
                  "caption_source": spec.caption_source, "vocab_file": spec.vocab_file},
      **spec.extra_info})
  kept = {s: (v["records"], v["pairs"]) for s, v in info["splits"].items()}
  print(f"{spec.name}: kept " + ", ".join(f"{s}: {r} images / {p} pairs"
                                          for s, (r, p) in sorted(kept.items())))
  print(f"{spec.name}: skipped {sum(skipped.values())}" +
        ("".join(f"\n  {k}: {v}" for k, v in sorted(skipped.items())) if skipped else ""))
  if repaired:
    print(f"{spec.name}: kept after repair {sum(repaired.values())}"
          + "".join(f"\n  {k}: {v}" for k, v in sorted(repaired.items())))
  return info


def _flags():
  """The command's flags, on a FlagValues of their own (so the command can be parsed more than
  once in a process, as the tests do)."""
  from absl import flags

  from imagebert_jax import cli
  fv = cli.new_flags()
  flags.DEFINE_string("name", None, "Dataset name (file prefix).", flag_values=fv)
  flags.DEFINE_string("out_dir", None, "Output folder (a local folder or a bucket URL).",
                      flag_values=fv)
  flags.DEFINE_list("regions", [], "Region-feature files, globs or folders.", flag_values=fv)
  flags.DEFINE_enum("region_format", "auto", ["auto"] + list(formats.FORMATS),
                    "Region format; auto: by extension (.tsv both TSV layouts, .npz, .ibrf).",
                    flag_values=fv)
  flags.DEFINE_list("captions", [], "Caption files (sbu: captions file, then URLs file).",
                    flag_values=fv)
  flags.DEFINE_enum("caption_source", "jsonl", list(captions_lib.SOURCES), "Caption format.",
                    flag_values=fv)
  flags.DEFINE_string("split", "train", "Split of sources that name none (cc, sbu, jsonl).",
                      flag_values=fv)
  flags.DEFINE_string("vocab_file", None, "BERT vocab.txt (WordPiece, uncased); copied into the "
                      "dataset's folder.", flag_values=fv)
  flags.DEFINE_integer("max_text_len", 44, "Token budget per caption, [CLS] and [SEP] included.",
                       flag_values=fv)
  flags.DEFINE_integer("feature_dim", 2048, "Region feature dimension.", flag_values=fv)
  flags.DEFINE_integer("min_boxes", 10, "Fewest regions kept per image.", flag_values=fv)
  flags.DEFINE_integer("max_boxes", 100, "Most regions kept per image.", flag_values=fv)
  flags.DEFINE_float("conf_threshold", 0.2, "Regions at or above this confidence are kept.",
                     flag_values=fv)
  flags.DEFINE_integer("class_probs_dim", 0, "Store the detector's class distribution of this "
                       "many classes (0: do not); the KL variant of MOC needs it.",
                       flag_values=fv)
  flags.DEFINE_enum("image_id_mode", "none", ["none", "trailing_int"],
                    "How ids are matched between regions and captions.", flag_values=fv)
  flags.DEFINE_string("object_names", "", "The detector's object class names, one class a line "
                      "in class-id order (bottom-up-attention's objects_vocab.txt; synonyms "
                      "separated by commas); kept in the dataset's summary, where pretraining "
                      "finds its visual words.", flag_values=fv)
  flags.DEFINE_string("attribute_names", "", "The detector's attribute names, likewise "
                      "(attributes_vocab.txt).", flag_values=fv)
  flags.DEFINE_integer("shard_index", 0, "This machine's shard.", flag_values=fv)
  flags.DEFINE_integer("num_shards", 1, "Shards in all (one per machine).", flag_values=fv)
  flags.DEFINE_bool("finalize_only", False, "Only check the shards and write the metadata.",
                    flag_values=fv)
  flags.mark_flags_as_required(["name", "out_dir", "vocab_file"], flag_values=fv)
  return fv


def parse_command(argv: list[str]) -> tuple[BuildSpec, bool]:
  """(the build, whether to finalise only) of a command line (argv[0] is the program)."""
  f = _flags()
  f(list(argv))
  spec = BuildSpec(
      name=f.name, out_dir=f.out_dir, regions=f.regions, captions=f.captions,
      caption_source=f.caption_source, region_format=f.region_format, split=f.split,
      vocab_file=f.vocab_file, max_text_len=f.max_text_len, feature_dim=f.feature_dim,
      min_boxes=f.min_boxes, max_boxes=f.max_boxes, conf_threshold=f.conf_threshold,
      class_probs_dim=f.class_probs_dim, image_id_mode=f.image_id_mode,
      shard_index=f.shard_index, num_shards=f.num_shards,
      extra_info={**({"class_names": read_names(f.object_names)} if f.object_names else {}),
                  **({"attribute_names": read_names(f.attribute_names)}
                     if f.attribute_names else {})})
  return spec, f.finalize_only


def read_names(path: str) -> list[str]:
  """The lines of a detector's vocabulary file (objects_vocab.txt, attributes_vocab.txt), one
  class a line, in class-id order; a missing or empty file is a one-line error naming it."""
  try:
    lines = [line.strip() for line in paths.read_text(path).splitlines()]
  except OSError as e:
    raise ValueError(f"{path}: cannot read the detector's names ({e})") from None
  names = [line for line in lines if line]
  if not names:
    raise ValueError(f"{path}: no names in it (want one class a line)")
  return names


def run_command(argv: list[str]) -> dict:
  """Runs a command line: builds this shard (and finalises), or only finalises."""
  spec, finalize_only = parse_command(argv)
  return finalize_dataset(spec) if finalize_only else build_dataset(spec)


PROG = "imagebert-build"


def main(argv: Iterable[str] | None = None) -> None:
  """`python -m imagebert_jax.data.build` (the command imagebert-build; argv without the
  program, None: sys.argv's). A bad flag or input is one line, exit status 2
  (imagebert_jax.cli)."""
  import logging
  import sys

  from imagebert_jax import cli
  from imagebert_jax.errors import Error
  argv = [PROG, *(sys.argv[1:] if argv is None else argv)]
  fv = _flags()
  cli.parse_flags(fv, argv, prog=PROG, about=__doc__.split("\n\n")[0])
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for handler in logging.getLogger().handlers:
    cli.quiet_libraries(handler, fv.verbosity)
  try:
    run_command(argv)
  except (Error, ValueError, FileNotFoundError) as e:
    cli.refuse(PROG, str(e))


if __name__ == "__main__":
  main()
