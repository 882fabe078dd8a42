"""DICOM views (r2gen.data.dicom): decoded with pydicom to the 8-bit grayscale the model reads: the modality
LUT, then the window or VOI LUT, stretched to 0-255, MONOCHROME1 inverted; a compressed file this machine
cannot decode, or pydicom missing, stops with the file named (exit 2). `generate` on a folder of DICOM
studies gives the reports of the same pixels as PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid  # noqa: E402

from r2gen.data.datasets import check_image, open_image  # noqa: E402
from r2gen.data.dicom import dicom_size, is_dicom, read_dicom  # noqa: E402
from r2gen.errors import DataError  # noqa: E402


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16,
                syntax=ExplicitVRLittleEndian, **elements) -> Path:
    """A single-frame grayscale DX image file as an archive writes it."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    else:
        ds.PixelData = encapsulate([b"\x00" * 64])  # a fragment no installed plugin decodes
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


RAMP = np.arange(64 * 64, dtype=np.float64).reshape(64, 64) * 16  # 0 .. 65520, 16-bit


def test_a_16_bit_ramp_is_stretched_to_8_bits(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", RAMP[:, :48])
    image = read_dicom(path)
    assert image.mode == "L" and image.size == (48, 64) == dicom_size(path)  # the header gives the same size
    want = np.round(RAMP[:, :48] * 255 / RAMP[:, :48].max()).astype(np.uint8)
    assert np.array_equal(np.asarray(image), want)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    plain = np.asarray(read_dicom(write_dicom(tmp_path / "m2.dcm", RAMP)))
    inverted = np.asarray(read_dicom(write_dicom(tmp_path / "m1.dcm", RAMP, "MONOCHROME1")))
    assert np.array_equal(inverted, 255 - plain)


def test_the_window_and_the_rescale_are_applied(tmp_path: Path) -> None:
    """DICOM's linear window (PS3.3 C.11.2.1.2) on the rescaled values: below c - w/2 the darkest, above
    c + w/2 the brightest, linear in between; then the stretch to 0-255."""
    center, width, slope, intercept = 20000.0, 10001.0, 2.0, -1000.0
    image = read_dicom(write_dicom(tmp_path / "w.dcm", RAMP, WindowCenter=center, WindowWidth=width,
                                   RescaleSlope=slope, RescaleIntercept=intercept))
    x = RAMP * slope + intercept
    y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    want = np.round((y - y.min()) * 255 / (y.max() - y.min())).astype(np.uint8)
    got = np.asarray(image)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # one 8-bit step: rounding at the window's ends
    assert got[0, 0] == 0 and got[-1, -1] == 255 and 0 < got[10, 20] < 255  # 10,560 x 2 - 1,000: inside


def test_dicom_is_found_by_name_or_by_its_marker(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "view", RAMP)  # no suffix: the "DICM" marker at byte 128
    assert is_dicom(path) and is_dicom(tmp_path / "x.DCM")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "p.png")
    assert not is_dicom(tmp_path / "p.png")
    assert np.array_equal(np.asarray(open_image(path)), np.asarray(read_dicom(path)))


def test_a_compressed_file_this_machine_cannot_decode_is_named(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "c.dcm", RAMP, syntax=JPEG2000Lossless)
    with pytest.raises(DataError, match=r"c\.dcm: its pixel data \(JPEG 2000 Image Compression \(Lossless Only\)\)"):
        read_dicom(path)
    from r2gen.data.datasets import Study

    with pytest.raises(DataError, match="c.dcm"):
        check_image(path, Study("s1", "", (path,)), tmp_path / "annotation.json")


def test_without_pydicom_the_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dicom(tmp_path / "a.dcm", RAMP)
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # import pydicom raises ImportError
    with pytest.raises(DataError, match=r"a\.dcm: a DICOM file; reading it needs pydicom \(pip install "
                                        r"'r2gen-launch\[dicom\]'\)"):
        read_dicom(path)


def test_generate_on_dicom_studies_gives_the_reports_of_the_same_pixels_as_png(small_set: Path,
                                                                               tmp_path: Path) -> None:
    """The test studies' views written as PNG and as 16-bit MONOCHROME1 DICOM of the same 8-bit pixels
    (each view made to span 0-255, so the stretch gives them back exactly): the same reports."""
    from child_env import run_cli

    run = tmp_path / "runs"
    trained = run_cli(["plain", "--preset", "tiny", "--device", "cpu", "--epochs", "1", "--num-workers", "0",
                       "--beam-size", "2", "--ann-path", str(small_set), "--run-dir", str(run), "--name", "r"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    entries = json.loads(small_set.read_text())["test"]
    for kind in ("png", "dicom"):
        for entry in entries:
            folder = tmp_path / kind / entry["id"]
            folder.mkdir(parents=True)
            for view, name in enumerate(entry["image_path"]):
                with Image.open(small_set.parent / "images" / name) as im:
                    pixels = np.asarray(im.convert("L")).copy()
                pixels[0, 0], pixels[0, 1] = 0, 255
                if kind == "png":
                    Image.fromarray(pixels).save(folder / f"{view}.png")
                else:
                    write_dicom(folder / f"{view}.dcm", (255 - pixels.astype(np.float64)) * 257, "MONOCHROME1")
    reports = {}
    for kind in ("png", "dicom"):
        out = tmp_path / f"out-{kind}"
        result = run_cli(["generate", "--checkpoint", str(run / "r"), "--input", str(tmp_path / kind), "--device",
                          "cpu", "--num-workers", "0", "--out", str(out)], tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        reports[kind] = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert [r["id"] for r in reports["dicom"]] == [e["id"] for e in entries]
    assert [r["report"] for r in reports["dicom"]] == [r["report"] for r in reports["png"]]
    assert reports["dicom"][0]["images"][0].endswith("0.dcm")
    # A study whose view this machine cannot decode: exit 2, one line naming the file, nothing written.
    broken = tmp_path / "dicom" / entries[0]["id"] / "1.dcm"
    write_dicom(broken, RAMP, syntax=JPEG2000Lossless)
    refused = run_cli(["generate", "--checkpoint", str(run / "r"), "--input", str(tmp_path / "dicom"), "--device",
                       "cpu", "--num-workers", "0", "--out", str(tmp_path / "out-broken")], tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert str(broken) in refused.stderr and not (tmp_path / "out-broken").exists()
