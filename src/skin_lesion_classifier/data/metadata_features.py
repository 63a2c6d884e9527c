"""Patient metadata (age, sex, anatomical site) as a fixed-length numeric vector.

:class:`MetadataEncoder` is fitted on the training rows only and then applied unchanged to
validation, test, external sets and single requests. Every missing value is handled
explicitly, never imputed silently:

* ``age``: standardised ``z = (age - mean_train) / std_train``; a blank age gives ``z = 0``
  (the training mean) **and** ``age_missing = 1``, so the model can tell "50 years" from
  "unknown".
* ``sex``: one-hot over ``female``, ``male``, ``unknown``; blank / NaN counts as ``unknown``.
  Any other value is an error naming the rows.
* ``localization``: one-hot over the sites seen in training at least ``min_site_count``
  times, plus ``unknown`` (blank / ``unknown``) and ``other`` (a site rarer than
  ``min_site_count`` in training, or never seen there, e.g. a new site in an external set).

The encoder serialises to a plain dict (:meth:`MetadataEncoder.to_dict`), which is what the
checkpoint meta stores as ``metadata_encoder``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

#: Sex categories, ``unknown`` included as a category of its own.
SEX_CATEGORIES: tuple[str, ...] = ("female", "male", "unknown")
#: Site bucket for blank / ``unknown`` localizations.
UNKNOWN_SITE = "unknown"
#: Site bucket for localizations rare or unseen in training.
OTHER_SITE = "other"
#: Columns the encoder reads.
METADATA_COLUMNS: tuple[str, ...] = ("age", "sex", "localization")
#: Version of the serialised form.
ENCODER_VERSION = 1


def _clean_text(values: pd.Series) -> pd.Series:
    """Lower-cased, stripped strings; NaN / None / blank become ``unknown``."""
    out = values.astype("object").where(values.notna(), None)
    out = out.map(lambda v: UNKNOWN_SITE if v is None else str(v).strip().lower())
    return out.replace("", UNKNOWN_SITE)


def _row_ids(frame: pd.DataFrame, mask: np.ndarray, limit: int = 5) -> list[str]:
    """Identifiers of the flagged rows (``image_id`` when present, else the index)."""
    ids = frame["image_id"] if "image_id" in frame.columns else frame.index.to_series()
    return [str(v) for v in ids[mask].tolist()[:limit]]


def parse_age(frame: pd.DataFrame) -> np.ndarray:
    """Float ages with NaN for blank; raises ``ValueError`` naming non-numeric rows."""
    raw = frame["age"]
    age = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    blank = raw.isna().to_numpy() | raw.astype(str).str.strip().eq("").to_numpy()
    bad = np.isnan(age) & ~blank
    if bad.any():
        raise ValueError(
            f"metadata column 'age' has {int(bad.sum())} non-numeric value(s) "
            f"{raw[bad].astype(str).tolist()[:5]} in rows {_row_ids(frame, bad)}; "
            "use a number of years or leave it blank"
        )
    neg = np.isfinite(age) & ((age < 0) | (age > 130))
    if neg.any():
        raise ValueError(
            f"metadata column 'age' has impossible value(s) {age[neg].tolist()[:5]} in rows "
            f"{_row_ids(frame, neg)}; ages must lie in [0, 130] or be blank"
        )
    return age


def parse_sex(frame: pd.DataFrame) -> np.ndarray:
    """``female`` / ``male`` / ``unknown`` per row (blank -> ``unknown``); any other value
    raises ``ValueError`` naming the rows."""
    sex = _clean_text(frame["sex"]).replace({"f": "female", "m": "male"})
    bad = ~sex.isin(SEX_CATEGORIES).to_numpy()
    if bad.any():
        raise ValueError(
            f"metadata column 'sex' has value(s) {sorted(set(sex[bad]))[:5]} in rows "
            f"{_row_ids(frame, bad)}; expected one of {list(SEX_CATEGORIES)} or blank"
        )
    return sex.to_numpy(dtype=object)


def parse_site(frame: pd.DataFrame) -> np.ndarray:
    """Lower-cased anatomical sites (blank -> ``unknown``)."""
    return _clean_text(frame["localization"]).to_numpy(dtype=object)


def _check_columns(frame: pd.DataFrame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(
            f"metadata must be a pandas DataFrame, got {type(frame).__name__}"
        )
    missing = [c for c in METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"metadata frame lacks column(s) {missing}; found {list(frame.columns)}. "
            "Join the split with image_index (age, sex, localization) first."
        )


@dataclass
class MetadataEncoder:
    """Age / sex / site encoder fitted on training rows (see the module docstring).

    Attributes:
        age_mean, age_std: training statistics of the known ages.
        sites: localization categories with their own column (``unknown`` and ``other``
            always included, last).
        min_site_count: a site needs this many training rows for a column of its own.
    """

    age_mean: float = 0.0
    age_std: float = 1.0
    sites: list[str] = field(default_factory=lambda: [UNKNOWN_SITE, OTHER_SITE])
    min_site_count: int = 1
    sex_categories: list[str] = field(default_factory=lambda: list(SEX_CATEGORIES))

    # ------------------------------------------------------------------ fit / transform
    @classmethod
    def fit(cls, train: pd.DataFrame, min_site_count: int = 10) -> MetadataEncoder:
        """Fit on the **training** rows: age mean/std over known ages, site vocabulary of
        sites with at least ``min_site_count`` rows."""
        _check_columns(train)
        if len(train) == 0:
            raise ValueError("cannot fit a metadata encoder on zero training rows")
        if int(min_site_count) < 1:
            raise ValueError(f"min_site_count must be >= 1, got {min_site_count}")
        age = parse_age(train)
        parse_sex(train)  # validates
        known = age[np.isfinite(age)]
        mean = float(known.mean()) if known.size else 0.0
        std = float(known.std()) if known.size > 1 else 1.0
        site_counts = pd.Series(parse_site(train)).value_counts()
        keep = sorted(
            s
            for s, n in site_counts.items()
            if n >= int(min_site_count) and s not in (UNKNOWN_SITE, OTHER_SITE)
        )
        return cls(
            age_mean=mean,
            age_std=std if std > 1e-6 else 1.0,
            sites=[*keep, UNKNOWN_SITE, OTHER_SITE],
            min_site_count=int(min_site_count),
        )

    @property
    def feature_names(self) -> list[str]:
        """Column names of :meth:`transform`'s output."""
        return (
            ["age_z", "age_missing"]
            + [f"sex_{s}" for s in self.sex_categories]
            + [f"site_{s}" for s in self.sites]
        )

    @property
    def dim(self) -> int:
        """Length of the encoded vector."""
        return len(self.feature_names)

    def site_bucket(self, sites: Sequence[str]) -> np.ndarray:
        """Map cleaned sites to the encoder's categories (rare / unseen -> ``other``)."""
        known = set(self.sites)
        return np.array([s if s in known else OTHER_SITE for s in sites], dtype=object)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """``(n, dim)`` float32 features for the rows of ``frame`` (columns ``age``, ``sex``,
        ``localization``). Raises ``ValueError`` naming rows with impossible values."""
        _check_columns(frame)
        n = len(frame)
        age = parse_age(frame)
        sex = parse_sex(frame)
        site = self.site_bucket(parse_site(frame))
        out = np.zeros((n, self.dim), dtype=np.float32)
        missing = ~np.isfinite(age)
        out[:, 0] = np.where(missing, 0.0, (age - self.age_mean) / self.age_std)
        out[:, 1] = missing.astype(np.float32)
        sex_index = {s: 2 + i for i, s in enumerate(self.sex_categories)}
        site_index = {
            s: 2 + len(self.sex_categories) + i for i, s in enumerate(self.sites)
        }
        rows = np.arange(n)
        out[rows, [sex_index[s] for s in sex]] = 1.0
        out[rows, [site_index[s] for s in site]] = 1.0
        return out

    def transform_one(
        self,
        age: float | None = None,
        sex: str | None = None,
        localization: str | None = None,
    ) -> np.ndarray:
        """``(1, dim)`` features for one patient (``None`` = unknown), e.g. an API request."""
        return self.transform(
            pd.DataFrame(
                {"age": [age], "sex": [sex], "localization": [localization]},
                dtype=object,
            )
        )

    def field_slices(self) -> dict[str, slice]:
        """Columns of each field in :meth:`transform`'s output."""
        n_sex = len(self.sex_categories)
        return {
            "age": slice(0, 2),
            "sex": slice(2, 2 + n_sex),
            "localization": slice(2 + n_sex, self.dim),
        }

    def unknown_vector(self) -> np.ndarray:
        """``(dim,)`` encoding of a patient whose age, sex and site are all unknown."""
        return self.transform_one()[0]

    def mask_fields(self, x, p: float, generator=None):
        """Training-time field masking: each field (age, sex, site) of each row of the
        encoded ``x`` (a torch tensor ``(n, dim)``) is replaced, with probability ``p`` and
        independently, by its ``unknown`` encoding. A model trained so has seen every mix
        of known and unknown fields, including none known (the usual external picture)."""
        import torch

        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"field masking probability must be in [0, 1], got {p}")
        if p == 0:
            return x
        unknown = torch.as_tensor(self.unknown_vector(), dtype=x.dtype, device=x.device)
        out = x.clone()
        for sl in self.field_slices().values():
            hit = torch.rand(len(x), 1, generator=generator).to(x.device) < p
            out[:, sl] = torch.where(hit, unknown[sl], out[:, sl])
        return out

    def missing_summary(self, frame: pd.DataFrame) -> dict[str, int]:
        """How many rows of ``frame`` have a blank age, unknown sex, unknown site, or a site
        that falls into the ``other`` bucket."""
        _check_columns(frame)
        site = parse_site(frame)
        bucket = self.site_bucket(site)
        return {
            "rows": int(len(frame)),
            "age_missing": int((~np.isfinite(parse_age(frame))).sum()),
            "sex_unknown": int((parse_sex(frame) == "unknown").sum()),
            "site_unknown": int((bucket == UNKNOWN_SITE).sum()),
            "site_other": int((bucket == OTHER_SITE).sum()),
        }

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form stored in the checkpoint meta as ``metadata_encoder``."""
        return {
            "version": ENCODER_VERSION,
            "columns": list(METADATA_COLUMNS),
            "age_mean": float(self.age_mean),
            "age_std": float(self.age_std),
            "sex_categories": list(self.sex_categories),
            "sites": list(self.sites),
            "min_site_count": int(self.min_site_count),
            "feature_names": self.feature_names,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetadataEncoder:
        """Rebuild from :meth:`to_dict`; raises naming a missing key or a bad version."""
        if not isinstance(data, Mapping):
            raise TypeError(
                f"metadata_encoder must be a dict, got {type(data).__name__}"
            )
        for key in ("age_mean", "age_std", "sites"):
            if key not in data:
                raise ValueError(f"metadata_encoder lacks the key {key!r}")
        version = int(data.get("version", ENCODER_VERSION))
        if version != ENCODER_VERSION:
            raise ValueError(
                f"metadata_encoder version {version} is not supported (this code reads "
                f"version {ENCODER_VERSION})"
            )
        enc = cls(
            age_mean=float(data["age_mean"]),
            age_std=float(data["age_std"]),
            sites=[str(s) for s in data["sites"]],
            min_site_count=int(data.get("min_site_count", 1)),
            sex_categories=[str(s) for s in data.get("sex_categories", SEX_CATEGORIES)],
        )
        for s in (UNKNOWN_SITE, OTHER_SITE):
            if s not in enc.sites:
                raise ValueError(f"metadata_encoder sites lack the {s!r} bucket")
        names = data.get("feature_names")
        if names is not None and list(names) != enc.feature_names:
            raise ValueError(
                "metadata_encoder feature_names do not match its categories: "
                f"{list(names)} vs {enc.feature_names}"
            )
        return enc


def with_metadata(rows: pd.DataFrame, image_index: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (e.g. the split assignment) with ``age, sex, localization`` joined from
    ``image_index`` by ``image_id``; raises naming image ids absent from the index."""
    cols = [c for c in METADATA_COLUMNS if c not in rows.columns]
    if not cols:
        return rows
    missing_cols = [c for c in cols if c not in image_index.columns]
    if missing_cols:
        raise ValueError(f"image_index lacks metadata column(s) {missing_cols}")
    meta = image_index.drop_duplicates("image_id").set_index("image_id")[cols]
    absent = ~rows["image_id"].isin(meta.index)
    if absent.any():
        raise ValueError(
            f"{int(absent.sum())} image(s) are not in image_index, so their metadata is "
            f"unknown (first: {rows.loc[absent, 'image_id'].tolist()[:5]})"
        )
    joined = meta.reindex(rows["image_id"]).reset_index(drop=True)
    out = rows.reset_index(drop=True).copy()
    for c in cols:
        out[c] = joined[c].to_numpy()
    return out


def metadata_inputs(
    meta: Mapping[str, Any], rows: pd.DataFrame, image_index: pd.DataFrame | None = None
) -> np.ndarray | None:
    """The ``extra_inputs`` to pass to ``predict_proba`` for a checkpoint ``meta``:
    ``None`` for an image-only model, else the encoded metadata of ``rows`` (joined from
    ``image_index`` by ``image_id`` when ``rows`` lack ``age, sex, localization``) with
    the encoder stored in ``meta["metadata_encoder"]``."""
    if not meta.get("uses_metadata"):
        return None
    if not meta.get("metadata_encoder"):
        raise ValueError(
            f"checkpoint of {meta.get('arch')} uses metadata but its meta has no "
            "metadata_encoder"
        )
    enc = MetadataEncoder.from_dict(meta["metadata_encoder"])
    if any(c not in rows.columns for c in METADATA_COLUMNS):
        if image_index is None:
            raise ValueError(
                "this model fuses patient metadata: give rows with age, sex, localization "
                "or the image_index to join them from"
            )
        rows = with_metadata(rows, image_index)
    x = enc.transform(rows)
    if "metadata_dim" in (meta.get("model_kwargs") or {}) and x.shape[1] != int(
        meta["model_kwargs"]["metadata_dim"]
    ):
        raise ValueError(
            f"metadata encoder gives {x.shape[1]} features but the model takes "
            f"{meta['model_kwargs']['metadata_dim']}"
        )
    return x
