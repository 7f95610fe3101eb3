"""The search results as one self-contained HTML page: it opens from disk in any browser.

Each query is a section (`section.query`) with its ranked results (`.result`, in order). A result
image is a thumbnail inlined as a JPEG data URI when the image file is available, else a grey
placeholder of the image's proportions; with `boxes`, the regions the model saw are drawn over it
(SVG, in the image's pixel coordinates) and a checkbox shows or hides them. Scores of both stages
are printed under each result. Nothing is fetched: no scripts, fonts or images from elsewhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from typing import Any

from etils import epath

THUMBNAIL = 224  # pixels, the longer side

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
header p { color: #555; margin: 0.2em 0; }
section.query { border-top: 1px solid #ccc; margin-top: 1.2em; padding-top: 0.6em; }
h2 { font-size: 1.1em; }
.results { display: flex; flex-wrap: wrap; gap: 12px; list-style: none; padding: 0; }
.result { width: 230px; font-size: 0.8em; }
.frame { position: relative; width: 224px; }
.frame img, .frame .placeholder { display: block; width: 100%; }
.placeholder { background: #ddd; color: #666; text-align: center; }
.frame svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.frame svg rect { fill: none; stroke: #ffd400; stroke-width: 2px; vector-effect: non-scaling-stroke; }
body.hide-boxes .frame svg { display: none; }
.id { font-weight: bold; word-break: break-all; }
.scores { color: #555; }
ol.results.texts { display: block; }
ol.texts .result { width: auto; margin: 0.5em 0; font-size: 0.95em; }
.query-image { margin-bottom: 0.6em; }
"""

_SCRIPT = """
document.getElementById('show-boxes').addEventListener('change', function (e) {
  document.body.classList.toggle('hide-boxes', !e.target.checked);
});
"""


def thumbnail_uri(path: str) -> str:
  """A JPEG data URI of the image (EXIF orientation applied, as the detector saw it), or ''."""
  if not path:
    return ""
  try:
    from PIL import Image
    from imagebert_jax.detector.preprocess import load_image
    image = Image.fromarray(load_image(path))
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
  except Exception as e:  # noqa: BLE001 - a missing or unreadable image gets a placeholder
    logging.warning("no thumbnail for %s: %s", path, e)
    return ""
  return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _frame(info: dict | None, uri: str, boxes: bool, label: str) -> str:
  info = info or {}
  w, h = max(int(info.get("image_w", 1)), 1), max(int(info.get("image_h", 1)), 1)
  alt = html.escape(label, quote=True)
  if uri:
    picture = f'<img src="{uri}" alt="{alt}">'
  else:
    height = round(224 * h / w)
    picture = (f'<div class="placeholder" style="height:{height}px;line-height:{height}px">'
               f"no image</div>")
  overlay = ""
  if boxes and info.get("boxes"):
    rects = "".join(
        f'<rect x="{x1:.1f}" y="{y1:.1f}" width="{max(x2 - x1, 0):.1f}" '
        f'height="{max(y2 - y1, 0):.1f}"></rect>' for x1, y1, x2, y2 in info["boxes"])
    overlay = (f'<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none" '
               f'xmlns="http://www.w3.org/2000/svg">{rects}</svg>')
  return f'<div class="frame">{picture}{overlay}</div>'


def _scores(r: dict) -> str:
  cross = "not rescored" if r["score"] is None else f"cross-encoder {r['score']:.3f}"
  return (f'<div class="scores">{cross} &middot; embeddings {r["itc_score"]:.3f} '
          f'(#{r["itc_rank"]} in the first stage)</div>')


def render(results: dict, images: dict[str, dict], *, boxes: bool = False) -> str:
  """The page for `results` (imagebert_jax.retrieval.search.query's output); `images` maps an image id to
  its path, boxes and size."""
  thumbs: dict[str, str] = {}

  def uri(ident: str) -> str:
    if ident not in thumbs:
      thumbs[ident] = thumbnail_uri((images.get(ident) or {}).get("path", ""))
    return thumbs[ident]

  body = []
  for n, q in enumerate(results["queries"]):
    parts = [f'<section class="query" id="query-{n}" data-kind="{q["kind"]}">']
    if q["kind"] == "text":
      parts.append(f"<h2>{html.escape(q['query'])}</h2><ol class=\"results\">")
      for r in q["results"]:
        parts.append(
            f'<li class="result" data-id="{html.escape(r["id"], quote=True)}">'
            + _frame(images.get(r["id"]), uri(r["id"]), boxes, r["id"])
            + f'<div>{r["rank"]}. <span class="id">{html.escape(r["id"])}</span></div>'
            + _scores(r) + "</li>")
      parts.append("</ol>")
    else:
      parts.append(f"<h2>Image {html.escape(q['query'])}</h2>")
      parts.append('<div class="query-image">'
                   + _frame(images.get(q["query"]), uri(q["query"]), boxes, q["query"]) + "</div>")
      parts.append('<ol class="results texts">')
      for r in q["results"]:
        parts.append(f'<li class="result" data-id="{html.escape(r["id"], quote=True)}">'
                     f'{r["rank"]}. <span class="id">{html.escape(r["id"])}</span>'
                     + _scores(r) + "</li>")
      parts.append("</ol>")
    parts.append("</section>")
    body.append("".join(parts))
  toggle = ('<label><input type="checkbox" id="show-boxes" checked> show region boxes</label>'
            if boxes else "")
  rerank = results.get("rerank_k", 0)
  how = (f"the cross-encoder rescored each query's top {rerank} (or all, if fewer) by the "
         "embeddings" if rerank
         else "the cross-encoder scored every candidate")
  meta = html.escape(json.dumps({k: results.get(k) for k in ("index", "model", "images", "top_k",
                                                               "rerank_k")}), quote=True)
  head = (f"<header><h1>Search results</h1><p>Index {html.escape(str(results.get('index')))} "
          f"({results.get('images')} images), model {html.escape(str(results.get('model')))}</p>"
          f"<p>Top {results.get('top_k')} per query; {how}.</p>{toggle}</header>")
  script = f"<script>{_SCRIPT}</script>" if boxes else ""
  return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
          f"<meta name=\"search-results\" content=\"{meta}\">"
          f"<title>Search results</title><style>{_STYLE}</style></head>"
          f"<body>{head}{''.join(body)}{script}</body></html>\n")


def write_report(path: str, results: dict, images: dict[str, Any], *, boxes: bool = False) -> None:
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(render(results, images, boxes=boxes))
