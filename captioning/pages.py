"""The pieces of the HTML pages that compare.py, verify.py and demo.py show: their style, thumbnails, caption cells."""

import base64
import html
import io

from captioning.images import load_image

# the reports' look: plain tables of captions beside their images
PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 6px 10px; vertical-align: top; text-align: left; }
#metrics td { text-align: right; font-variant-numeric: tabular-nums; }
td.skipped { color: #999; }
img { width: 192px; display: block; border: 1px solid #ddd; }
.path { font-size: 0.75em; color: #777; word-break: break-all; max-width: 192px; }
.empty { color: #999; font-style: italic; }
ul { margin: 0; padding-left: 1.2em; }
"""


def thumbnail_data_uri(path, geometry, side=256):
    """The image as the model saw it, small enough to embed in a page."""
    thumbnail = load_image(path, geometry)
    thumbnail.thumbnail((side, side))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def caption_cell(caption):
    return html.escape(caption) if caption else "<span class='empty'>(empty caption)</span>"
