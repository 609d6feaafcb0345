"""Site tables (CSV or Parquet) read by pyarrow and matched to the job's schema by name.

Every site's file is matched to ``dataset.features`` by column *name*: column order does
not matter, and the feature matrix is always built in ``dataset.features`` order (a
declared categorical column is replaced, in place, by its one-hot columns in the order of
its declared vocabulary). What a file must hold, and every error, is one line naming the
file and the option that fixes it (docs/data.md).

Two reads, two costs:

- :func:`table_columns` reads only a file's header (CSV: its first row; Parquet: its
  schema), never a value: the driver runs it on every site's file before Ray starts when
  the files are local (embedded Ray), so a wrong or missing column fails in a second.
- :func:`read_table` reads the values, inside the site's own process (its client actor,
  or the set-up task placed at the site), checks types, missing cells and categories, and
  returns ``(x, y)``. Nothing it reads leaves the site.

Row numbers in errors: for CSV, the header is row 1 and the first data row is row 2
(blank lines are counted, as a text editor would, unless a quoted cell spans lines); for
Parquet, the first data row is row 1.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedray.errors import DataError

log = logging.getLogger("fedray")

PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_LABEL_HINT = "; labels must be integer class ids 0..K-1 (map text labels to ids first)"

# Files whose ignored columns were already reported by this process (reported once each).
_ANNOUNCED: set[tuple[str, tuple[str, ...]]] = set()


def is_parquet(path: str) -> bool:
    """Parquet by suffix (``.parquet``, ``.pq``); any other file is read as CSV."""
    return str(path).lower().endswith(PARQUET_SUFFIXES)


@dataclass(frozen=True)
class TableSpec:
    """What each site's table must hold: the label, the features (in the job's order),
    the declared categories, and what to do with missing cells and extra columns.

    ``features=None``: every column of the file but the label, in the file's order (only
    for reading one file on its own, e.g. :func:`fedray.data.datasets.read_csv`; a job
    resolves its features once, see :func:`resolve_features`).
    """

    label: str
    features: tuple[str, ...] | None = None
    categorical: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    missing: str = "error"
    extra_columns: str = "ignore"

    @classmethod
    def from_config(cls, cfg: Any) -> TableSpec:
        """The spec a :class:`~fedray.config.DatasetConfig` describes."""
        return cls(
            label=cfg.label,
            features=tuple(cfg.features) if cfg.features is not None else None,
            categorical={k: tuple(v) for k, v in (cfg.categorical or {}).items()},
            missing=cfg.missing,
            extra_columns=cfg.extra_columns,
        )

    def width(self, features: Sequence[str]) -> int:
        """Columns of the feature matrix: one per numeric feature, one per category."""
        return sum(len(self.categorical.get(f, ())) or 1 for f in features)

    def matrix_columns(self, features: Sequence[str]) -> list[str]:
        """Names of the feature matrix's columns (``col=value`` for one-hot columns)."""
        out: list[str] = []
        for f in features:
            vocab = self.categorical.get(f)
            out.extend([f"{f}={v}" for v in vocab] if vocab else [f])
        return out


# ---------------------------------------------------------------------------- headers


def table_columns(path: str) -> list[str]:
    """A file's column names, from its header alone (no value is read)."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    if is_parquet(path):
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # pyarrow's ArrowInvalid / OSError: one line
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
        return [str(n).strip() for n in names]
    with open(path, newline="", encoding="utf-8-sig") as fh:
        try:
            header = next(csv.reader(fh))
        except StopIteration:
            raise DataError(f"{path}: the file is empty (expected a header row)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: the header row cannot be read ({exc})") from None
    return [h.strip() for h in header]


def _listed(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_columns(
    path: str, columns: Sequence[str], spec: TableSpec, *, labelled: bool = True
) -> list[str]:
    """Check a file's columns against the spec by name; return its feature names.

    Missing label or feature columns, a repeated column name, and (under
    ``dataset.extra_columns=error``) extra columns are one DataError line naming the file,
    what is missing and what the file has. Ignored extra columns are logged once per file.
    """
    has = ", ".join(columns) if columns else "(none)"
    seen: set[str] = set()
    for c in columns:
        if c in seen:
            raise DataError(f"{path}: column {c!r} appears twice in the header; columns are: {has}")
        seen.add(c)
    if labelled and spec.label not in seen:
        raise DataError(
            f"{path}: no label column {spec.label!r} (dataset.label); columns are: {has}"
        )
    features = (
        list(spec.features)
        if spec.features is not None
        else [c for c in columns if c != spec.label]
    )
    missing = [f for f in features if f not in seen]
    if missing:
        raise DataError(
            f"{path}: missing feature column(s) {_listed(missing)} (dataset.features); "
            f"columns are: {has}"
        )
    if not features:
        raise DataError(f"{path}: no feature columns besides the label {spec.label!r}")
    wanted = {*features, spec.label}
    extra = [c for c in columns if c not in wanted]
    if extra and spec.extra_columns == "error":
        raise DataError(
            f"{path}: extra column(s) {_listed(extra)} not in dataset.features; drop them from "
            "the file, add them to dataset.features, or set dataset.extra_columns=ignore"
        )
    if extra and (path, tuple(extra)) not in _ANNOUNCED:
        _ANNOUNCED.add((path, tuple(extra)))
        log.info("%s: ignoring column(s) not in dataset.features: %s", path, _listed(extra))
    return features


def resolve_features(spec: TableSpec, path: str, columns: Sequence[str]) -> list[str]:
    """The job's features: ``dataset.features``, else client 0's columns but the label
    (logged once, so the user sees what every other site will be matched against)."""
    if spec.features is not None:
        return list(spec.features)
    features = check_columns(path, columns, spec)
    undeclared = [c for c in spec.categorical if c not in features]
    if undeclared:
        raise DataError(
            f"{path}: dataset.categorical names column(s) {_listed(undeclared)} that client "
            f"0's file does not have as features; columns are: {', '.join(columns)}"
        )
    log.info("features (from client 0's file): %s", ", ".join(features))
    return features


# ----------------------------------------------------------------------------- values


def read_table(path: str, spec: TableSpec, *, labelled: bool = True) -> tuple[np.ndarray, Any]:
    """Read a site's table: ``(x float32 [rows, width], y int64 [rows])``.

    Features in ``spec.features`` order whatever the file's column order; extra columns
    are never converted. Errors name the file, row, column, value and the fixing option.
    ``labelled=False``: the file need not have the label column, and ``y`` is None (new
    rows to predict, :mod:`fedray.predict`).
    """
    columns = table_columns(path)
    features = check_columns(path, columns, spec, labelled=labelled)
    wanted = [*features, spec.label] if labelled else list(features)
    categorical = {f: spec.categorical[f] for f in features if f in spec.categorical}
    table = (
        _read_parquet(path, columns, wanted)
        if is_parquet(path)
        else _read_csv(path, columns, wanted, categorical, spec.label)
    )
    rows = table.num_rows
    if rows == 0:
        raise DataError(f"{path}: no data rows after the header")
    values: dict[str, np.ndarray] = {}  # numeric columns, float64 with NaN where missing
    codes: dict[str, np.ndarray] = {}  # categorical columns: index in the vocabulary, -1 missing
    for name in wanted:
        if name in categorical:
            codes[name] = _category_codes(path, table, name, categorical[name])
        else:
            values[name] = _numbers(path, table, name, is_label=name == spec.label)
    missing = np.zeros(rows, dtype=bool)
    for name in wanted:
        missing |= codes[name] < 0 if name in codes else np.isnan(values[name])
    if missing.any() and spec.missing == "impute_mean":
        # Feature cells stay empty (NaN), filled with the federation-wide mean once it is
        # opened (fedray.data.datasets.FeatureScaling); a label cannot be imputed.
        no_label = np.isnan(values[spec.label]) if labelled else np.zeros(rows, dtype=bool)
        if no_label.any():
            raise DataError(
                f"{path}: {_row(path, int(np.argmax(no_label)))}, label column "
                f"{spec.label!r} is empty; dataset.missing=impute_mean fills feature cells "
                "only: fill in the label, or set dataset.missing=drop_rows"
            )
        missing[:] = False
    if missing.any():
        first = int(np.argmax(missing))
        if spec.missing != "drop_rows":
            col = next(
                n
                for n in wanted
                if (codes[n][first] < 0 if n in codes else np.isnan(values[n][first]))
            )
            raise DataError(
                f"{path}: {_row(path, first)}, column {col!r} is empty (a missing value); "
                "set dataset.missing=drop_rows to drop the rows with a missing cell, or "
                "impute_mean to fill them with the federation-wide mean"
            )
        keep = ~missing
        log.info(
            "%s: dropped %d of %d rows with a missing cell (dataset.missing=drop_rows)",
            path,
            int(missing.sum()),
            rows,
        )
        if not keep.any():
            raise DataError(f"{path}: every row has a missing cell (dataset.missing=drop_rows)")
        values = {k: v[keep] for k, v in values.items()}
        codes = {k: v[keep] for k, v in codes.items()}
        rows = int(keep.sum())
    else:
        keep = None
    for name, v in values.items():
        bad = np.isinf(v)
        if bad.any():
            i = _original_index(keep, int(np.argmax(bad)))
            raise DataError(f"{path}: {_row(path, i)}, column {name!r}: {v[bad][0]} is not finite")
    y = values.pop(spec.label) if labelled else None
    if y is None:
        return _matrix(features, categorical, values, codes, rows, spec), None
    whole = (y == np.floor(y)) & (y >= 0)
    if not whole.all():
        i = int(np.argmin(whole))
        raise DataError(
            f"{path}: {_row(path, _original_index(keep, i))}: label {_cell(y[i])} must be an "
            "integer class id >= 0"
        )
    return _matrix(features, categorical, values, codes, rows, spec), y.astype(np.int64)


def _matrix(features, categorical, values, codes, rows: int, spec: TableSpec) -> np.ndarray:
    """The float32 feature matrix: numeric columns as they are, categories one-hot."""
    x = np.empty((rows, spec.width(features)), dtype=np.float32)
    j = 0
    for name in features:
        if name in codes:
            k = len(categorical[name])
            x[:, j : j + k] = codes[name][:, None] == np.arange(k)[None, :]
            x[codes[name] < 0, j : j + k] = np.nan  # impute_mean: filled in later
            j += k
        else:
            x[:, j] = values[name]
            j += 1
    return x


def _read_csv(path, columns, wanted, categorical, label):
    """pyarrow's multithreaded CSV reader: numeric columns typed float64 (so a text cell
    is an error, never a silently inferred string), categories as text, and only the
    wanted columns converted. On any parse or conversion error the file is scanned again
    with Python's csv module to name the first bad row (the slow path, errors only)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    types = {c: pa.string() if c in categorical else pa.float64() for c in wanted}
    try:
        return pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=list(columns), skip_rows=1),
            convert_options=pcsv.ConvertOptions(
                include_columns=list(wanted), column_types=types, strings_can_be_null=True
            ),
        )
    except pa.ArrowInvalid as exc:
        _diagnose_csv(path, columns, [c for c in wanted if c not in categorical], label)
        raise DataError(f"{path}: cannot be read as CSV ({_first_line(exc)})") from None


def _null_markers() -> frozenset[str]:
    import pyarrow.csv as pcsv

    return frozenset(pcsv.ConvertOptions().null_values)


def _diagnose_csv(path, columns, numeric, label) -> None:
    """Name the first row that pyarrow refused: a row of the wrong length, or a cell of a
    numeric column that is not a number. Returns if it finds neither."""
    nulls = _null_markers()
    index = {c: i for i, c in enumerate(columns)}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(columns):
                raise DataError(
                    f"{path}: row {lineno} has {len(row)} cells, the header has {len(columns)}"
                )
            for name in numeric:
                cell = row[index[name]]
                if cell.strip() in nulls or cell in nulls or _is_number(cell):
                    continue
                raise DataError(_not_a_number(path, f"row {lineno}", name, cell, label))


def _is_number(cell: str) -> bool:
    if "_" in cell:  # Python's float() takes 1_000; pyarrow does not
        return False
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _not_a_number(path, row, name, cell, label) -> str:
    hint = (
        TEXT_LABEL_HINT
        if name == label
        else f"; declare it in dataset.categorical={{{name}: [values...]}} or drop it from "
        "dataset.features"
    )
    return f"{path}: {row}, column {name!r}: {cell!r} is not a number{hint}"


def _read_parquet(path, columns, wanted):
    import pyarrow.parquet as pq

    raw = dict(zip(columns, pq.read_schema(path).names, strict=True))
    try:
        table = pq.read_table(path, columns=[raw[c] for c in wanted])
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as Parquet ({_first_line(exc)})") from None
    return table.rename_columns(list(wanted))


def _numbers(path, table, name, *, is_label: bool) -> np.ndarray:
    """A numeric column as float64, NaN where the cell is missing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(name)
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):  # Parquet text: parse it
        try:
            col = pc.cast(pc.utf8_trim_whitespace(col), pa.float64())
        except pa.ArrowInvalid:
            cells = col.to_pylist()
            i = next(i for i, c in enumerate(cells) if c is not None and not _is_number(c))
            label = name if is_label else None
            raise DataError(_not_a_number(path, _row(path, i), name, cells[i], label)) from None
    elif pa.types.is_null(t):
        col = pa.chunked_array([pa.nulls(len(col), pa.float64())])
    elif not (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
    ):
        what = (
            "labels must be integer class ids"
            if is_label
            else (
                f"declare it in dataset.categorical={{{name}: [values...]}} or drop it from "
                "dataset.features"
            )
        )
        raise DataError(f"{path}: column {name!r} has type {t}, not a number; {what}")
    elif not pa.types.is_floating(t) or t != pa.float64():
        col = col.cast(pa.float64())
    return col.to_numpy().astype(np.float64, copy=False)


def _category_codes(path, table, name, vocab) -> np.ndarray:
    """A categorical column as indices into its declared vocabulary (-1: missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())  # Parquet integer codes: matched as text ("1", "2")
    col = pc.utf8_trim_whitespace(col)
    present = ~col.is_null().to_numpy()
    codes = pc.index_in(col, value_set=pa.array(list(vocab), pa.string()))
    codes = pc.fill_null(codes, -1).to_numpy().astype(np.int64)
    unknown = present & (codes < 0)
    if unknown.any():
        i = int(np.argmax(unknown))
        value = col[i].as_py()
        raise DataError(
            f"{path}: {_row(path, i)}, column {name!r}: {value!r} is not a declared category "
            f"(dataset.categorical.{name}: {', '.join(vocab)}); add it to the list or fix the cell"
        )
    return codes


# ------------------------------------------------------------------------------ rows


def _original_index(keep: np.ndarray | None, i: int) -> int:
    return i if keep is None else int(np.flatnonzero(keep)[i])


def _row(path: str, index: int) -> str:
    """'row N' of the ``index``-th data row as the file shows it (see the module doc)."""
    if is_parquet(path):
        return f"row {index + 1}"
    # pyarrow skips blank lines; count them back in (errors only: one pass over the file).
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        seen = -1
        for lineno, row in enumerate(reader, start=2):
            if row:
                seen += 1
                if seen == index:
                    return f"row {lineno}"
    return f"data row {index + 1}"


def _cell(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
