"""Fill ``data/01_raw`` with HAM10000: ``python -m skin_lesion_classifier.data.acquire``.

Sources, tried in this order:

1. a folder the user names (``--source DIR`` or the ``HAM10000_SOURCE`` environment variable),
2. ``../shared/data/ham10000`` beside the checkout, when present,
3. the official release on Harvard Dataverse (doi:10.7910/DVN/DBW86T), downloaded with a
   progress bar and checked against the MD5 sums Dataverse publishes.

A source folder holds ``HAM10000_metadata.csv`` and the images, in one folder or in the two
release folders ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/``. Offline, step 3
fails with a message that says where to put the files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from skin_lesion_classifier.data.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

METADATA_FILE = "HAM10000_metadata.csv"
DOI = "doi:10.7910/DVN/DBW86T"
DATAVERSE = "https://dataverse.harvard.edu"
DATASET_API = f"{DATAVERSE}/api/datasets/:persistentId/?persistentId={DOI}"
FILE_API = f"{DATAVERSE}/api/access/datafile/{{file_id}}"
#: Files of the release that make up the training set.
RELEASE_FILES = (
    "HAM10000_images_part_1.zip",
    "HAM10000_images_part_2.zip",
    "HAM10000_metadata",
)
#: MD5 of the original metadata file (as distributed, 10,015 rows).
METADATA_MD5 = "70bb67f71bd23dde0bd2eda4bdcc98e5"


class AcquisitionError(RuntimeError):
    """No source could provide the data; the message says what to do."""


def default_shared_dir(project_root: Path) -> Path:
    return project_root.parent / "shared" / "data" / "ham10000"


def is_ham_folder(folder: Path) -> bool:
    """A folder with the metadata CSV and at least one image below it."""
    if not (folder / METADATA_FILE).is_file():
        return False
    return any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file()
    )


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()  # noqa: S324 - a checksum, not security
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def copy_from_folder(source: Path, dest: Path, link: bool = False) -> dict:
    """Copy (or symlink, ``link=True``) the metadata and every image folder of ``source``.

    A flat image folder lands in ``dest/HAM10000_images/``; the release parts keep their names.
    Files already present with the same size are not copied again.
    """
    if not is_ham_folder(source):
        raise AcquisitionError(
            f"{source} is not a HAM10000 folder: it needs {METADATA_FILE} and the images "
            "(one folder, or HAM10000_images_part_1/ and HAM10000_images_part_2/)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / METADATA_FILE, dest / METADATA_FILE)
    copied = skipped = 0
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = path.relative_to(source)
        if len(rel.parts) == 1:  # images beside the CSV
            rel = Path("HAM10000_images") / rel
        elif rel.parts[0] == "images":
            rel = Path("HAM10000_images", *rel.parts[1:])
        target = dest / rel
        if target.exists() and target.stat().st_size == path.stat().st_size:
            skipped += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            if target.exists() or target.is_symlink():
                target.unlink()
            target.symlink_to(path.resolve())
        else:
            shutil.copy2(path, target)
        copied += 1
    return {"source": str(source), "copied": copied, "already_present": skipped}


def _open(url: str, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": "skin-lesion-classifier"})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - fixed https URL


def download_release(dest: Path, timeout: float = 30.0) -> dict:
    """Download the release from Dataverse into ``dest`` with progress bars and MD5 checks."""
    from tqdm.auto import tqdm

    offline_help = (
        "could not reach Harvard Dataverse to download HAM10000 ({err}). Download it by hand "
        f"from https://doi.org/10.7910/DVN/DBW86T and put {METADATA_FILE} plus the images "
        f"(HAM10000_images_part_1/ and HAM10000_images_part_2/, or one folder) in {dest}, "
        "or name an existing copy with HAM10000_SOURCE=/path/to/folder make data"
    )
    try:
        with _open(DATASET_API, timeout) as resp:
            listing = json.load(resp)
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
        raise AcquisitionError(offline_help.format(err=exc)) from exc
    files = listing["data"]["latestVersion"]["files"]
    wanted = {}
    for f in files:
        df = f["dataFile"]
        name = df.get("filename", "")
        if any(name.startswith(r) for r in RELEASE_FILES):
            wanted[name] = (
                df["id"],
                df.get("md5") or df.get("checksum", {}).get("value"),
            )
    if len(wanted) < len(RELEASE_FILES):
        raise AcquisitionError(
            f"the Dataverse listing lacks some release files; found {sorted(wanted)}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for name, (file_id, md5) in wanted.items():
        target = dest / name
        if not (target.exists() and md5 and md5sum(target) == md5):
            try:
                with (
                    _open(FILE_API.format(file_id=file_id), timeout) as resp,
                    target.open("wb") as out,
                ):
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                        while block := resp.read(1 << 20):
                            out.write(block)
                            bar.update(len(block))
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                raise AcquisitionError(offline_help.format(err=exc)) from exc
            if md5 and md5sum(target) != md5:
                raise AcquisitionError(
                    f"checksum mismatch for {target}: expected MD5 {md5}; delete it and retry"
                )
        if name.endswith(".zip"):
            with zipfile.ZipFile(target) as zf:
                zf.extractall(dest / name.removesuffix(".zip"))
        elif not name.endswith(".csv"):
            target.rename(dest / METADATA_FILE)
    return {"source": DATAVERSE, "files": sorted(wanted)}


def acquire(
    dest: Path,
    source: Path | None = None,
    shared: Path | None = None,
    allow_download: bool = True,
    link: bool = False,
) -> dict:
    """Fill ``dest`` from the first source that works (see the module docstring)."""
    if source is not None:
        if not source.is_dir():
            raise AcquisitionError(f"the named source folder {source} does not exist")
        return copy_from_folder(source, dest, link=link)
    if shared is not None and is_ham_folder(shared):
        return copy_from_folder(shared, dest, link=link)
    if is_ham_folder(dest):
        return {"source": str(dest), "copied": 0, "already_present": "all"}
    if not allow_download:
        raise AcquisitionError(
            f"no HAM10000 copy found (looked at {shared}) and downloading is off; put "
            f"{METADATA_FILE} and the images in {dest} or set HAM10000_SOURCE"
        )
    return download_release(dest)


def main(argv: list[str] | None = None) -> int:
    root = Path.cwd()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, default=root / "data" / "01_raw")
    parser.add_argument(
        "--source", type=Path, default=os.environ.get("HAM10000_SOURCE") or None
    )
    parser.add_argument("--shared", type=Path, default=default_shared_dir(root))
    parser.add_argument(
        "--no-download", action="store_true", help="never try the network"
    )
    parser.add_argument(
        "--link", action="store_true", help="symlink images instead of copying"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = acquire(
            args.dest, args.source, args.shared, not args.no_download, args.link
        )
    except AcquisitionError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    meta = args.dest / METADATA_FILE
    checksum = md5sum(meta)
    note = (
        "matches the original release"
        if checksum == METADATA_MD5
        else "differs from the original release"
    )
    print(f"HAM10000 ready in {args.dest}: {info}; metadata MD5 {checksum} ({note})")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
