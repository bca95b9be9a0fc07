"""``OUT/report.html``: one self-contained page (inline data, script, styles and photos) that opens offline.

A Content-Security-Policy meta tag forbids every request except ``data:`` images (and, with ``--basemap_url``,
that tile host's images), so the page cannot reach the network even by mistake.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from attllm_jax.data.coordinates import Location
from attllm_jax.data.dataset import ImageSet
from attllm_jax.files import atomic_write_text
from attllm_jax.localization.results import PhotoResult

REPORT_FILE = "report.html"
THUMB_SIDE = 360
MAX_DATABASE_POINTS = 20000
_ASSETS = Path(__file__).with_name("assets")
_STYLE = """
body{font-family:sans-serif;margin:0;display:flex;gap:12px;padding:12px}
#left{flex:0 1 900px;min-width:0} #right{flex:0 0 420px;overflow:auto}
svg{border:1px solid #999;background:#f4f2ec;width:100%;height:auto;aspect-ratio:900/650}
.db{fill:#9a9a9a;opacity:.7} .topk{stroke-width:1;opacity:.6} .uncertainty{fill:none;stroke-width:1.5;opacity:.8}
.marker{stroke:#fff;stroke-width:1.5;cursor:pointer} .marker.selected{stroke:#000;stroke-width:3}
.scale{fill:#222} .arrow{fill:#222} .label{font-size:12px;fill:#222}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ccc;padding:2px 5px}
#list-body tr{cursor:pointer} .thumb{position:relative;display:inline-block} .thumb img{max-width:360px;display:block}
.thumb .overlay{position:absolute;left:0;top:0;width:100%;height:100%;opacity:.45}
"""


def _data_url(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=80) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def heat_image(heat: np.ndarray) -> Image.Image:
    """``[h, w]`` attention weights (0 distracting .. 2 distinctive, 1 neutral) -> a blue-white-red RGBA image."""
    t = np.clip(np.asarray(heat, np.float64) / 2.0, 0.0, 1.0)
    rgb = np.stack([np.clip(2 * t, 0, 1), 1 - np.abs(2 * t - 1), np.clip(2 - 2 * t, 0, 1)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB").convert("RGBA")


def photo_images(images: str, photos: list[str], attention_dir: str | None, sigma: float) -> dict[str, tuple]:
    """``photo -> (thumbnail data URL, overlay data URL or None)``; an unreadable photo gets ``(None, None)``."""
    from attllm_jax.attention.maps import attention_maps
    from attllm_jax.evaluation.attention_source import load_query_attention

    image_set = ImageSet(Path(images), tuple(photos), (Location(),) * len(photos))
    parsed = load_query_attention(image_set, attention_dir).parsed
    out = {}
    for photo, answer in zip(photos, parsed, strict=True):
        try:
            with Image.open(Path(images) / photo) as image:
                image = image.convert("RGB")
                image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        except (OSError, ValueError):
            out[photo] = (None, None)
            continue
        overlay = None
        if answer is not None and answer.has_attention:
            w, h = image.size
            heat = np.asarray(attention_maps([answer], max(2, h // 8), max(2, w // 8), sigma=sigma))[0]
            overlay = _data_url(heat_image(heat), "PNG")
        out[photo] = (_data_url(image, "JPEG"), overlay)
    return out


def _csp(basemap_url: str | None) -> str:
    images = "data:"
    if basemap_url:
        parts = urlsplit(basemap_url.replace("{", "").replace("}", ""))
        images += f" {parts.scheme}://{parts.netloc}"
    return f"default-src 'none'; img-src {images}; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def report_html(
    photos: list[PhotoResult], database_latlon: np.ndarray, pictures: dict, title: str, basemap_url: str | None
) -> str:
    """The page: ``photos`` and a subsample of at most MAX_DATABASE_POINTS ``[N, 2]`` database (lat, lon)."""
    step = max(1, int(np.ceil(len(database_latlon) / MAX_DATABASE_POINTS)))
    data = {
        "database": np.round(np.asarray(database_latlon)[::step], 7).tolist(),
        "photos": [{**p.to_dict(), "thumbnail": pictures.get(p.photo, (None, None))[0],
                    "overlay": pictures.get(p.photo, (None, None))[1]} for p in photos],
        "basemap_url": basemap_url,
    }  # fmt: skip
    payload = json.dumps(data).replace("</", "<\\/")
    script = (_ASSETS / "report.js").read_text(encoding="utf-8")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_csp(basemap_url)}">
<title>{title}</title><style>{_STYLE}</style></head>
<body><div id="left"><h2>{title}</h2>
<svg id="map" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="map"></svg>
<p>Grey dots: database images (the streets). Markers: photo estimates, circles: uncertainty radius, lines: top-K
matches; colour: confidence (red 0 .. green 1, grey-blue: uncalibrated).</p></div>
<div id="right"><div id="detail"><p>Click a marker or a row to see the photo, its attention and its matches.</p></div>
<table id="list"><thead><tr><th>photo</th><th id="sort-confidence">confidence &#8645;</th><th>radius (m)</th>
<th>lat, lon</th></tr></thead><tbody id="list-body"></tbody></table></div>
<script type="application/json" id="data">{payload}</script>
<script>{script}</script></body></html>
"""


def write_report(out: Path, run, settings, basemap_url: str | None = None) -> Path:
    """Writes ``out/report.html`` atomically for a :class:`~attllm_jax.localization.api.LocalizeRun`."""
    pictures = photo_images(settings.images, [p.photo for p in run.photos], settings.answers_dir, settings.sigma)
    title = f"attllm-localize: {len(run.photos)} photos"
    return atomic_write_text(
        out / REPORT_FILE, report_html(run.photos, run.database_latlon, pictures, title, basemap_url)
    )
