"""Statistical disclosure control on tabular outputs (dcr_enclave.runtime.disclosure), its grant claim and
its receipt field. Pure functions over files in a temporary directory: no enclave host, no account."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from receipt_factory import make_manifest

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.grant import DisclosureRules, GrantedDataset, sealing_key, verify_grant
from dcr_enclave.formats.jwk import public_jwk, thumbprint
from dcr_enclave.formats.receipt import DISCLOSURE_KINDS, ReceiptManifest
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.pack.grant_issuer import build_grant, issue_grant
from dcr_enclave.pack.signing_keys import generate_key
from dcr_enclave.runtime import disclosure as sdc
from dcr_enclave.runtime.disclosure import DisclosureCheck, check_outputs
from dcr_enclave.runtime.outputs import OutputCheck
from dcr_enclave.runtime.supervisor import decide

FREQ, RECOVER, DOMINATED, EXTREMES, TOO_LARGE, UNREADABLE = DISCLOSURE_KINDS
DEFAULT = DisclosureRules()


def run(tmp_path: Path, files: dict[str, str | bytes], rules: DisclosureRules = DEFAULT) -> DisclosureCheck:
    root = tmp_path / "outputs"
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return check_outputs(root, rules)


def kinds(tmp_path: Path, text: str, name: str = "t.csv", rules: DisclosureRules = DEFAULT) -> list[str]:
    return run(tmp_path, {name: text}, rules).kinds


# -- rule 1: minimum cell count --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header", ["count", "n", "freq", "Frequency", "cases", "number", "n_patients", "size"]
)
def test_a_named_count_column_below_the_minimum_is_a_finding(tmp_path: Path, header: str) -> None:
    """A column named by a count word with a count 0 < n < 10 is reported; the same column with every
    count at or above the minimum (or zero) is not."""
    assert kinds(tmp_path, f"region,{header}\nnorth,4\nsouth,250\n") == [FREQ]
    assert kinds(tmp_path, f"region,{header}\nnorth,10\nsouth,250\neast,0\n") == []


def test_the_minimum_comes_from_the_grant(tmp_path: Path) -> None:
    """A count of 12 passes the default minimum of 10 but not a grant's 20; a count of 4 passes a grant's 3."""
    table = "region,count\nnorth,12\nsouth,4\n"
    assert kinds(tmp_path, "region,count\nnorth,12\n") == []
    assert kinds(tmp_path, "region,count\nnorth,12\n", rules=DisclosureRules(min_cell_count=20)) == [FREQ]
    assert kinds(tmp_path, table, rules=DisclosureRules(min_cell_count=3, dominance_min_contributors=1)) == []


def test_a_cross_tabulation_is_recognised_by_shape(tmp_path: Path) -> None:
    """Labels, then only non-negative integers: every cell is a count, whatever the headers say (pandas'
    crosstab, value_counts, groupby().size() with a column named 0), integers written as floats too."""
    assert kinds(tmp_path, "sex,no,yes\nfemale,547,115\nmale,517,3\n") == [FREQ]
    assert kinds(tmp_path, "sex,no,yes\nfemale,547.0,115.0\nmale,517.0,3.0\n") == [FREQ]
    assert kinds(tmp_path, "region,0\nnortheast,324\nsouthwest,2\n") == [FREQ]
    assert kinds(tmp_path, "sex,no,yes\nfemale,547,115\nmale,517,159\n") == []


def test_a_table_of_measurements_is_not_a_frequency_table(tmp_path: Path) -> None:
    """Means and other non-integers are not counts: no finding."""
    assert kinds(tmp_path, "smoker,charges\nno,8434.27\nyes,32050.23\n") == []
    assert kinds(tmp_path, "region,label\nnorth,a\nsouth,b\n") == []


def test_a_describe_count_row_is_checked(tmp_path: Path) -> None:
    """``describe()`` of a small group: the count row (a row labelled ``count``) is below the minimum."""
    text = ",age,bmi\ncount,6.0,6.0\nmean,39.2,30.6\nstd,14.0,6.1\n"
    assert kinds(tmp_path, text) == [FREQ]


# -- rule 2: suppression and margins ---------------------------------------------------------------------


@pytest.mark.parametrize("marker", ["", "*", "c", "[c]", "<5", "< 10", "<=3", "suppressed", "x", "..", "-"])
def test_suppressed_cells_pass_the_minimum(tmp_path: Path, marker: str) -> None:
    """A cell holding a suppression marker is not a small count (and the table is still a frequency table)."""
    assert sdc.is_suppressed(marker)
    assert kinds(tmp_path, f"sex,no,yes\nfemale,547,115\nmale,517,{marker}\n") == []


def test_one_suppressed_cell_beside_a_total_column_is_recoverable(tmp_path: Path) -> None:
    """A row with a margin column and exactly one suppressed cell gives it away by subtraction."""
    assert kinds(tmp_path, "sex,no,yes,Total\nfemale,547,*,662\nmale,517,159,676\n") == [RECOVER]
    # Two suppressed cells in the row, and none alone in its column: not recoverable at this level.
    assert kinds(tmp_path, "sex,a,b,c,Total\nfemale,547,*,*,700\nmale,517,159,*,*\n") == []


def test_pandas_all_margins_are_recognised(tmp_path: Path) -> None:
    """``pd.crosstab(..., margins=True)`` writes ``All`` as a column and as a row (and an index-name
    row): a lone suppressed cell in a column is recovered from the ``All`` row."""
    text = "smoker,no,yes,All\nsex,,,\nfemale,547,115,662\nmale,[c],159,676\nAll,1064,274,1338\n"
    check = run(tmp_path, {"x.csv": text})
    assert check.kinds == [RECOVER]
    assert {(d["row"], d["column"], d["value"]) for d in check.details} == {(4, "no", "[c]")}


def test_a_margin_row_in_a_single_count_column(tmp_path: Path) -> None:
    """A frequency table with one suppressed count and a total row."""
    text = "region,count\nnorth,120\nsouth,*\neast,300\ntotal,425\n"
    assert kinds(tmp_path, text) == [RECOVER]
    assert kinds(tmp_path, text.replace("total,425", "west,400")) == []


# -- rule 3: dominance -----------------------------------------------------------------------------------


def test_a_magnitude_row_with_few_contributors_is_dominated(tmp_path: Path) -> None:
    """A mean beside a count of 2: the mean describes two records. Below the minimum count too."""
    text = "group,count,mean\na,2,5021.5\nb,150,6100.2\n"
    assert kinds(tmp_path, text) == [FREQ, DOMINATED]
    rules = DisclosureRules(min_cell_count=1, dominance_min_contributors=3)
    assert kinds(tmp_path, text, rules=rules) == [DOMINATED]
    assert kinds(tmp_path, text, rules=DisclosureRules(min_cell_count=1, dominance_min_contributors=2)) == []


def test_pandas_multi_index_aggregates_are_read(tmp_path: Path) -> None:
    """``groupby().agg(['count', 'mean'])`` over two columns writes two header rows and an index-name row."""
    text = (
        ",charges,charges,bmi,bmi\n,count,mean,count,mean\nsmoker,,,,\n"
        "no,1064,8434.27,1064,30.65\nyes,1,32050.23,1,30.7\n"
    )
    check = run(tmp_path, {"agg.csv": text})
    assert check.kinds == [FREQ, DOMINATED]
    assert {d["column"] for d in check.details} == {"charges count", "bmi count"}


# -- rule 4: extremes ------------------------------------------------------------------------------------


def test_min_and_max_columns_and_describe_rows_are_extremes(tmp_path: Path) -> None:
    """Columns named min/max and ``describe()``'s min/max rows expose single records' values, unless the
    grant allows extremes."""
    agg = "smoker,count,mean,min,max\nno,1064,8434.27,1121.87,36910.6\n"
    desc = ",age,bmi\ncount,1338.0,1338.0\nmean,39.2,30.6\nmin,18.0,15.96\n25%,27.0,26.3\nmax,64.0,53.13\n"
    assert kinds(tmp_path, agg) == [EXTREMES]
    assert kinds(tmp_path, desc) == [EXTREMES]
    assert kinds(tmp_path, "g,charges_max\na,3.5\n") == [EXTREMES]
    allow = DisclosureRules(allow_extremes=True)
    assert kinds(tmp_path, agg, rules=allow) == []
    assert kinds(tmp_path, desc, rules=allow) == []
    assert kinds(tmp_path, "g,admin\na,3.5\n") == []  # a word containing "min" is not "min"


# -- which files, delimiters -----------------------------------------------------------------------------


def test_tsv_and_semicolon_tables_are_checked_and_other_files_are_not(tmp_path: Path) -> None:
    """``.tsv`` and ``.tab`` are tab-separated; a ``.csv`` whose first line holds ``;`` is also read with
    ``;``; JSON, text and the notebook are left to review."""
    assert kinds(tmp_path, "region\tcount\nnorth\t3\n", name="a.TSV") == [FREQ]
    assert kinds(tmp_path, "region\tcount\nnorth\t3\n", name="a.tab") == [FREQ]
    assert kinds(tmp_path, "region;count\nnorth;3\n", name="b.csv") == [FREQ]
    assert run(tmp_path / "o", {"c.txt": "region,count\nnorth,3\n", "d.json": "{}"}).kinds == []


def test_tables_in_subfolders_are_found(tmp_path: Path) -> None:
    assert run(tmp_path, {"results/tables/t.csv": "region,count\nnorth,3\n"}).kinds == [FREQ]


# -- robustness: malformed, binary, huge, links ----------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00",
        b"region,count\nnorth,\x00\n",
        "region,count\nn\u00f6rth,3\n".encode("latin-1"),
    ],
)
def test_binary_or_non_utf8_tables_cannot_be_read(tmp_path: Path, content: bytes) -> None:
    """A binary or non-UTF-8 file named like a table is a finding, not a crash."""
    assert run(tmp_path, {"t.csv": content}).kinds == [UNREADABLE]


def test_a_field_over_the_csv_limit_cannot_be_read(tmp_path: Path) -> None:
    assert run(tmp_path, {"t.csv": '"' + "a" * 200_000 + '"\n'}).kinds == [UNREADABLE]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n\n",
        "a",
        'region,count\n"north,3\n',  # an unterminated quote
        "region,count\nnorth,3,4,5,6\nsouth\n",  # ragged rows
        "x,y\n1e999,nan\n-5,inf\n",
        ",,,\n,,,\n",
    ],
)
def test_malformed_tables_never_crash(tmp_path: Path, text: str) -> None:
    check = run(tmp_path, {"t.csv": text})
    assert set(check.kinds) <= set(DISCLOSURE_KINDS)


def test_a_huge_table_is_too_large_to_check_and_the_work_is_bounded(tmp_path: Path) -> None:
    """Over the byte bound, the row bound or the column bound: reported, not read; quickly."""
    big = "region,count\n" + "north,100\n" * (sdc.MAX_TABLE_BYTES // 10 + 1)
    rows = "region,count\n" + "n,100\n" * (sdc.MAX_ROWS + 1)
    wide = ",".join(["1"] * (sdc.MAX_COLUMNS + 1)) + "\n"
    started = time.monotonic()
    for text in (big, rows, wide):
        assert run(tmp_path / str(len(text)), {"t.csv": text}).kinds == [TOO_LARGE]
    assert time.monotonic() - started < 30


def test_the_total_budget_over_all_tables_is_bounded(tmp_path: Path) -> None:
    """Each table is under the per-file bound, together they pass the job's: the later ones are too large."""
    text = "region,count\n" + "north,100\n" * ((sdc.MAX_TABLE_BYTES - 100) // 10)
    n = sdc.MAX_TOTAL_BYTES // len(text) + 1
    check = run(tmp_path, {f"t{i:02}.csv": text for i in range(n)})
    assert check.kinds == [TOO_LARGE]
    assert sum(1 for d in check.details if d["rule"] == TOO_LARGE) >= 1


def test_links_and_special_files_are_never_followed(tmp_path: Path) -> None:
    """A link named like a table (to a small-count table) is not read through: it cannot be read."""
    target = tmp_path / "target.csv"
    target.write_text("region,count\nnorth,3\n")
    root = tmp_path / "outputs"
    root.mkdir()
    (root / "link.csv").symlink_to(target)
    os.mkfifo(root / "fifo.csv")
    check = check_outputs(root, DEFAULT)
    assert check.kinds == [UNREADABLE]
    assert FREQ not in check.kinds


def test_details_are_bounded(tmp_path: Path) -> None:
    """Thousands of findings: the sealed details stop at MAX_DETAILS and count the rest."""
    text = "region,count\n" + "".join(f"r{i},3\n" for i in range(2000))
    check = run(tmp_path, {"t.csv": text})
    assert check.kinds == [FREQ]
    assert len(check.details) == sdc.MAX_DETAILS + 1
    assert check.details[-1] == {"omitted": 2000 - sdc.MAX_DETAILS}


def test_the_public_kinds_carry_nothing_of_the_table(tmp_path: Path) -> None:
    """Kinds are fixed strings in a fixed order, each once; the details (for reviewers) name file, row,
    column, value and threshold."""
    check = run(
        tmp_path,
        {
            "secret-name-4449.csv": "region,count,min\nnorth,7,4449.462\nsouth,3,1.5\n",
            "b.csv": "sex,no,yes,All\nfemale,*,115,662\n",
        },
    )
    assert check.kinds == [FREQ, RECOVER, EXTREMES]
    public = json.dumps(check.kinds)
    for leak in ("secret", "4449", "north", "7", "10"):
        assert leak not in public
    freq = [d for d in check.details if d["rule"] == FREQ]
    assert {(d["file"], d["row"], d["column"], d["value"], d["threshold"]) for d in freq} == {
        ("secret-name-4449.csv", 2, "count", "7", 10),
        ("secret-name-4449.csv", 3, "count", "3", 10),
    }


# -- the grant's claim -----------------------------------------------------------------------------------


def _key() -> bytes:
    return generate_keypair()[1]


def _grant_fields(**kw: Any) -> dict[str, Any]:
    return {
        "user": "alice",
        "job_id": contract.new_job_id(),
        "bundle_digest": "sha256:" + "b" * 64,
        "datasets": [GrantedDataset("acme", "insurance", "sha256:" + "1" * 64, "auto")],
        "output_public_key": _key(),
        **kw,
    }


def test_the_disclosure_claim_round_trips_and_defaults() -> None:
    """The claim is signed into the grant and read back; a grant without it uses the defaults (10, 3,
    false), defined once in formats; malformed claims refuse the grant."""
    hub = generate_key()
    jwks = [public_jwk(hub)]
    tp = thumbprint(jwks[0])
    rules = DisclosureRules(min_cell_count=5, dominance_min_contributors=4, allow_extremes=True)
    g = verify_grant(issue_grant(hub, **_grant_fields(disclosure=rules)), jwks, hub_key_thumbprint=tp)
    assert g.disclosure == rules and g.disclosure_rules == rules
    g = verify_grant(issue_grant(hub, **_grant_fields()), jwks, hub_key_thumbprint=tp)
    assert g.disclosure is None and "disclosure" not in g.claims()
    assert g.disclosure_rules == DisclosureRules(10, 3, False)
    for bad in (
        {"min_cell_count": 0},
        {"allow_extremes": 1},
        {"x": 1},
        [],
        {"dominance_min_contributors": "3"},
    ):
        with pytest.raises(DCRError):
            DisclosureRules.from_json(bad)
    assert DisclosureRules.from_json({}) == DisclosureRules()
    assert DisclosureRules.strictest([DisclosureRules(5, 7, True), DisclosureRules(12, 2, False)]) == (
        DisclosureRules(12, 7, False)
    )


def test_sealing_key_for_held_outputs() -> None:
    """Held outputs go to the airlock (auto grants included); released ones to the job key; held outputs
    of a grant without an airlock key are refused."""
    airlock, job = _key(), _key()
    g = build_grant(**_grant_fields(output_public_key=job, airlock_public_key=airlock))
    assert sealing_key(g) == job
    assert sealing_key(g, held=True) == airlock
    bare = build_grant(**_grant_fields(output_public_key=job))
    assert sealing_key(bare) == job
    with pytest.raises(DCRError, match="airlock"):
        sealing_key(bare, held=True)


def test_the_decision() -> None:
    """Limits refuse; disclosure findings hold under auto (refuse without an airlock); review holds."""
    airlock = _key()
    auto = build_grant(**_grant_fields(airlock_public_key=airlock))
    bare = build_grant(**_grant_fields())
    review = build_grant(
        **_grant_fields(
            airlock_public_key=airlock,
            datasets=[GrantedDataset("acme", "insurance", "sha256:" + "1" * 64, "review")],
        )
    )
    ok, over = OutputCheck([], []), OutputCheck(["over the byte limit"], ["9 bytes > 1"])
    clean, found = DisclosureCheck(), DisclosureCheck([FREQ], [{}])
    assert decide(auto, ok, clean) == "released"
    assert decide(auto, ok, found) == "held"
    assert decide(bare, ok, found) == "rejected"
    assert decide(auto, over, clean) == "rejected"
    assert decide(review, ok, clean) == "held"
    assert decide(review, ok, found) == "held"


# -- the receipt field -----------------------------------------------------------------------------------


def test_the_receipt_lists_kinds_once_in_order_and_never_releases_findings(tmp_path: Path) -> None:
    """``output_check.disclosure`` holds known kinds, each once, in order; a released receipt has none;
    a receipt from before the field still parses."""
    out = tmp_path / "outputs"
    out.mkdir()
    m = make_manifest(out)
    assert m.output_check["disclosure"] == []
    doc = m.to_json()

    def with_check(disclosure: Any, decision: str = "rejected") -> dict[str, Any]:
        d = json.loads(json.dumps(doc))
        d["output_check"]["disclosure"] = disclosure
        d["release"]["decision"] = decision
        return d

    ReceiptManifest.from_json(with_check([FREQ, EXTREMES]))
    for bad in ([EXTREMES, FREQ], [FREQ, FREQ], ["a table with 7 rows"], "x"):
        with pytest.raises(IntegrityError):
            ReceiptManifest.from_json(with_check(bad))
    with pytest.raises(IntegrityError, match="cannot be released"):
        ReceiptManifest.from_json(with_check([DOMINATED], decision="released"))
    old = json.loads(json.dumps(doc))
    del old["output_check"]["disclosure"]
    assert "disclosure" not in ReceiptManifest.from_json(old).output_check
