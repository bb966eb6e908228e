"""Reading pixels: bit depths, file types, channel conversion, and errors that name the file."""

from __future__ import annotations

import cv2
import nibabel
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medaug.data import ImageReadError, load_image, load_mask, read_array, rescale_to_unit, to_channels


def dicom_file(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"DICOM test file {name} not installed (pip install pydicom-data)")
    return path


def test_8bit_png_is_divided_by_255(tmp_path):
    pixels = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png", channels=1)
    assert image.shape == (16, 16, 1) and image.dtype == np.float32
    np.testing.assert_allclose(image[..., 0], pixels / 255.0, atol=1e-6)


def test_16bit_png_is_rescaled_over_its_range_not_clipped(tmp_path):
    # 12-bit data stored in 16 bits: Pillow's convert("RGB") would turn all of it white.
    pixels = np.linspace(100, 4000, 32 * 32).reshape(32, 32).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), pixels)
    assert read_array(tmp_path / "a.png").dtype == np.uint16
    image = load_image(tmp_path / "a.png", channels=3)
    assert image.shape == (32, 32, 3)
    assert image.min() == 0.0 and image.max() == 1.0
    expected = (pixels.astype(np.float32) - 100) / 3900
    np.testing.assert_allclose(image[..., 1], expected, atol=1e-5)


def test_16bit_colour_png_keeps_16_bits(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65535, (8, 9, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c.png"), pixels[:, :, ::-1])  # OpenCV writes BGR
    array = read_array(tmp_path / "c.png")
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, pixels)


def test_jpeg_and_float_tiff(tmp_path):
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[:, :, 0] = 200
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    image = load_image(tmp_path / "a.jpg", channels=3)
    assert image.shape == (10, 12, 3)
    assert image[..., 0].mean() > 0.7 and image[..., 2].mean() < 0.1  # red stays red: RGB order
    grey = load_image(tmp_path / "a.jpg", channels=1)
    np.testing.assert_allclose(grey[..., 0], 0.299 * image[..., 0] + 0.587 * image[..., 1]
                               + 0.114 * image[..., 2], atol=1e-5)
    floats = np.linspace(-5.0, 5.0, 40, dtype=np.float32).reshape(5, 8)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tiff")
    tiff = load_image(tmp_path / "f.tiff", channels=1)[..., 0]
    np.testing.assert_allclose(tiff, (floats + 5) / 10, atol=1e-6)


def test_to_channels_and_rescale_edge_cases():
    assert to_channels(np.zeros((4, 5)), 3).shape == (4, 5, 3)
    assert to_channels(np.zeros((4, 5, 4)), 3).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="channels"):
        to_channels(np.zeros((4, 5)), 2)
    assert rescale_to_unit(np.full((3, 3), 7, dtype=np.uint16)).max() == 0.0


def test_radiograph_dicom_monochrome1_is_inverted():
    path = dicom_file("RG1_UNCR.dcm")  # a real computed radiograph, MONOCHROME1 with a VOI window
    import pydicom

    stored = pydicom.dcmread(path).pixel_array
    image = load_image(path, channels=1)[..., 0]
    assert image.shape == stored.shape
    # MONOCHROME1: the highest stored value is displayed darkest.
    brightest_stored = np.unravel_index(np.argmax(stored), stored.shape)
    darkest_stored = np.unravel_index(np.argmin(stored), stored.shape)
    assert image[brightest_stored] < 0.05 and image[darkest_stored] > 0.95


def test_dicom_modality_lut_then_voi_lut():
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    for name in ("CT_small.dcm", "vlut_04.dcm", "mlut_18.dcm"):
        path = dicom_file(name)
        dataset = pydicom.dcmread(path)
        expected = rescale_to_unit(apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset)
                                   .astype(np.float32))
        np.testing.assert_allclose(load_image(path, channels=1)[..., 0], expected, atol=1e-6, err_msg=name)


def test_ultrasound_rgb_and_multiframe_dicom():
    ultrasound = load_image(dicom_file("US1_UNCR.dcm"), channels=3)
    assert ultrasound.shape == (480, 640, 3)
    frames_path = dicom_file("emri_small.dcm")  # 10 MR frames
    import pydicom

    frames = pydicom.dcmread(frames_path).pixel_array
    with pytest.raises(ImageReadError, match="slice_index"):
        read_array(frames_path)
    np.testing.assert_array_equal(read_array(frames_path, slice_index=3), frames[3].astype(np.float32))


def test_nifti_slice_is_chosen_and_oriented(tmp_path):
    volume = np.zeros((6, 4, 3), dtype=np.float32)  # (x, y, z)
    volume[5, 0, 2] = 9.0  # right-most x, lowest y, last slice
    nibabel.save(nibabel.Nifti1Image(volume, affine=np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(ImageReadError, match="3 slices"):
        read_array(tmp_path / "v.nii.gz")
    with pytest.raises(ImageReadError, match="out of range"):
        read_array(tmp_path / "v.nii.gz", slice_index=3)
    image = read_array(tmp_path / "v.nii.gz", slice_index=2)
    assert image.shape == (4, 6)  # rows are y, columns x
    assert image[3, 5] == 9.0  # lowest y is the bottom row
    assert read_array(tmp_path / "v.nii.gz", slice_index=0).max() == 0.0


def monai_ras_slice(path, slice_index):
    """MONAI's view: LoadImage, then Orientation to RAS; the slice shown with rows as A (lowest at the bottom) and
    columns as R, the convention read_array uses."""
    from monai.transforms import LoadImage, Orientation

    volume = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)(str(path))
    ras = np.asarray(Orientation(axcodes="RAS")(volume))[0]
    return np.flipud(ras[:, :, slice_index].T)


AFFINES = {
    "identity": np.eye(4),
    "left-right flipped": np.diag([-1.0, 1.0, 1.0, 1.0]),
    # stored axes are (A, R, I): swapped in-plane and the slices run downwards
    "permuted, slices reversed": np.array([[0, 2.0, 0, 5], [1.5, 0, 0, -3], [0, 0, -1.0, 7], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_nifti_slices_match_monai_ras_orientation(tmp_path, name):
    volume = np.random.default_rng(0).normal(size=(6, 5, 3)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, affine=AFFINES[name]), tmp_path / "v.nii.gz")
    for slice_index in range(3):
        np.testing.assert_array_equal(read_array(tmp_path / "v.nii.gz", slice_index=slice_index),
                                      monai_ras_slice(tmp_path / "v.nii.gz", slice_index))


def test_left_right_flipped_nifti_is_mirrored(tmp_path):
    volume = np.zeros((6, 4, 3), dtype=np.float32)
    volume[5, 0, 2] = 9.0  # last stored x, which the affine puts at the far left
    nibabel.save(nibabel.Nifti1Image(volume, affine=AFFINES["left-right flipped"]), tmp_path / "v.nii.gz")
    image = read_array(tmp_path / "v.nii.gz", slice_index=2)
    assert image.shape == (4, 6) and image[3, 0] == 9.0  # left-most column, bottom row
    nibabel.save(nibabel.Nifti1Image(volume[:, :, 2:], affine=AFFINES["left-right flipped"]), tmp_path / "flat.nii")
    np.testing.assert_array_equal(read_array(tmp_path / "flat.nii"), image)  # a 2D image the same way


def test_masks_load_through_the_same_reader(tmp_path):
    mask = np.zeros((7, 9), dtype=np.uint8)
    mask[2:4, 3:6] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    loaded = load_mask(tmp_path / "m.png")
    assert loaded.dtype == np.bool_ and loaded.shape == (7, 9) and loaded.sum() == 6


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_error_names_the_file(tmp_path, suffix):
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    path = tmp_path / f"broken{suffix}"
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ImageReadError, match=f"broken\\{suffix}"):
        load_image(path)


def test_unsupported_and_missing_files_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.txt: unsupported image type"):
        read_array(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="gone.png: file not found"):
        read_array(tmp_path / "gone.png")


def _png_header_only(path, width, height, bit_depth=16, colour_type=2):
    """A PNG that claims a size in its IHDR chunk and holds no pixels: enough to test a check made before
    decoding (a real 15000 x 15000 16-bit RGB bomb compresses to about 1.3 MB and decodes to 1.35 GB)."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunk = struct.pack(">I", len(header)) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    return path


def test_a_png_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    from medaug.data.loading import image_size

    bomb = _png_header_only(tmp_path / "bomb.png", 15000, 15000)
    for read in (load_image, load_mask, read_array, image_size):
        with pytest.raises(ImageReadError, match=r"bomb.png: 15000 x 15000 = 225,000,000 pixels, more than the "
                                                 r"limit of 100,000,000 .*MEDAUG_MAX_IMAGE_PIXELS"):
            read(bomb)


def test_the_pixel_limit_applies_to_every_reader(tmp_path, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    for suffix in (".png", ".tif", ".jpg"):
        Image.fromarray(pixels).save(tmp_path / f"small{suffix}")
    nibabel.save(nibabel.Nifti1Image(np.zeros((6, 4, 3), dtype=np.float32), affine=np.eye(4)), tmp_path / "v.nii")
    monkeypatch.setenv("MEDAUG_MAX_IMAGE_PIXELS", "256")
    for suffix in (".png", ".tif", ".jpg"):
        assert read_array(tmp_path / f"small{suffix}").shape == (16, 16)  # at the limit: read
    monkeypatch.setenv("MEDAUG_MAX_IMAGE_PIXELS", "255")
    for suffix in (".png", ".tif", ".jpg"):
        with pytest.raises(ImageReadError, match=rf"small\{suffix}: 16 x 16 = 256 pixels, more than the limit of 255"):
            read_array(tmp_path / f"small{suffix}")
    monkeypatch.setenv("MEDAUG_MAX_IMAGE_PIXELS", "23")
    with pytest.raises(ImageReadError, match=r"v.nii: 6 x 4 = 24 pixels"):  # one slice counts, not the volume
        read_array(tmp_path / "v.nii", slice_index=1)
    monkeypatch.setenv("MEDAUG_MAX_IMAGE_PIXELS", "480*640")
    with pytest.raises(ImageReadError, match=r"MEDAUG_MAX_IMAGE_PIXELS='480\*640': expected a whole number"):
        read_array(tmp_path / "small.png")


def test_the_pixel_limit_counts_every_dicom_frame(monkeypatch):
    frames_path = dicom_file("emri_small.dcm")  # 10 frames of 64 x 64, decoded whole
    monkeypatch.setenv("MEDAUG_MAX_IMAGE_PIXELS", str(64 * 64 * 10 - 1))
    with pytest.raises(ImageReadError, match=r"emri_small.dcm: 64 x 64 x 10 frames = 40,960 pixels"):
        read_array(frames_path, slice_index=3)
    monkeypatch.setenv("MEDAUG_MAX_IMAGE_PIXELS", str(480 * 640 - 1))
    with pytest.raises(ImageReadError, match=r"US1_UNCR.dcm: 640 x 480 = 307,200 pixels"):
        load_image(dicom_file("US1_UNCR.dcm"))
