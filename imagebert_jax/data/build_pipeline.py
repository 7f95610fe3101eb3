"""The dataset build as an Apache Beam pipeline: the same pipeline on the DirectRunner of one
machine and on Dataflow, Flink or Spark.

    region files --scan--> (image id, where its record is)      captions --> (image id, caption)
                     \\                                                   /
                      `------------- joined by image id (CoGroupByKey) --'
                                              |
                         (region file, row, captions of each split) grouped by region file
                                              |
             each region file read again, its kept rows' regions selected and captions tokenized,
                   written as shards `{name}-{split}.tfrecord-{i:05d}-of-{n:05d}`

Only small values cross the shuffles (image ids, file positions, caption text); region features
are read where they are written, so the DirectRunner, which holds what crosses a shuffle in
memory, stays within a bounded memory whatever the dataset size, and a distributed runner moves
kilobytes per image rather than the features. Each region file is read twice (once to learn its
ids, once to write), which is the price of that.

Output is deterministic: one region file's records of a split go, in file order, to a run of
consecutive shards of at most `records_per_shard` records, numbered in region-file order, so any
number of workers writes the same files. A retried bundle rewrites the same shards whole.

What cannot be used is counted by reason in Beam counters (namespace `imagebert_build`,
`skipped.<reason>`, `repaired.<reason>`), which the build reads back into its report; each problem
is also logged, naming its file and record.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Iterator

# Beam warns on import that Google Cloud's BigQuery clients are missing (the `dataflow` extra
# installs them); nothing here uses BigQuery.
_before = logging.root.manager.disable
logging.disable(logging.WARNING)
try:
  import apache_beam as beam
  from apache_beam.metrics.metric import Metrics, MetricsFilter
finally:
  logging.disable(_before)

from imagebert_jax.data import builder, captions as captions_lib, formats, records
from imagebert_jax.errors import InputError

NAMESPACE = "imagebert_build"


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the workers need to know of the build (picklable)."""

  name: str
  out_dir: str
  region_paths: tuple[str, ...]
  caption_units: tuple[tuple[str, ...], ...]
  caption_source: str
  region_format: str
  split: str
  vocab_file: str
  max_text_len: int
  image_id_mode: str
  records_per_shard: int
  opts: records.RecordOptions


def skipped(reason: str, message: str, count: int = 1, log: bool = True) -> None:
  """Counts `count` unusable items under `reason` and logs one line naming them."""
  Metrics.counter(NAMESPACE, f"skipped.{reason}").inc(count)
  if log:
    logging.warning("skipped: %s", message)


def repaired(reason: str, message: str) -> None:
  """Counts an item kept after a repair (boxes beyond the maximum cut off); logged at DEBUG
  only, as a build that keeps the best 16 of each image's boxes repairs every record."""
  Metrics.counter(NAMESPACE, f"repaired.{reason}").inc()
  logging.debug("repaired: %s", message)


def counted(result) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
  """(skipped, repaired, other counters) by reason, from a finished pipeline's counters
  (committed values where the runner keeps them, else attempted)."""
  out = {"skipped": collections.Counter(), "repaired": collections.Counter(),
         "read": collections.Counter()}
  for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
    kind, _, reason = c.key.metric.name.partition(".")
    value = c.committed if c.committed is not None else c.attempted
    out.setdefault(kind, collections.Counter())[reason] += value or 0
  return dict(out["skipped"]), dict(out["repaired"]), dict(out["read"])


# ---- Regions: where each image's record is ------------------------------------------------------
def region_items(plan: Plan, file_index: int) -> Iterator[tuple[int, str, object]]:
  """(row, where, record or problem) of one region file, records checked for what the dataset
  needs (feature dimension, class distributions); rows count problems too, so that they are the
  same on every read of the file."""
  path = plan.region_paths[file_index]
  items = formats.read_regions([path], plan.region_format, plan.opts.feature_dim)
  for row, (where, item) in enumerate(items):
    if (not isinstance(item, formats.Problem) and plan.opts.class_probs_dim
        and (item.class_probs is None
             or item.class_probs.shape[1] != plan.opts.class_probs_dim)):
      item = formats.Problem("class_probs", f"{where}: no class distribution of "
                                            f"{plan.opts.class_probs_dim} classes, which "
                                            "--class_probs_dim asks for")
    yield row, where, item


def scan_regions(file_index: int, plan: Plan) -> Iterator[tuple[str, tuple]]:
  """(image id, (file, row, boxes, where)) for each usable record of one region file."""
  for row, where, item in region_items(plan, file_index):
    if isinstance(item, formats.Problem):
      skipped(item.reason, item.message, item.count)
      continue
    image_id = formats.canonical_id(item.image_id, plan.image_id_mode)
    yield image_id, (file_index, row, item.num_boxes, where)


# ---- Captions ------------------------------------------------------------------------------------
def read_unit(unit_index: int, plan: Plan):
  """(image id, (unit, position, split, text)) for each caption of one caption unit, and at the
  end the unit's item count (problems included) on the output tagged 'count'."""
  n = 0
  try:
    for n, item in enumerate(captions_lib.read_caption_unit(
        plan.caption_source, plan.caption_units[unit_index], plan.split), start=1):
      if isinstance(item, formats.Problem):
        skipped(item.reason, item.message, item.count)
        continue
      Metrics.counter(NAMESPACE, "read.captions").inc()
      yield (formats.canonical_id(item.image_id, plan.image_id_mode),
             (unit_index, n - 1, item.split, item.text))
  except (ValueError, FileNotFoundError) as e:
    raise InputError(str(e)) from None
  yield beam.pvalue.TaggedOutput("count", (unit_index, n))


# ---- The join ------------------------------------------------------------------------------------
def join(item, offsets: dict[int, int], max_boxes: int):
  """One image id's region records and captions -> (file, (row, image id, split, captions,
  source order)) per split of the kept record; what cannot be used is counted. The first record
  of an id in source order is kept (as a sequential reader would); an id's captions keep their
  source order, and its record's source order is its first caption's position in the whole
  caption source."""
  image_id, groups = item
  regions = sorted(groups["regions"])
  caps = sorted(groups["captions"])
  if not regions:
    skipped("captions_without_image", f"image {image_id}: {len(caps)} captions but no region "
                                      "features", count=len(caps), log=False)
    yield beam.pvalue.TaggedOutput("without_image", image_id)
    return
  file_index, row, num_boxes, where = regions[0]
  for _, _, _, other in regions[1:]:
    skipped("duplicate_image_id", f"{other}: a second set of region features for image "
                                  f"{image_id}; the first is kept")
  if not caps:
    skipped("image_without_captions", f"{where}: region features but no captions")
    return
  if num_boxes > max_boxes:
    repaired("too_many_boxes", f"{where}: {num_boxes} boxes, the best {max_boxes} are kept")
  unit, position = caps[0][0], caps[0][1]
  source_order = offsets.get(unit, 0) + position
  by_split = collections.defaultdict(list)
  for _, _, split, text in caps:
    by_split[split].append(text)
  for split, texts in sorted(by_split.items()):
    yield file_index, (row, image_id, split, tuple(texts), source_order)


def unit_offsets(counts: list[tuple[int, int]]) -> dict[int, int]:
  """Each caption unit's first position in the whole source, from the units' item counts."""
  sizes = dict(counts)
  out, total = {}, 0
  for unit in sorted(sizes):
    out[unit] = total
    total += sizes[unit]
  return out


def shard_plan(counts: list[tuple[tuple[str, int], int]],
               records_per_shard: int) -> dict[tuple[str, int], tuple[int, int]]:
  """(split, region file) -> (its first shard, the split's shard count): each region file's
  records of a split fill ceil(count / records_per_shard) consecutive shards, in file order."""
  per_split = collections.defaultdict(list)
  for (split, file_index), n in counts:
    per_split[split].append((file_index, n))
  plan = {}
  for split, files in per_split.items():
    first = 0
    starts = []
    for file_index, n in sorted(files):
      starts.append((file_index, first))
      first += math.ceil(n / records_per_shard)
    for file_index, start in starts:
      plan[(split, file_index)] = (start, first)
  return plan


# ---- Writing -------------------------------------------------------------------------------------
class WriteRegionFile(beam.DoFn):
  """Reads one region file again and writes its kept records, with their captions tokenized and
  their regions selected, to its shards of each split."""

  def __init__(self, plan: Plan):
    self.plan = plan

  def setup(self):
    from imagebert_jax.data.tokenizer import Tokenizer
    self.tokenizer = Tokenizer(self.plan.vocab_file, max_len=self.plan.max_text_len)

  def process(self, item, shards):
    file_index, wanted = item
    plan = self.plan
    start = time.time()
    rows = collections.defaultdict(list)
    for row, image_id, split, texts, source_order in wanted:
      rows[row].append((image_id, split, texts, source_order))
    writers: dict[str, builder.ShardWriter] = {}
    written = collections.Counter()
    try:
      for row, where, record in region_items(plan, file_index):
        if row not in rows:
          continue
        if isinstance(record, formats.Problem):  # it read whole the first time
          raise InputError(f"{where}: changed while the dataset was being built ({record.message})")
        for image_id, split, texts, source_order in rows.pop(row):
          selected = records.select_regions(dataclasses.replace(record, image_id=image_id),
                                            plan.opts)
          example = records.make_example(selected, list(texts),
                                         self.tokenizer.encode_batch(list(texts)), plan.opts,
                                         source_order=source_order)
          first, total = shards[(split, file_index)]
          if written[split] % plan.records_per_shard == 0:
            if split in writers:
              writers.pop(split).close()
            writers[split] = builder.ShardWriter(
                plan.out_dir, plan.name, split, plan.opts,
                shard_index=first + written[split] // plan.records_per_shard, num_shards=total)
          writers[split].write(example)
          written[split] += 1
    finally:
      for writer in writers.values():
        writer.close()
    if rows:
      raise InputError(f"{plan.region_paths[file_index]}: rows {sorted(rows)[:5]} are gone on "
                       "the second read; the file changed while the dataset was being built")
    logging.info("%s: %s records written in %.1fs", plan.region_paths[file_index],
                 dict(written), time.time() - start)
    yield sum(written.values())


def write_empty_splits(splits: list[str], shards: dict, plan: Plan) -> None:
  """One empty shard for each split that has captions but no record (so that the split is there,
  with no records, as its captions say)."""
  written = {split for split, _ in shards}
  for split in sorted(set(splits) - written):
    logging.warning("%s: split %s has captions but none of their images has region features",
                    plan.name, split)
    builder.ShardWriter(plan.out_dir, plan.name, split, plan.opts).close()


def build(pipeline: beam.Pipeline, plan: Plan) -> None:
  """Adds the build's transforms to a pipeline."""
  region_files = (pipeline
                  | "RegionFiles" >> beam.Create(list(range(len(plan.region_paths))))
                  | "SpreadRegionFiles" >> beam.Reshuffle())
  regions = region_files | "ScanRegions" >> beam.FlatMap(scan_regions, plan)
  read = (pipeline
          | "CaptionUnits" >> beam.Create(list(range(len(plan.caption_units))))
          | "ReadCaptions" >> beam.FlatMap(read_unit, plan).with_outputs("count", main="captions"))
  offsets = beam.pvalue.AsSingleton(
      read.count | "UnitOffsets" >> beam.combiners.ToList() | beam.Map(unit_offsets))
  joined = ({"regions": regions, "captions": read.captions}
            | "JoinById" >> beam.CoGroupByKey()
            | "Decide" >> beam.FlatMap(join, offsets, plan.opts.max_boxes).with_outputs(
                "without_image", main="kept"))
  _ = (joined.without_image
       | "SomeWithoutImage" >> beam.combiners.Top.Smallest(5)
       | beam.Map(lambda ids: ids and logging.warning(
           "captions without region features, e.g. images %s", ", ".join(ids))))
  shards = beam.pvalue.AsSingleton(
      joined.kept
      | "SplitOfFile" >> beam.Map(lambda kv: ((kv[1][2], kv[0]), 1))
      | "CountPerFile" >> beam.CombinePerKey(sum)
      | "AllCounts" >> beam.combiners.ToList()
      | "PlanShards" >> beam.Map(shard_plan, plan.records_per_shard))
  _ = (read.captions
       | "SplitOfCaption" >> beam.Map(lambda kv: kv[1][2])
       | "Splits" >> beam.Distinct()
       | "AllSplits" >> beam.combiners.ToList()
       | "EmptySplits" >> beam.Map(write_empty_splits, shards, plan))
  _ = (joined.kept
       | "ByRegionFile" >> beam.GroupByKey()
       | "Write" >> beam.ParDo(WriteRegionFile(plan), shards)
       | "Total" >> beam.CombineGlobally(sum)
       | beam.Map(lambda n: logging.info("%s: %d records written", plan.name, n)))
