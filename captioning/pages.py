"""The pieces of the HTML pages that compare.py and demo.py show: thumbnails and caption cells."""

import base64
import html
import io

from captioning.images import load_image


def thumbnail_data_uri(path, geometry, side=256):
    """The image as the model saw it, small enough to embed in a page."""
    thumbnail = load_image(path, geometry)
    thumbnail.thumbnail((side, side))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def caption_cell(caption):
    return html.escape(caption) if caption else "<span class='empty'>(empty caption)</span>"
