"""Images as the model sees them: any file read as upright 8-bit RGB, resized to training's size."""

from captioning.errors import PipelineError


def to_rgb(image):
    """An 8-bit RGB copy of any PIL image: upright per its EXIF, 16-bit scaled (not clipped), transparency on white."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(path, image_size):
    """An RGB image resized to image_size x image_size, the size training used."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = to_rgb(image)
    except FileNotFoundError as error:
        raise PipelineError(f"image not found: {path}") from error
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise PipelineError(f"cannot read image {path}: {error}") from error
    return image.resize((image_size, image_size), Image.BICUBIC)
