"""DICOM images, as a hospital's archive sends them, decoded to the 8-bit grayscale the model reads.

A study's view may be a DICOM file (a .dcm/.dicom name, or the "DICM" marker at byte 128) instead of a
PNG or JPEG: `read_dicom` decodes it with pydicom (the `dicom` extra: pip install 'r2gen-launch[dicom]'),
applies the modality LUT (rescale slope and intercept), then the VOI LUT or the window (center and
width) the file carries, stretches the result's range to 0-255 and inverts MONOCHROME1 (where higher
values are darker), so that bone is bright as in the PNGs of IU X-Ray and MIMIC-CXR-JPG. A file whose
pixel data cannot be decoded here (a compressed transfer syntax without its pydicom plugin) stops the
command with the file and the transfer syntax named.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from r2gen.errors import DataError

SUFFIXES = (".dcm", ".dicom")


def is_dicom(path: Path) -> bool:
    """A DICOM file by its name, or by the marker of DICOM's file format (bytes 128-131: "DICM")."""
    if path.suffix.lower() in SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read(path: Path, pixels: bool = True):
    """The file's pydicom dataset (without its pixel data where `pixels` is False); DataError naming the file
    where pydicom is missing or the file is not DICOM."""
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{path}: a DICOM file; reading it needs pydicom (pip install 'r2gen-launch[dicom]')") from None
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for broken files
        raise DataError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from None


def dicom_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header alone, as PIL's Image.size."""
    ds = _read(path, pixels=False)
    return int(ds.Columns), int(ds.Rows)


def read_dicom(path: Path) -> Image.Image:
    """The file's first frame as an 8-bit grayscale ("L") image, or RGB for a colour file."""
    ds = _read(path)
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise DataError(f"{path}: a DICOM file without pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - missing plugins, broken fragments
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise DataError(f"{path}: its pixel data ({name}) cannot be decoded here ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); install its pydicom plugin "
                        "(pylibjpeg, or the openjpeg and libjpeg extras) or convert it to PNG") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if ds.get("SamplesPerPixel", 1) == 3:
        return Image.fromarray(pixels if pixels.dtype == np.uint8 else _to_uint8(pixels), "RGB")
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    gray = _to_uint8(values)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray, "L")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """values stretched from their minimum to their maximum onto 0-255 (a flat image is 0)."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)
