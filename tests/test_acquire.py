"""`make data`: named folder, shared copy, then download (never reached in tests)."""

from __future__ import annotations

import shutil
import urllib.error

import pytest

from skin_lesion_classifier.data import acquire as acq
from skin_lesion_classifier.data.discovery import find_image_files


@pytest.fixture()
def two_part_source(tmp_path, samples_dir):
    """A user's copy in the release layout: metadata + two image parts at 600x450."""
    src = tmp_path / "user_copy"
    for k, img in enumerate(sorted((samples_dir / "images").glob("*.jpg"))):
        part = src / f"HAM10000_images_part_{1 + k % 2}"
        part.mkdir(parents=True, exist_ok=True)
        shutil.copy(img, part / img.name)
    shutil.copy(samples_dir / "HAM10000_metadata_samples.csv", src / acq.METADATA_FILE)
    return src


def test_named_folder_comes_first(tmp_path, two_part_source, ham10000_dir):
    dest = tmp_path / "01_raw"
    info = acq.acquire(dest, source=two_part_source, shared=ham10000_dir)
    assert info["copied"] == 21 and info["source"] == str(two_part_source)
    files = find_image_files(dest)
    assert set(files.folder) == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert (dest / acq.METADATA_FILE).read_bytes() == (
        two_part_source / acq.METADATA_FILE
    ).read_bytes()
    again = acq.acquire(
        dest, source=two_part_source
    )  # idempotent: nothing copied twice
    assert again["copied"] == 0 and again["already_present"] == 21


#: Real pictures in the shared copy of the fast test (the full release: the ``slow`` test).
N_SHARED_IMAGES = 200


def _check_shared_copy(dest, shared, n_images: int) -> None:
    info = acq.acquire(dest, shared=shared, allow_download=False, link=True)
    assert info["copied"] == n_images
    assert acq.md5sum(dest / acq.METADATA_FILE) == acq.METADATA_MD5
    files = find_image_files(dest)
    assert len(files) == n_images
    links = list((dest / "HAM10000_images").iterdir())
    assert all(p.is_symlink() for p in links[:20])
    for p in links[:20]:  # each link leads to the real picture, not to a link
        assert p.resolve() == (shared / "images" / p.name).resolve()
        assert not p.readlink().is_symlink()


def test_shared_copy_is_used_and_checksum_matches(tmp_path, ham10000_dir):
    """A shared copy in the layout of ``../shared/data``: the release's metadata and 200 of
    its real pictures (linked in from the shared data)."""
    shared = tmp_path / "shared"
    (shared / "images").mkdir(parents=True)
    shutil.copy(ham10000_dir / acq.METADATA_FILE, shared / acq.METADATA_FILE)
    for img in sorted((ham10000_dir / "images").glob("*.jpg"))[:N_SHARED_IMAGES]:
        (shared / "images" / img.name).symlink_to(img)
    _check_shared_copy(tmp_path / "01_raw", shared, N_SHARED_IMAGES)


@pytest.mark.slow
def test_the_whole_shared_copy_is_linked(tmp_path, ham10000_dir):
    _check_shared_copy(tmp_path / "01_raw", ham10000_dir, 10015)


def test_bad_named_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(acq.AcquisitionError, match="not a HAM10000 folder"):
        acq.acquire(tmp_path / "dest", source=tmp_path / "empty")
    with pytest.raises(acq.AcquisitionError, match="does not exist"):
        acq.acquire(tmp_path / "dest", source=tmp_path / "nowhere")


def test_offline_download_fails_with_instructions(tmp_path, monkeypatch, capsys):
    calls = []

    def no_network(url, timeout):
        calls.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(acq, "_open", no_network)
    dest = tmp_path / "01_raw"
    rc = acq.main(["--dest", str(dest), "--shared", str(tmp_path / "no_shared")])
    err = capsys.readouterr().err
    assert rc == 2 and calls and calls[0].startswith(acq.DATAVERSE)
    assert (
        "doi.org/10.7910/DVN/DBW86T" in err
        and str(dest) in err
        and "HAM10000_SOURCE" in err
    )
    with pytest.raises(acq.AcquisitionError, match="downloading is off"):
        acq.acquire(dest, shared=tmp_path / "no_shared", allow_download=False)
