"""Turn one input file into baseline-JPEG bytes that every decoder we use accepts, or say why not.

DALI's GPU (hardware) decoder takes baseline JPEGs only and a decode error kills the whole
pipeline, so every sample is fully decoded here, once, when shards are written: progressive JPEGs,
CMYK/alpha/palette images and non-JPEG formats are re-encoded; anything that cannot be decoded is
rejected with a reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile

# A truncated file must fail, not decode to a grey tail.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Reasons recorded in rejected.jsonl (the `reason` field).
EMPTY = "empty"  # zero bytes
UNREADABLE = "unreadable"  # could not be read from disk
NOT_IMAGE = "not_image"  # no image format recognised
TRUNCATED = "truncated"  # image data ends early
UNDECODABLE = "undecodable"  # recognised but decoding failed
TOO_SMALL = "too_small"  # shorter side below --min-side
TOO_LARGE = "too_large"  # over PIL's decompression-bomb limit


@dataclass(frozen=True)
class EncodeSettings:
    min_side: int = 16
    max_side: int | None = None  # shrink (keeping aspect) so the longer side is at most this
    quality: int = 90  # JPEG quality for re-encoded images


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _open_decoded(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Image.UnidentifiedImageError as e:
        raise Rejected(NOT_IMAGE, str(e)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(TOO_LARGE, str(e)) from e
    except OSError as e:
        msg = str(e)
        reason = TRUNCATED if "truncated" in msg or "premature end" in msg.lower() else UNDECODABLE
        raise Rejected(reason, msg) from e
    except (ValueError, SyntaxError, EOFError) as e:  # PIL plugins raise these on broken headers
        raise Rejected(UNDECODABLE, f"{type(e).__name__}: {e}") from e
    return img


def is_baseline_jpeg(img: Image.Image) -> bool:
    """Baseline (SOF0/SOF1) 8-bit JPEG in RGB or greyscale: what nvJPEG's hardware path takes."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return False
    if img.info.get("progressive") or img.info.get("progression"):
        return False
    return getattr(img, "bits", 8) == 8  # 12-bit JPEGs exist and the hardware decoder refuses them


def to_baseline_jpeg(data: bytes, settings: EncodeSettings) -> tuple[bytes, int, int, bool]:
    """(jpeg bytes, width, height, re-encoded?) or raise :class:`Rejected`."""
    if not data:
        raise Rejected(EMPTY, "zero bytes")
    img = _open_decoded(data)
    w, h = img.size
    if min(w, h) < settings.min_side:
        raise Rejected(TOO_SMALL, f"{w}x{h} is below min side {settings.min_side}")
    too_big = settings.max_side is not None and max(w, h) > settings.max_side
    if is_baseline_jpeg(img) and not too_big:
        return data, w, h, False
    if img.mode != "RGB":
        # Alpha is composited over white (a transparent logo on black would lose its shape).
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        else:
            img = img.convert("RGB")
    if too_big:
        scale = settings.max_side / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=settings.quality, progressive=False, optimize=False)
    return out.getvalue(), w, h, True


def check_jpeg(data: bytes) -> None:
    """Fully decode stored sample bytes; raise :class:`Rejected` if they do not decode as JPEG."""
    if not data:
        raise Rejected(EMPTY, "zero bytes")
    img = _open_decoded(data)
    if img.format != "JPEG":
        raise Rejected(UNDECODABLE, f"stored as {img.format}, not JPEG")
