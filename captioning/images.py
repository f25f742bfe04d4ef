"""Images as the model sees them: any file read as upright 8-bit RGB, resized to the size the Qwen-VL processor
computes for it (aspect ratio kept), as every serving engine resizes it, or to the recipe's square."""
from typing import NamedTuple

from captioning.errors import PipelineError
from captioning.models import FAMILIES, family_named

ASPECT_RATIOS = ("keep", "square")  # train.py's aspect_ratio setting
EXIF_ORIENTATION = 274  # the EXIF tag that says how a photo is rotated
TURNED = (5, 6, 7, 8)  # the orientations that swap width and height


class ImageGeometry(NamedTuple):
    """The size each image is resized to. By default it is the size that the Qwen-VL processor's own smart_resize
    computes with min_pixels = one merged patch and max_pixels = image_size²: the aspect ratio kept, sides multiples
    of side_multiple, at most image_size² pixels (extreme shapes keep a side of one merged patch, which can exceed
    it). transformers, vLLM and llama.cpp feed the model those sizes, so the model trains on what it is served.
    square: image_size x image_size whatever the photo's shape, as the recipe squashes it."""
    image_size: int
    side_multiple: int  # the family's patch size times the 2x2 merge
    square: bool = False

    def size_of(self, width, height, path="an image"):
        """(width, height) a width x height image is resized to; a PipelineError naming path for a shape no Qwen-VL
        processor takes (a long side over 200 times the short one)."""
        if self.square:
            return self.image_size, self.image_size
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        try:
            height, width = smart_resize(height, width, factor=self.side_multiple, min_pixels=self.side_multiple ** 2,
                                         max_pixels=self.image_size ** 2)
        except ValueError as error:
            raise PipelineError(f"{path} is {width}x{height}, a shape the Qwen-VL processor refuses in transformers "
                                f"and vLLM alike ({error}): crop it") from error
        return width, height

    def tokens(self, size):
        """The image tokens the language model gets for an image resized to size: one per merged patch."""
        return (size[0] // self.side_multiple) * (size[1] // self.side_multiple)

    def token_bounds(self):
        """(fewest, most) image tokens to give llama.cpp, which sizes a photo with the processor's smart_resize
        between them: from one merged patch up, as training does; a square run's min = max only fixes the area, as
        llama.cpp keeps the shape."""
        most = self.tokens((self.image_size, self.image_size))
        return (most if self.square else 1), most

    def __str__(self):
        shape = "squashed to a square" if self.square else "aspect ratio kept, at most"
        return f"{shape} {self.image_size}x{self.image_size} pixels"


def trained_geometry(run_config):
    """The ImageGeometry a training run used, from its run_config.json; runs recorded before aspect_ratio existed
    squashed every image to a square, and runs recorded before family existed trained Qwen2-VL."""
    family = family_named(run_config.get("family", FAMILIES["qwen2_vl"].name))
    return ImageGeometry(run_config["image_size"], family.side_multiple,
                         run_config.get("aspect_ratio", "square") == "square")


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


def opened(path):
    """The image file opened by PIL (its header read, its pixels not yet decoded), or a PipelineError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except FileNotFoundError as error:
        raise PipelineError(f"image not found: {path}") from error
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise PipelineError(f"cannot read image {path}: {error}") from error


def upright_size(path):
    """(width, height) of the image as load_image sees it, upright per its EXIF, read from its header alone."""
    with opened(path) as image:
        width, height = image.size
        return (height, width) if image.getexif().get(EXIF_ORIENTATION) in TURNED else (width, height)


def load_image(path, geometry):
    """An RGB image resized as geometry says, the size training used."""
    from PIL import Image

    try:
        with opened(path) as image:
            image = to_rgb(image)
    except (OSError, Image.DecompressionBombError) as error:  # the pixels, decoded only here, are cut or too many
        raise PipelineError(f"cannot read image {path}: {error}") from error
    size = geometry.size_of(*image.size, path)
    return image if image.size == size else image.resize(size, Image.BICUBIC)


def loaded_images(paths, geometry):
    """([(path, image)] of the paths that load, resized as geometry says; [(path, why)] of those that do not)."""
    loaded, failed = [], []
    for path in paths:
        try:
            loaded.append((path, load_image(path, geometry)))
        except PipelineError as error:
            failed.append((path, str(error)))
    return loaded, failed
