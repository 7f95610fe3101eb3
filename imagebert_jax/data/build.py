"""Builds a dataset from region features and captions: `python -m imagebert_jax.data.build ...`.

The build is an Apache Beam pipeline (`build_pipeline`): region files are read in parallel,
captions joined to images by id, captions tokenized and regions selected, and the records written
as TFRecord shards that TFDS reads (`tfds.builder_from_directory`). Without
`--beam_pipeline_options` it runs on Beam's DirectRunner in this one process; with them, on
whatever runner they name (`direct_num_workers=2,direct_running_mode=multi_processing`, or
`runner=DataflowRunner,project=...`), the same pipeline giving the same records. Memory stays
bounded whatever the dataset size. It ends with a report of what was kept and what was skipped and
why (Beam counters). See the README for one command per public dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import time
from typing import Iterable

from imagebert_jax import paths
from imagebert_jax.data import builder, captions as captions_lib, formats, records
from imagebert_jax.data.tokenizer import Tokenizer
from imagebert_jax.errors import InputError


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
  records_per_shard: int = 1000    # most records per output shard
  beam_options: str = ""           # Beam pipeline options, "key=value,key=value" ("": this
                                   # process, DirectRunner)
  extra_info: dict = dataclasses.field(default_factory=dict)  # more fields for the summary file


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


def pipeline_options(text: str):
  """Beam's PipelineOptions of `--beam_pipeline_options` ("key=value,key=value", as `tfds
  build` takes them, or "--key=value --key=value"); by default the DirectRunner in this
  process."""
  from imagebert_jax.data import build_pipeline  # Beam, imported quietly
  PipelineOptions = build_pipeline.beam.options.pipeline_options.PipelineOptions

  if text.lstrip().startswith("--"):  # flags as on a command line (a value may hold commas)
    given = shlex.split(text)
  else:
    given = [f"--{opt.strip()}" for opt in text.split(",") if opt.strip()]
  return PipelineOptions(["--runner=DirectRunner", "--direct_num_workers=1",
                          "--direct_running_mode=in_memory", *given])


_WORKER_ERROR = re.compile(r"(?:InputError|RegionFileError): (.+?)(?: \[while running [^\]]*\])*$",
                           re.MULTILINE)


def _user_error(error: Exception) -> InputError | None:
  """The one-line input error inside a failed pipeline's exception (a worker's, re-raised by the
  runner with its traceback and step names), or None when it is not one."""
  seen = error
  while seen is not None:
    if isinstance(seen, InputError):
      return InputError(str(seen).split(" [while running")[0])
    seen = seen.__cause__ or seen.__context__
  m = _WORKER_ERROR.search(str(error))
  return InputError(m.group(1).strip()) if m else None


def _clear_old_shards(spec: BuildSpec) -> None:
  """Removes the shards and shard reports an earlier build of this dataset left in the folder
  (a new build may cut the records into another number of shards)."""
  old = (paths.glob(paths.join(spec.out_dir, f"{spec.name}-*.tfrecord-*"))
         + paths.glob(paths.join(spec.out_dir, f"{spec.name}-*.report-*.json")))
  if old:
    logging.info("%s: removing %d shard files of an earlier build in %s", spec.name, len(old),
                 spec.out_dir)
  for path in old:
    paths.remove(path)


def build_dataset(spec: BuildSpec) -> dict:
  """Builds the dataset (every split) and returns its summary (`imagebert_dataset.json`)."""
  from imagebert_jax.data import build_pipeline
  beam = build_pipeline.beam

  start = time.time()
  region_paths = formats.expand_paths(spec.regions)
  if not region_paths:
    raise InputError(f"--regions {spec.regions}: no files")
  units = captions_lib.caption_units(spec.caption_source, spec.captions)
  if not units:
    raise InputError(f"--captions {spec.captions}: no usable captions")
  if spec.records_per_shard < 1:
    raise InputError(f"--records_per_shard {spec.records_per_shard}: want at least 1")
  Tokenizer(spec.vocab_file, max_len=spec.max_text_len)  # a bad vocabulary stops us here
  has_labels = _has_labels(spec, region_paths)
  if not has_labels:
    logging.warning("%s: the region features carry no object class labels (bottom-up-attention "
                    "TSV): masked object classification will be turned off for this dataset",
                    spec.name)
  plan = build_pipeline.Plan(
      name=spec.name, out_dir=spec.out_dir, region_paths=tuple(region_paths),
      caption_units=tuple(units), caption_source=spec.caption_source,
      region_format=spec.region_format, split=spec.split, vocab_file=spec.vocab_file,
      max_text_len=spec.max_text_len, image_id_mode=spec.image_id_mode,
      records_per_shard=spec.records_per_shard, opts=_record_options(spec, has_labels))
  paths.makedirs(spec.out_dir)
  _clear_old_shards(spec)
  options = pipeline_options(spec.beam_options)
  try:
    pipeline = beam.Pipeline(options=options)
    build_pipeline.build(pipeline, plan)
    result = pipeline.run()
    result.wait_until_finish()
  except Exception as e:  # a worker's error comes back wrapped by the runner
    user_error = _user_error(e)
    if user_error is None:
      raise
    raise user_error from None
  skipped, repaired, read = build_pipeline.counted(result)
  if not read.get("captions"):
    raise InputError(f"--captions {spec.captions}: no usable captions")
  logging.info("%s: built in %.1fs", spec.name, time.time() - start)
  return finalize_dataset(spec, skipped, repaired, has_labels)


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


def finalize_dataset(spec: BuildSpec, skipped: dict[str, int], repaired: dict[str, int],
                     has_labels: bool) -> dict:
  """Checks all shards are there; writes TFDS metadata and the summary; prints the report."""
  opts = _record_options(spec, has_labels)
  info = builder.finalize(spec.out_dir, spec.name, opts, extra_info={
      "vocab_file": keep_vocab(spec.vocab_file, spec.out_dir), "max_text_len": spec.max_text_len,
      "skipped": dict(sorted(skipped.items())), "repaired": dict(sorted(repaired.items())),
      "image_id_mode": spec.image_id_mode,
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
  flags.DEFINE_integer("records_per_shard", 1000, "Most records per output shard.",
                       flag_values=fv)
  flags.DEFINE_string("beam_pipeline_options", "", "Apache Beam pipeline options, "
                      "'key=value,key=value' (as `tfds build` takes them), e.g. "
                      "'direct_num_workers=2,direct_running_mode=multi_processing' or "
                      "'runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp'; "
                      "empty: Beam's DirectRunner in this process.", flag_values=fv)
  # The build was once split over machines by hand; a Beam runner does that now.
  flags.DEFINE_integer("shard_index", None, "Gone: see --beam_pipeline_options.", flag_values=fv)
  flags.DEFINE_integer("num_shards", None, "Gone: see --beam_pipeline_options.", flag_values=fv)
  flags.DEFINE_bool("finalize_only", None, "Gone: see --beam_pipeline_options.", flag_values=fv)
  flags.mark_flags_as_required(["name", "out_dir", "vocab_file"], flag_values=fv)
  return fv


def parse_command(argv: list[str]) -> BuildSpec:
  """The build of a command line (argv[0] is the program)."""
  f = _flags()
  f(list(argv))
  for gone in ("shard_index", "num_shards", "finalize_only"):
    if f[gone].present:
      raise InputError(f"--{gone}: a build is no longer split over machines by hand; run it on a "
                       "Beam runner that spreads it over workers (--beam_pipeline_options, e.g. "
                       "runner=DataflowRunner; see the README)")
  return BuildSpec(
      name=f.name, out_dir=f.out_dir, regions=f.regions, captions=f.captions,
      caption_source=f.caption_source, region_format=f.region_format, split=f.split,
      vocab_file=f.vocab_file, max_text_len=f.max_text_len, feature_dim=f.feature_dim,
      min_boxes=f.min_boxes, max_boxes=f.max_boxes, conf_threshold=f.conf_threshold,
      class_probs_dim=f.class_probs_dim, image_id_mode=f.image_id_mode,
      records_per_shard=f.records_per_shard, beam_options=f.beam_pipeline_options,
      extra_info={**({"class_names": read_names(f.object_names)} if f.object_names else {}),
                  **({"attribute_names": read_names(f.attribute_names)}
                     if f.attribute_names else {})})


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
  """Runs a command line: builds the dataset."""
  return build_dataset(parse_command(argv))


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
