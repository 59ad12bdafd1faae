"""Hospital readmission data (Koh & Liang 2017, §5.3): the UCI diabetes file, or a generated twin.

The paper used ``diabetic_data.csv`` of the UCI "Diabetes 130-US hospitals for years 1999–2008"
data set (101,766 encounters, 50 columns; ``"?"`` marks a missing value). Its preprocessing, which
:func:`encode` repeats exactly, keeps 8 numeric columns as they are and one-hot encodes 31
categorical ones (gender, race, the ten 10-year age buckets, the discharge disposition, two lab
results, 23 drugs, change, diabetesMed), with one indicator per category found in the file
(categories sorted as pandas sorts them) and only the second indicator when a column has exactly
two categories: 127 features for the full file. The label is 1 for readmission within 30 days
(``readmitted == "<30"``) and 0 for ``">30"`` or ``"NO"``.

Nothing is downloaded: :func:`read_diabetic_csv` reads the file from a path the user gives, and
:func:`generate_readmission_table` builds a table with the same columns, categories and rough
marginals, whose readmission follows a known logistic model (children aged 0–10 are rarely
readmitted, as in the real file). :func:`write_diabetic_csv` writes either in the file's format.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

NUMERIC_COLUMNS = (
    "time_in_hospital", "num_lab_procedures", "num_procedures", "num_medications",
    "number_outpatient", "number_emergency", "number_inpatient", "number_diagnoses",
)
DRUG_COLUMNS = (
    "metformin", "repaglinide", "nateglinide", "chlorpropamide", "glimepiride", "acetohexamide",
    "glipizide", "glyburide", "tolbutamide", "pioglitazone", "rosiglitazone", "acarbose",
    "miglitol", "troglitazone", "tolazamide", "examide", "citoglipton", "insulin",
    "glyburide-metformin", "glipizide-metformin", "glimepiride-pioglitazone",
    "metformin-rosiglitazone", "metformin-pioglitazone",
)
CATEGORICAL_COLUMNS = (
    "gender", "race", "age", "discharge_disposition_id", "max_glu_serum", "A1Cresult",
    *DRUG_COLUMNS, "change", "diabetesMed",
)
LABEL_COLUMN = "readmitted"
READMITTED_VALUES = ("NO", "<30", ">30")
# Every column of diabetic_data.csv, in the file's order.
UCI_COLUMNS = (
    "encounter_id", "patient_nbr", "race", "gender", "age", "weight", "admission_type_id",
    "discharge_disposition_id", "admission_source_id", "time_in_hospital", "payer_code",
    "medical_specialty", "num_lab_procedures", "num_procedures", "num_medications",
    "number_outpatient", "number_emergency", "number_inpatient", "diag_1", "diag_2", "diag_3",
    "number_diagnoses", "max_glu_serum", "A1Cresult", *DRUG_COLUMNS, "change", "diabetesMed",
    LABEL_COLUMN,
)
AGE_BUCKETS = tuple(f"[{10 * k}-{10 * (k + 1)})" for k in range(10))
CHILD_FEATURE = "age_[0-10)"
_INTEGER_CATEGORIES = frozenset({"discharge_disposition_id"})


@dataclass
class ReadmissionTable:
    """Raw columns of diabetic_data.csv, as strings, one array of length n per column.

    Attributes:
        columns: column name → ``(n,)`` array of the file's text values.
        source: one line saying where the rows come from (shown in outputs).
    """

    columns: dict[str, np.ndarray]
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass
class EncodedReadmission:
    """The paper's design matrix.

    Attributes:
        X: ``(n, d)`` float64: 8 numeric columns, then the one-hot indicators.
        y: ``(n,)`` int64: 1 if readmitted within 30 days (``"<30"``), else 0.
        feature_names: ``d`` names, ``"time_in_hospital"``, ..., ``"age_[0-10)"``, ...
        source: where the rows come from.
    """

    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    source: str

    def feature_index(self, name: str) -> int:
        """Column of feature ``name``; a clear error lists similar names otherwise."""
        if name not in self.feature_names:
            prefix = name.split("_")[0]
            similar = [f for f in self.feature_names if f.startswith(prefix)][:12]
            raise InputError(f"No feature {name!r} in the encoded data (its rows have no such "
                             f"category). Features starting with {prefix!r}: {similar}.")
        return self.feature_names.index(name)


# ---------------------------------------------------------------------------------- reading


def read_diabetic_csv(path: str | Path) -> ReadmissionTable:
    """Read UCI ``diabetic_data.csv`` (or a CSV with its columns) as a :class:`ReadmissionTable`.

    Only the columns the paper uses must be present (extra columns are ignored). Raises
    ``FileNotFoundError`` for a missing file and :class:`~influencekit.errors.InputError`, naming
    the line and column, for a file that does not have the expected header or values.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; --data for sec53-domain-mismatch expects the file "
                         "diabetic_data.csv itself (e.g. --data data/diabetic_data.csv).")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. Expected diabetic_data.csv of the UCI "
                                "'Diabetes 130-US hospitals for years 1999–2008' data set.")
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as stream:
        reader = csv.reader(stream)
        numbered = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    lines = np.array([number for number, _ in numbered], dtype=np.int64)
    rows = [row for _, row in numbered]
    if not rows:
        raise InputError(f"{path} is empty; expected diabetic_data.csv with a header line "
                         f"({', '.join(UCI_COLUMNS[:6])}, ...) and one line per encounter.")
    header = [name.strip() for name in rows[0]]
    needed = (*NUMERIC_COLUMNS, *CATEGORICAL_COLUMNS, LABEL_COLUMN)
    missing = [name for name in needed if name not in header]
    if missing:
        raise InputError(
            f"{path} does not look like UCI diabetic_data.csv: its header lacks {missing[:8]}"
            f"{' and more' if len(missing) > 8 else ''} (it starts {header[:5]}). Expected the "
            f"columns of diabetic_data.csv ({', '.join(UCI_COLUMNS[:8])}, ..., readmitted); pass "
            "the original file, not IDs_mapping.csv or a re-exported copy with renamed columns.")
    if len(rows) < 2:
        raise InputError(f"{path} has a header but no data lines.")
    for number, row in zip(lines[1:], rows[1:], strict=True):
        if len(row) != len(header):
            raise InputError(f"{path}, line {number}: {len(row)} fields, but the header has "
                             f"{len(header)}. The file may be truncated or not comma-separated.")
    body = np.array(rows[1:], dtype=object)
    columns = {name: np.array([cell.strip() for cell in body[:, header.index(name)]], dtype=str)
               for name in header}
    table = ReadmissionTable(columns, f"UCI diabetic_data.csv from {path}")
    _check_values(table, str(path), lines[1:])
    return table


def _check_values(table: ReadmissionTable, where: str, lines: np.ndarray) -> None:
    """Numeric columns hold whole numbers; ``readmitted`` holds NO, <30 or >30.

    ``lines[i]`` is the file line of row i, named in the messages.
    """
    for name in NUMERIC_COLUMNS:
        values = table.columns[name]
        bad = ~np.char.isdigit(values)
        if bad.any():
            row = int(np.argmax(bad))
            raise InputError(
                f"{where}, line {lines[row]}, column {name!r}: expected a whole number ≥ 0, got "
                f"{str(values[row])!r}. The paper's numeric columns ({', '.join(NUMERIC_COLUMNS)}) "
                "have no missing values in the UCI file; fix or drop that line.")
    labels = table.columns[LABEL_COLUMN]
    bad = ~np.isin(labels, READMITTED_VALUES)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{where}, line {lines[row]}, column 'readmitted': expected one of "
                         f"{list(READMITTED_VALUES)}, got {str(labels[row])!r}.")


# ---------------------------------------------------------------------------------- encoding


def _categories(values: np.ndarray, integer: bool) -> list[str]:
    """Sorted distinct values, as pandas.Categorical sorts them (numerically for id columns)."""
    distinct = set(values.tolist())
    if integer and all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def encode(table: ReadmissionTable) -> EncodedReadmission:
    """The paper's encoding: numeric columns as they are, then one-hot categories.

    For each categorical column with categories c_1 < ... < c_k found in the rows: indicators
    ``name_c_1 ... name_c_k``, except that k = 2 keeps only ``name_c_2`` (pandas ``get_dummies``
    with ``drop_first`` for two categories, as in the authors' notebook). Label: ``"<30"`` → 1.
    """
    if len(table) == 0:
        raise InputError(f"{table.source}: no rows to encode.")
    blocks = [np.stack([table.columns[name].astype(np.float64) for name in NUMERIC_COLUMNS],
                       axis=1)]
    names = list(NUMERIC_COLUMNS)
    for column in CATEGORICAL_COLUMNS:
        values = table.columns[column]
        levels = _categories(values, column in _INTEGER_CATEGORIES)
        kept = levels[1:] if len(levels) == 2 else levels
        blocks.append(np.stack([(values == level).astype(np.float64) for level in kept], axis=1))
        names.extend(f"{column}_{level}" for level in kept)
    y = (table.columns[LABEL_COLUMN] == "<30").astype(np.int64)
    return EncodedReadmission(np.concatenate(blocks, axis=1), y, names, table.source)


# ---------------------------------------------------------------------------------- writing


def write_diabetic_csv(table: ReadmissionTable, path: str | Path) -> Path:
    """Write ``table`` as a CSV with the header and column order of diabetic_data.csv."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = [name for name in UCI_COLUMNS if name in table.columns]
    order += [name for name in table.columns if name not in UCI_COLUMNS]
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(order)
        writer.writerows(zip(*(table.columns[name] for name in order), strict=True))
    return path


# ---------------------------------------------------------------------------------- generating

# Marginals rounded from the UCI file; {value: share}.
_RACE = {"Caucasian": 0.748, "AfricanAmerican": 0.189, "?": 0.022, "Hispanic": 0.020,
         "Other": 0.015, "Asian": 0.006}
_GENDER = {"Female": 0.538, "Male": 0.462, "Unknown/Invalid": 0.00003}
_AGE = dict(zip(AGE_BUCKETS, (0.0016, 0.0068, 0.0163, 0.0371, 0.0952, 0.1696, 0.2209, 0.2562,
                              0.1690, 0.0273), strict=True))
_ADMISSION_TYPE = {"1": 0.531, "3": 0.186, "2": 0.182, "6": 0.052, "5": 0.047, "8": 0.0032,
                   "7": 0.0002, "4": 0.0001}
_DISCHARGE = {"1": 0.592, "3": 0.137, "6": 0.127, "18": 0.036, "2": 0.021, "22": 0.020,
              "11": 0.016, "5": 0.012, "25": 0.010, "4": 0.008, "7": 0.006, "23": 0.004,
              "13": 0.004, "14": 0.004, "28": 0.0014, "8": 0.0011, "15": 0.0006, "24": 0.0005,
              "9": 0.0002, "17": 0.0001, "16": 0.0001, "19": 0.0001, "10": 0.0001,
              "27": 0.0001, "12": 0.0001, "20": 0.0001}
_MAX_GLU = {"None": 0.947, "Norm": 0.026, ">200": 0.015, ">300": 0.012}
_A1C = {"None": 0.833, ">8": 0.081, "Norm": 0.049, ">7": 0.037}
_DRUG_SHARES = {  # share of "Steady", "Up", "Down" (the rest "No")
    "metformin": (0.180, 0.010, 0.006), "repaglinide": (0.014, 0.001, 0.0004),
    "nateglinide": (0.0066, 0.0002, 0.0001), "chlorpropamide": (0.0008, 0.0001, 0.00002),
    "glimepiride": (0.046, 0.003, 0.002), "acetohexamide": (0.00002, 0.0, 0.0),
    "glipizide": (0.112, 0.008, 0.006), "glyburide": (0.091, 0.008, 0.006),
    "tolbutamide": (0.0002, 0.0, 0.0), "pioglitazone": (0.069, 0.002, 0.001),
    "rosiglitazone": (0.060, 0.002, 0.001), "acarbose": (0.0029, 0.0001, 0.00003),
    "miglitol": (0.0003, 0.00002, 0.00005), "troglitazone": (0.00003, 0.0, 0.0),
    "tolazamide": (0.0004, 0.00001, 0.0), "examide": (0.0, 0.0, 0.0),
    "citoglipton": (0.0, 0.0, 0.0), "insulin": (0.303, 0.111, 0.120),
    "glyburide-metformin": (0.0068, 0.0001, 0.0001), "glipizide-metformin": (0.0001, 0.0, 0.0),
    "glimepiride-pioglitazone": (0.00001, 0.0, 0.0),
    "metformin-rosiglitazone": (0.00002, 0.0, 0.0),
    "metformin-pioglitazone": (0.00001, 0.0, 0.0),
}

# The generating model: logit P(readmitted < 30 days) = intercept + Σ effects.
_INTERCEPT = -3.40
_NUMERIC_EFFECTS = {"number_inpatient": 0.30, "number_emergency": 0.12, "number_outpatient": 0.05,
                    "number_diagnoses": 0.06, "time_in_hospital": 0.04, "num_medications": 0.008,
                    "num_lab_procedures": 0.002, "num_procedures": -0.03}
_CATEGORY_EFFECTS: dict[str, dict[str, float]] = {
    "age": dict(zip(AGE_BUCKETS, (-1.3, 0.1, 0.35, 0.05, 0.0, -0.05, 0.0, 0.08, 0.1, -0.05),
                    strict=True)),
    "discharge_disposition_id": {"2": 0.4, "3": 0.35, "4": 0.2, "5": 0.6, "6": 0.25, "7": 0.3,
                                 "11": -1.5, "13": -1.0, "14": -1.2, "15": 0.8, "18": 0.1,
                                 "22": 0.65, "23": 0.1, "28": 0.9},
    "A1Cresult": {">8": -0.15, ">7": -0.05, "Norm": -0.05},
    "max_glu_serum": {">300": 0.15, ">200": 0.05},
    "insulin": {"Up": 0.12, "Down": 0.15, "Steady": 0.02},
    "metformin": {"Steady": -0.12, "Up": -0.05},
    "diabetesMed": {"Yes": 0.15},
    "change": {"Ch": 0.05},
    "race": {"Asian": -0.2, "Hispanic": -0.1, "Other": -0.1, "?": -0.2},
    "gender": {"Male": -0.02},
}


def _draw(rng: np.random.Generator, shares: Mapping[str, float], n: int) -> np.ndarray:
    """n values drawn with the given shares, each value present at least once when n allows."""
    values = list(shares)
    p = np.array([shares[v] for v in values], dtype=np.float64)
    out = rng.choice(np.array(values), size=n, p=p / p.sum())
    present = set(np.unique(out).tolist())
    absent = [v for v, share in shares.items() if share > 0 and v not in present]
    if absent and n > 10 * len(values):
        out[rng.choice(n, size=len(absent), replace=False)] = absent
    return out


def _counts(rng: np.random.Generator, mean: np.ndarray | float, dispersion: float, low: int,
            high: int, n: int) -> np.ndarray:
    """Overdispersed counts (negative binomial with the given mean), clipped to [low, high]."""
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), (n,))
    lam = rng.gamma(dispersion, mean / dispersion)
    return np.clip(rng.poisson(lam), low, high)


def _numeric_columns(rng: np.random.Generator, age_index: np.ndarray) -> dict[str, np.ndarray]:
    """The 8 count columns; older patients have more diagnoses and medications."""
    n = len(age_index)
    older = age_index / 9.0
    return {
        "time_in_hospital": _counts(rng, 3.4 + 1.2 * older, 3.0, 1, 14, n),
        "num_lab_procedures": np.clip(np.round(rng.normal(43, 19.7, n)), 1, 132).astype(int),
        "num_procedures": _counts(rng, 1.34, 1.2, 0, 6, n),
        "num_medications": _counts(rng, 11 + 6 * older, 4.0, 1, 81, n),
        "number_outpatient": _counts(rng, 0.37, 0.15, 0, 42, n),
        "number_emergency": _counts(rng, 0.20, 0.12, 0, 76, n),
        "number_inpatient": _counts(rng, 0.64, 0.5, 0, 21, n),
        "number_diagnoses": np.clip(_counts(rng, 3.5 + 5 * older, 8.0, 1, 16, n), 1, 16),
    }


def _readmission_logit(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """intercept + Σ numeric effect·value + Σ category effects (the generating model)."""
    n = len(columns["age"])
    logit = np.full(n, _INTERCEPT)
    for name, effect in _NUMERIC_EFFECTS.items():
        logit += effect * columns[name].astype(np.float64)
    for column, effects in _CATEGORY_EFFECTS.items():
        for value, effect in effects.items():
            logit += effect * (columns[column] == value)
    return logit


def _uniforms_with_readmitted_children(rng: np.random.Generator, p30: np.ndarray,
                                       child: np.ndarray, minimum: int) -> np.ndarray:
    """Uniforms u (readmitted within 30 days iff u < p30), redrawn for the children until at
    least ``minimum`` of them are readmitted (at most a tenth of the children).

    Rejection sampling: the children's outcomes keep the model's probabilities, conditioned on
    that event, so that a table of any seed can host the paper's domain mismatch.
    """
    u = rng.random(len(p30))
    minimum = min(minimum, int(child.sum()) // 10)
    for _ in range(10_000):
        if int((u[child] < p30[child]).sum()) >= minimum:
            return u
        u[child] = rng.random(int(child.sum()))
    raise RuntimeError(f"could not draw {minimum} readmitted children; raise child_share.")


def _admission_columns(rng: np.random.Generator, n: int,
                       ages: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Identifiers, demographics, admission and discharge, diagnoses (ICD-9 codes)."""
    columns = {
        "encounter_id": np.sort(rng.choice(450_000_000, size=n, replace=False)).astype(str),
        "patient_nbr": rng.integers(100, 190_000_000, size=n).astype(str),
        "race": _draw(rng, _RACE, n),
        "gender": _draw(rng, _GENDER, n),
        "age": _draw(rng, ages, n),
        "weight": np.where(rng.random(n) < 0.97, "?", "[75-100)"),
        "admission_type_id": _draw(rng, _ADMISSION_TYPE, n),
        "discharge_disposition_id": _draw(rng, _DISCHARGE, n),
        "admission_source_id": _draw(rng, {"7": .565, "1": .29, "17": .067, "4": .031,
                                           "6": .023, "2": .024}, n),
        "payer_code": _draw(rng, {"?": .40, "MC": .32, "HM": .06, "SP": .05, "BC": .05,
                                  "MD": .12}, n),
        "medical_specialty": _draw(rng, {"?": .49, "InternalMedicine": .144,
                                         "Emergency/Trauma": .074,
                                         "Family/GeneralPractice": .073, "Cardiology": .219}, n),
    }
    for name in ("diag_1", "diag_2", "diag_3"):
        columns[name] = _draw(rng, {"250.83": .1, "428": .2, "414": .2, "786": .15, "V57": .05,
                                    "276": .29, "?": .01}, n)
    return columns


def _medication_columns(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Lab results, the 23 drugs (No/Steady/Up/Down), change and diabetesMed (consistent)."""
    columns = {"max_glu_serum": _draw(rng, _MAX_GLU, n), "A1Cresult": _draw(rng, _A1C, n)}
    on_drug = np.zeros(n, dtype=bool)
    changed = np.zeros(n, dtype=bool)
    for drug, (steady, up, down) in _DRUG_SHARES.items():
        columns[drug] = _draw(rng, {"No": 1.0 - steady - up - down, "Steady": steady, "Up": up,
                                    "Down": down}, n)
        on_drug |= columns[drug] != "No"
        changed |= np.isin(columns[drug], ("Up", "Down"))
    columns["change"] = np.where(changed | (rng.random(n) < 0.2), "Ch", "No")
    columns["diabetesMed"] = np.where(on_drug, "Yes", "No")
    return columns


def generate_readmission_table(n_rows: int = 101_766, seed: int = 0,
                               child_share: float = 0.0016,
                               min_readmitted_children: int = 4) -> ReadmissionTable:
    """A table with the columns and categories of diabetic_data.csv and a known readmission model.

    Marginals follow the UCI file (``child_share`` = 0.16% children aged 0–10, about 11%
    readmitted within 30 days; a smaller table may raise ``child_share`` to keep some children);
    counts depend on age; ``readmitted`` is ``"<30"`` with probability σ(logit) of a fixed
    logistic model in the encoded features (strongest: prior inpatient visits, discharge to a
    hospice or death, and age 0–10, which makes readmission rare), else ``">30"`` or ``"NO"``.
    Every category of the real file appears at least once when ``n_rows`` allows, and at
    least ``min_readmitted_children`` children are readmitted (the real file has about 4) when
    there are ten times as many children.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be ≥ 1, got {n_rows}.")
    if not 0.0 <= child_share < 1.0:
        raise ValueError(f"child_share must lie in [0, 1), got {child_share}.")
    rng = np.random.default_rng(seed)
    ages = dict(_AGE)
    ages[AGE_BUCKETS[0]] = child_share * (1.0 - _AGE[AGE_BUCKETS[0]]) / (1.0 - child_share)
    columns = _admission_columns(rng, n_rows, ages)
    bucket = {label: k for k, label in enumerate(AGE_BUCKETS)}
    age_index = np.array([bucket[label] for label in columns["age"]])
    columns.update({k: v.astype(str) for k, v in _numeric_columns(rng, age_index).items()})
    columns.update(_medication_columns(rng, n_rows))
    p30 = 1.0 / (1.0 + np.exp(-_readmission_logit(columns)))
    u = _uniforms_with_readmitted_children(rng, p30, columns["age"] == AGE_BUCKETS[0],
                                           min_readmitted_children)
    columns["readmitted"] = np.where(u < p30, "<30", np.where(u < p30 + 0.39 * (1 - p30), ">30",
                                                              "NO"))
    ordered = {name: columns[name] for name in UCI_COLUMNS}
    return ReadmissionTable(ordered, f"generated UCI-style readmission table ({n_rows:,} "
                                     f"encounters, seed {seed})")
