import functools
import re
import threading
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import delete, event, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from core.csvcheck import IngestError, inspect_file
from core.db import make_engine, make_sessions
from core.generator import generate_transactions
from core.ingest import ingest_csv
from core.lease import try_acquire
from core.schema import IngestedFile, LabelledRow
from core.spec import FeatureSpec, parse_spec
from retrain.data import DataError, read_labelled_csv


def _count(sessions) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(LabelledRow))


def _csv(tmp_path: Path, frame: pd.DataFrame, name: str = "new.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def impatient(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on the test's SQLite file that give up at once (busy timeout 0) on a lock held elsewhere."""
    engine = make_engine(sqlite_url)
    event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA busy_timeout=0"))
    yield make_sessions(engine)
    engine.dispose()


def _csv_text(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _bad_file(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    frame = generate_transactions(50, seed=4)
    frame["contract_date"] = frame["contract_date"].astype(str)
    frame.loc[3, "area_m2"] = -5
    frame.loc[7, "district"] = "Atlantis-gu"
    frame.loc[9, "price_10k_krw"] = None
    frame.loc[11, "contract_date"] = "not a date"
    frame["price_10k_krw"] = frame["price_10k_krw"].astype(float)
    frame.loc[12, "price_10k_krw"] = 1e300  # finite, but its square would overflow the monitor's statistics
    return frame, _csv(tmp_path, frame)


BAD_LINES = [
    (5, ["area_m2: must be >= 5"]),
    (9, ["district: unknown category 'Atlantis-gu'"]),
    (11, ["price_10k_krw: '' is not a number"]),
    (
        13,
        [
            "contract_date: 'not a date' is neither in this file's time format %Y-%m-%d %H:%M:%S%z (inferred "
            "from line 2, '2019-03-30 12:22:14+00:00') nor ISO 8601; write every time in one format, "
            "ISO 8601 (2022-04-01) is safest"
        ],
    ),
    (14, ["price_10k_krw: must be within ±1e+15"]),
]


def test_a_file_with_bad_lines_loads_nothing_and_reports_each(tmp_path: Path, sessions, spec) -> None:
    _, path = _bad_file(tmp_path)
    report = ingest_csv(path, spec=spec, sessions=sessions, chunk_size=4)  # bad lines in several batches
    assert (report.good, report.bad, report.loaded) == (45, 5, 0)
    assert report.rejected == BAD_LINES
    assert _count(sessions) == 0
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(IngestedFile)) == 0  # not recorded: free to fix


def test_skip_bad_loads_the_good_rows_only(tmp_path: Path, sessions, spec) -> None:
    frame, path = _bad_file(tmp_path)
    report = ingest_csv(
        path, spec=spec, sessions=sessions, source="molit-2022-01", skip_bad=True, chunk_size=4
    )
    assert (report.good, report.bad, report.loaded) == (45, 5, 45)
    assert report.rejected == BAD_LINES
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(LabelledRow)) == 45
        first = s.scalars(select(LabelledRow).order_by(LabelledRow.id)).first()
        record = s.get(IngestedFile, report.sha256)
    assert first.source == "molit-2022-01"
    assert first.features == frame.loc[0, spec.feature_names].to_dict()
    assert first.event_time == datetime.fromisoformat(frame.loc[0, "contract_date"])
    assert (record.rows, record.skipped, record.loads, record.source) == (45, 5, 1, "molit-2022-01")


def test_a_file_is_loaded_once_unless_forced(tmp_path: Path, sessions, spec) -> None:
    path = _csv(tmp_path, generate_transactions(30, seed=2))
    first = ingest_csv(path, spec=spec, sessions=sessions, source="jan")
    assert (first.loaded, first.already) == (30, None)
    copy = _csv(tmp_path, pd.read_csv(path), name="copy.csv")  # the same bytes under another name
    again = ingest_csv(copy, spec=spec, sessions=sessions)
    assert again.loaded == 0 and again.already is not None
    assert (again.already.rows, again.already.source, again.already.name) == (30, "jan", str(path))
    assert _count(sessions) == 30
    forced = ingest_csv(copy, spec=spec, sessions=sessions, force=True)
    assert forced.loaded == 30 and _count(sessions) == 60
    with sessions() as s:
        record = s.get(IngestedFile, first.sha256)
    assert (record.rows, record.loads, record.name) == (60, 2, str(copy))


def test_a_row_an_earlier_file_loaded_is_not_loaded_again(tmp_path: Path, sessions, spec) -> None:
    """Exports that overlap ("the last 90 days", monthly) load each sale once, however each file writes
    it: another time format and "84" for 84.0 are the same row. A file's own repeats are kept (two sales
    alike in every column): loaded as often as the file gives them beyond the times already loaded."""
    frame = generate_transactions(40, seed=3)
    first = frame.iloc[:30].copy()
    first.loc[5] = first.loc[4]  # the first file gives row 4 twice
    assert ingest_csv(_csv(tmp_path, first, "jan.csv"), spec=spec, sessions=sessions).loaded == 30

    overlap = frame.iloc[20:40].copy()
    overlap["contract_date"] = pd.to_datetime(overlap["contract_date"]).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    overlap["area_m2"] = overlap["area_m2"].map(lambda x: f"{x:.6f}")  # 84.5 written as 84.500000
    overlap = pd.concat([overlap, first.loc[[4, 4, 4]]])  # row 4 three times: one more than loaded
    report = ingest_csv(_csv(tmp_path, overlap, "feb.csv"), spec=spec, sessions=sessions, chunk_size=7)
    assert (report.good, report.loaded, report.repeated) == (23, 11, 12)  # rows 30-39 and one row 4
    assert _count(sessions) == 41
    with sessions() as s:
        record = s.get(IngestedFile, report.sha256)
        sources = s.scalars(select(LabelledRow.source).order_by(LabelledRow.id)).all()
    assert record.rows == 23  # what the file gave: rows repeated from jan.csv stay as jan.csv loaded them
    assert sources == ["jan.csv"] * 30 + ["feb.csv"] * 11

    forced = ingest_csv(_csv(tmp_path, overlap, "feb.csv"), spec=spec, sessions=sessions, force=True)
    assert (forced.loaded, forced.repeated, _count(sessions)) == (23, 0, 64)


def test_a_row_written_with_minus_zero_is_the_row_written_with_zero(tmp_path: Path, sessions) -> None:
    """-0 and 0 are one number (an export rounding -0.04 to one place writes "-0.0", another "0"), but JSON
    writes them apart, so the row's key told them apart and the sale was loaded twice."""
    spec = parse_spec({
        "dataset": "buildings", "target": "kwh", "time_column": "ts",
        "features": [{"name": "outdoor_temp_c", "type": "numeric"}],
    })  # fmt: skip
    header = "ts,outdoor_temp_c,kwh\n"
    first = ingest_csv(
        _csv_text(tmp_path, "a.csv", header + "2025-06-01,0,0\n"), spec=spec, sessions=sessions
    )
    again = ingest_csv(
        _csv_text(tmp_path, "b.csv", header + "2025-06-01,-0.0,-0\n"), spec=spec, sessions=sessions
    )
    assert (first.loaded, again.loaded, again.repeated, _count(sessions)) == (1, 0, 1, 1)


def test_alike_rows_are_counted_once_per_key_not_once_per_row(tmp_path: Path, sqlite_url: str) -> None:
    """A day's readings can repeat (date-only times, few features): the copy counted the alike rows held and
    staged again for each row, k² index steps under the write lock (20,000 alike rows held it 10 s, and
    45 s loaded again, past other writers' busy timeout). Counted by SQLite's VM steps, not seconds: linear,
    a few hundred per row, where it was thousands per row at 3,000 and growing with k."""
    spec = parse_spec({
        "dataset": "m", "target": "kwh", "time_column": "day",
        "features": [{"name": "hour", "type": "integer", "min": 0, "max": 23}],
    })  # fmt: skip
    engine = make_engine(sqlite_url)
    steps = [0]

    def count() -> int:
        steps[0] += 1000
        return 0

    event.listen(engine, "connect", lambda dbapi, _: dbapi.set_progress_handler(count, 1000))
    sessions = make_sessions(engine)
    alike = "day,hour,kwh\n" + "2022-04-01,3,1.5\n" * 3000
    first = ingest_csv(_csv_text(tmp_path, "a.csv", alike), spec=spec, sessions=sessions)
    again = ingest_csv(
        _csv_text(tmp_path, "b.csv", alike + "2022-04-01,3,1.5\n"), spec=spec, sessions=sessions
    )
    engine.dispose()
    assert (first.loaded, again.loaded, again.repeated) == (3000, 1, 3000)
    assert steps[0] < 1000 * 6001


def test_a_row_loaded_before_the_spec_gained_a_nullable_feature_is_that_row_with_it_empty(
    tmp_path: Path, sessions
) -> None:
    """Absent and empty are one: the export after the spec gained `temp` repeats the old rows with it empty,
    and those are not loaded again; a row that gives a temperature is new information, and loads."""
    before = parse_spec({"dataset": "m", "target": "kwh", "time_column": "ts",
                         "features": [{"name": "hour", "type": "integer"}]})  # fmt: skip
    after = parse_spec({"dataset": "m", "target": "kwh", "time_column": "ts",
                        "features": [{"name": "hour", "type": "integer"},
                                     {"name": "temp", "type": "numeric", "nullable": True}]})  # fmt: skip
    old = _csv_text(
        tmp_path, "old.csv", "ts,hour,kwh\n2025-06-01T00:00:00Z,3,1.5\n2025-06-01T01:00:00Z,4,2.5\n"
    )
    assert ingest_csv(old, spec=before, sessions=sessions).loaded == 2
    new = _csv_text(
        tmp_path,
        "new.csv",
        "ts,hour,temp,kwh\n2025-06-01T00:00:00Z,3,,1.5\n2025-06-01T01:00:00Z,4,18.5,2.5\n",
    )
    report = ingest_csv(new, spec=after, sessions=sessions)
    assert (report.loaded, report.repeated, _count(sessions)) == (1, 1, 3)


def test_without_a_time_column_no_row_is_taken_for_one_loaded_before(tmp_path: Path, sessions) -> None:
    """A row's time is then the ingest's: alike rows from two files may be two events, and are both loaded."""
    spec = parse_spec(METERS)
    assert (
        ingest_csv(_csv_text(tmp_path, "a.csv", "hour,kwh\n3,1.5\n"), spec=spec, sessions=sessions).loaded
        == 1
    )
    again = ingest_csv(_csv_text(tmp_path, "b.csv", "hour,kwh\n3,1.5\n4,2.5\n"), spec=spec, sessions=sessions)
    assert (again.loaded, again.repeated, _count(sessions)) == (2, 0, 3)


def test_a_file_fixed_after_a_refusal_loads_each_row_once(tmp_path: Path, sessions, spec) -> None:
    _, path = _bad_file(tmp_path)
    assert ingest_csv(path, spec=spec, sessions=sessions).loaded == 0
    fixed = generate_transactions(50, seed=4)
    fixed.to_csv(path, index=False)
    assert ingest_csv(path, spec=spec, sessions=sessions).loaded == 50
    assert _count(sessions) == 50


def test_times_are_read_in_one_format_for_the_whole_file(tmp_path: Path, sessions, spec) -> None:
    frame = generate_transactions(6, seed=1)
    frame["contract_date"] = [
        "01/02/2022",
        "03/04/2022",
        "2022-05-06T07:08:09+09:00",
        "13/02/2022",
        "",
        "20220401",
    ]
    path = _csv(tmp_path, frame)
    report = ingest_csv(path, spec=spec, sessions=sessions, skip_bad=True, chunk_size=2)
    assert report.rejected == [
        (
            5,
            [
                "contract_date: '13/02/2022' is neither in this file's time format %m/%d/%Y (inferred from "
                "line 2, '01/02/2022') nor ISO 8601; write every time in one format, ISO 8601 (2022-04-01) "
                "is safest"
            ],
        ),
        (6, ["contract_date: missing (every row needs its date/time)"]),
        (
            7,
            [
                "contract_date: '20220401' is a number, not a date/time; write e.g. 2022-04-01 or "
                "2022-04-01T09:30:00+09:00"
            ],
        ),
    ]
    with sessions() as s:
        times = s.scalars(select(LabelledRow.event_time).order_by(LabelledRow.id)).all()
    assert times == [
        datetime(2022, 1, 2, tzinfo=UTC),
        datetime(2022, 3, 4, tzinfo=UTC),
        datetime(2022, 5, 5, 22, 8, 9, tzinfo=UTC),
    ]


def test_a_time_zone_given_by_name_is_refused_not_dropped(tmp_path: Path, sessions, spec) -> None:
    """pandas would infer '%Y-%m-%d %H:%M CET' from line 2, CET as literal text, and read 10:00 UTC."""
    frame = generate_transactions(4, seed=1)
    frame["contract_date"] = [
        "2022-01-01 10:00 CET",
        "2022-01-02 10:00 UTC",
        "2022-01-03 10:00 Asia/Seoul",
        "2022-01-04T10:00:00+01:00",
    ]
    report = ingest_csv(_csv(tmp_path, frame), spec=spec, sessions=sessions, skip_bad=True)
    advice = "which is not read; write the offset instead (e.g. 2022-04-01T09:30:00+09:00), or Z for UTC"
    assert report.rejected == [
        (2, [f"contract_date: '2022-01-01 10:00 CET' names its time zone (CET), {advice}"]),
        (4, [f"contract_date: '2022-01-03 10:00 Asia/Seoul' names its time zone (Asia/Seoul), {advice}"]),
    ]
    with sessions() as s:
        times = s.scalars(select(LabelledRow.event_time).order_by(LabelledRow.id)).all()
    assert times == [datetime(2022, 1, 2, 10, tzinfo=UTC), datetime(2022, 1, 4, 9, tzinfo=UTC)]


def test_event_times_more_than_a_day_ahead_are_refused(tmp_path: Path, sessions, spec) -> None:
    frame = generate_transactions(3, seed=1)
    frame["contract_date"] = ["2022-01-01", "2099-01-01", "2022-01-03"]
    path = _csv(tmp_path, frame)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    report = ingest_csv(path, spec=spec, sessions=sessions, clock=lambda: now)
    assert report.rejected == [
        (3, ["contract_date: '2099-01-01' is more than a day ahead of now (2026-01-01 00:00 UTC)"])
    ]
    frame["contract_date"] = ["2022-01-01", "2026-01-01T23:59:00", "2022-01-03"]  # within the day: clock skew
    assert ingest_csv(_csv(tmp_path, frame), spec=spec, sessions=sessions, clock=lambda: now).loaded == 3


@pytest.mark.parametrize(
    "written",
    [
        ["2022-01-01", "2302-01-01", "1022-01-03"],
        ["01/02/2022", "12/31/2302", "01/03/1022"],  # in the file's format
        ["2022-01-01", "0001-01-01T00:00:00+09:00", "9999-12-31T23:59:59-05:00"],  # beyond datetime in UTC
    ],
)
def test_a_time_outside_what_pandas_holds_is_called_so_not_unparsable(
    tmp_path: Path, sessions, spec, written: list[str]
) -> None:
    """2302-01-01 is plain ISO 8601; "unparsable" sent people looking for a format error."""
    frame = generate_transactions(3, seed=1)
    frame["contract_date"] = written
    path = _csv(tmp_path, frame)
    outside = "outside the times pandas can hold, 1677-09-22 … 2262-04-11: a typo?"
    report = ingest_csv(path, spec=spec, sessions=sessions, skip_bad=True)
    assert report.rejected == [
        (3, [f"contract_date: {written[1]!r} is {outside}"]),
        (4, [f"contract_date: {written[2]!r} is {outside}"]),
    ]
    with pytest.raises(DataError) as refused:
        read_labelled_csv(path, spec)
    assert (
        f"column 'contract_date' has 2 unparsable value(s), first at line 3 ({written[1]}); {outside}"
        in str(refused.value)
    )


def test_a_line_with_more_or_fewer_fields_than_the_header_is_bad(tmp_path: Path, sessions, spec) -> None:
    path = _csv(tmp_path, generate_transactions(4, seed=3))
    lines = path.read_text().splitlines()
    lines[1] += ",999"
    lines[3] = lines[3].rsplit(",", 1)[0]
    path.write_text("\n".join(lines) + "\n")
    report = ingest_csv(path, spec=spec, sessions=sessions)
    assert report.rejected == [
        (2, ["has 9 fields; the header has 8"]),
        (4, ["has 7 fields; the header has 8", "price_10k_krw: '' is not a number"]),
    ]


def test_a_utf8_bom_is_read(tmp_path: Path, sessions, spec) -> None:
    path = tmp_path / "excel.csv"
    generate_transactions(5, seed=3).to_csv(path, index=False, encoding="utf-8-sig")
    assert ingest_csv(path, spec=spec, sessions=sessions).loaded == 5


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p, f: f.to_csv(p, index=False, encoding="utf-16"), "is UTF-16 text; save it as UTF-8"),
        (lambda p, f: f.to_csv(p, index=False, encoding="utf-16-le"), "line 1 holds a NUL byte"),
        (
            lambda p, f: f.assign(district="Gangnam-gu é").to_csv(p, index=False, encoding="latin-1"),
            "line 2 is not UTF-8 text (byte 0xe9); save it as UTF-8",
        ),
        (lambda p, f: p.mkdir(), "is a directory; give the CSV file in it"),
        (lambda p, f: p.write_text(""), "is empty: the first line must be the header"),
        (  # an unclosed quote: the rest of the file is one field
            lambda p, f: p.write_text(f.to_csv(index=False) + 'Mapo-gu,"' + "9\n" * 70_000),
            "the row from line 5 is not valid CSV: field larger than field limit (131072)",
        ),
    ],
)
def test_a_file_that_is_not_utf8_csv_is_a_clear_error(tmp_path: Path, sessions, spec, write, message) -> None:
    path = tmp_path / "odd.csv"
    write(path, generate_transactions(3, seed=3))
    with pytest.raises(IngestError, match=re.escape(message)):
        ingest_csv(path, spec=spec, sessions=sessions)


def test_ingest_refuses_a_file_missing_columns(tmp_path: Path, sessions, spec: FeatureSpec) -> None:
    path = tmp_path / "bad.csv"
    generate_transactions(5).drop(columns=["floor", "price_10k_krw"]).to_csv(path, index=False)
    with pytest.raises(IngestError, match="missing column\\(s\\): floor, price_10k_krw"):
        ingest_csv(path, spec=spec, sessions=sessions)
    # As bootstrap and the backtest name them: a column spelt nearly the same, a file not comma-separated.
    frame = generate_transactions(5).rename(columns={"floor": "Floor", "area_m2": "area_m2 "})
    frame.to_csv(path, index=False)
    near = "header is missing column(s): area_m2 (the header has 'area_m2 '), floor (the header has 'Floor')"
    with pytest.raises(IngestError, match=re.escape(near)):
        ingest_csv(path, spec=spec, sessions=sessions)
    generate_transactions(5).to_csv(path, index=False, sep=";")
    semicolons = "(the header is one column holding ';': save the file comma-separated)"
    with pytest.raises(IngestError, match=re.escape(semicolons)):
        ingest_csv(path, spec=spec, sessions=sessions)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(LabelledRow)) == 0


def test_a_source_too_long_to_store_is_refused_before_any_check_and_a_long_path_is_kept(
    tmp_path: Path, sessions, spec: FeatureSpec
) -> None:
    """PostgreSQL refused a --source over labelled_row.source's 200 characters once every line was checked,
    with a traceback; SQLite stored it."""
    path = tmp_path / "jan.csv"
    generate_transactions(5).to_csv(path, index=False)
    with pytest.raises(IngestError, match=re.escape(f"source {'s' * 50!r}… is 201 characters, over the 200")):
        ingest_csv(path, spec=spec, sessions=sessions, source="s" * 201)
    for blank in (" ", "\t  "):
        with pytest.raises(IngestError, match=re.escape("source is blank: give --source a name, or leave")):
            ingest_csv(path, spec=spec, sessions=sessions, source=blank)
    deep = tmp_path.joinpath(*["d" * 100] * 5)  # a path over ingested_file.name's 500 characters
    deep.mkdir(parents=True)
    generate_transactions(5).to_csv(deep / "jan.csv", index=False)
    assert ingest_csv(deep / "jan.csv", spec=spec, sessions=sessions, source="s" * 200).loaded == 5
    with sessions() as session:
        assert session.scalars(select(LabelledRow.source)).all() == ["s" * 200] * 5
        assert session.scalar(select(IngestedFile.name)).endswith("/jan.csv")


def test_a_bad_line_in_a_later_batch_stores_nothing_of_the_earlier_ones(
    tmp_path: Path, sessions, spec
) -> None:
    frame = generate_transactions(10, seed=7)
    frame.loc[8, "area_m2"] = -5  # line 10, in the third batch of three lines
    report = ingest_csv(_csv(tmp_path, frame), spec=spec, sessions=sessions, chunk_size=3)
    assert (report.good, report.bad, report.loaded, report.rejected) == (
        9,
        1,
        0,
        [(10, ["area_m2: must be >= 5"])],
    )
    assert _count(sessions) == 0
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(IngestedFile)) == 0


def test_other_writers_do_not_wait_while_the_lines_are_checked(
    tmp_path: Path, sqlite_url: str, impatient, spec
) -> None:
    engine = make_engine(sqlite_url)
    sessions = make_sessions(engine)
    path = _csv(tmp_path, generate_transactions(30, seed=6))
    renewed: list[bool] = []

    def renew_lease(lines: int) -> None:  # the scheduler renewing its lease while the ingest checks lines
        renewed.append(
            try_acquire(impatient, name="scheduler", holder="worker-1", ttl_s=60, now=datetime.now(UTC))
        )

    report = ingest_csv(path, spec=spec, sessions=sessions, chunk_size=10, on_progress=renew_lease)
    engine.dispose()
    assert (renewed, report.loaded, _count(impatient)) == ([True, True, True], 30, 30)


def test_an_ingest_blocked_by_another_write_is_a_clear_error(
    tmp_path: Path, sqlite_url: str, impatient, spec
) -> None:
    engine = make_engine(sqlite_url)
    sessions = make_sessions(engine)
    path = _csv(tmp_path, generate_transactions(5, seed=5))
    now = datetime.now(UTC)
    with sessions.begin() as other:  # another ingest, in the middle of its copy: SQLite's one writer
        other.add(LabelledRow(features={}, target=1.0, event_time=now, source="other.csv", ingested_at=now))
        other.flush()
        with pytest.raises(
            IngestError,
            match=re.escape(
                f"{path}: nothing was loaded: another write holds the database (SQLite: one writer at a "
                "time, e.g. another ingest) and kept it past the busy timeout; try again when it has finished"
            ),
        ):
            ingest_csv(path, spec=spec, sessions=impatient)
    assert ingest_csv(path, spec=spec, sessions=impatient).loaded == 5  # once it has: nothing half-done
    engine.dispose()
    assert _count(impatient) == 6


def test_a_file_changed_after_it_was_inspected_loads_nothing(tmp_path: Path, sessions, spec) -> None:
    path = _csv(tmp_path, generate_transactions(5, seed=8))
    inspected = inspect_file(path)  # as the CLI does, for its progress bar
    generate_transactions(5, seed=9).to_csv(path, index=False)
    with pytest.raises(
        IngestError, match=re.escape(f"{path} changed while being loaded (its sha256 is no longer")
    ):
        ingest_csv(inspected, spec=spec, sessions=sessions)
    assert _count(sessions) == 0
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(IngestedFile)) == 0


def test_a_file_loaded_by_another_ingest_while_this_one_checks_is_loaded_once(
    tmp_path: Path, sessions, spec
) -> None:
    path = _csv(tmp_path, generate_transactions(20, seed=3))
    copy = _csv(tmp_path, pd.read_csv(path), name="copy.csv")  # the same bytes
    others: list[int] = []

    def other_ingest(lines: int) -> None:
        if not others:
            others.append(ingest_csv(copy, spec=spec, sessions=sessions, source="other").loaded)

    report = ingest_csv(path, spec=spec, sessions=sessions, chunk_size=5, on_progress=other_ingest)
    assert (others, report.loaded, report.good) == ([20], 0, 20)
    assert (report.already.rows, report.already.source, report.already.name) == (20, "other", str(copy))
    assert _count(sessions) == 20


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_file_claimed_by_another_ingest_in_the_same_instant_loads_nothing(
    tmp_path: Path, sessions, spec
) -> None:
    """Two ingests of the same bytes that both found it unloaded: the second to claim it waits on the
    first's claim (PostgreSQL's unique index) and, once that commits, loads nothing and says why. (SQLite,
    one writer at a time, refuses it earlier: see the busy-timeout test above.)"""
    path = _csv(tmp_path, generate_transactions(10, seed=4))
    now = datetime.now(UTC)
    claim = IngestedFile(
        sha256=inspect_file(path).sha256, name="other.csv", source="other", rows=10, skipped=0, loads=1,
        first_loaded_at=now, last_loaded_at=now,
    )  # fmt: skip
    other = sessions()
    committed = threading.Timer(1.0, other.commit)

    def claim_while_checking(lines: int) -> None:  # before this ingest claims the file, uncommitted for 1 s
        if committed.ident is None:  # once
            other.add(claim)
            other.flush()
            committed.start()

    try:
        with pytest.raises(
            IngestError,
            match=re.escape(
                f"{path} was being loaded by another ingest at the same time; this one loaded nothing"
            ),
        ):
            ingest_csv(path, spec=spec, sessions=sessions, on_progress=claim_while_checking)
    finally:
        committed.join()
        other.close()
    assert _count(sessions) == 0
    with sessions() as s:
        assert s.scalar(select(IngestedFile.source)) == "other"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_rows_another_ingest_is_copying_in_the_same_instant_are_loaded_once(
    tmp_path: Path, sessions, spec
) -> None:
    """Two overlapping files whose copies overlap in time: the second copy's lock on labelled_row waits for
    the first copy to commit, and then it finds the shared rows there. Without that lock it would read the
    table as it was before the other committed, and load them again. (SQLite has one writer at a time.)"""
    frame = generate_transactions(20, seed=5)
    ingest_csv(_csv(tmp_path, frame.iloc[:10], "jan.csv"), spec=spec, sessions=sessions)
    with sessions.begin() as s:  # jan.csv's rows, as its copy will write them again below
        jan = [
            {
                c: getattr(row, c)
                for c in ("features", "target", "event_time", "source", "ingested_at", "row_key")
            }
            for row in s.scalars(select(LabelledRow))
        ]
        s.execute(delete(LabelledRow))
    other = sessions()
    committed = threading.Timer(1.0, other.commit)

    def copy_while_checking(lines: int) -> None:  # jan.csv's copy, uncommitted for 1 s
        if committed.ident is None:  # once
            other.execute(
                insert(LabelledRow), jan
            )  # its insert's lock, without the copy's own, to show that one
            committed.start()

    try:
        report = ingest_csv(
            _csv(tmp_path, frame.iloc[5:], "feb.csv"),
            spec=spec,
            sessions=sessions,
            on_progress=copy_while_checking,
        )
    finally:
        committed.join()
        other.close()
    assert (report.loaded, report.repeated, _count(sessions)) == (10, 5, 20)


def test_nan_written_in_a_nullable_column_is_stored_as_missing(tmp_path: Path, sessions) -> None:
    """pandas writes a missing number as NaN on request (na_rep), some tools always: the cell is missing,
    stored as JSON null. Stored as the float NaN it was invalid JSON, which PostgreSQL refuses."""
    spec = parse_spec({
        "dataset": "buildings", "target": "kwh", "target_min": 0, "time_column": "ts",
        "features": [
            {"name": "hour", "type": "integer", "min": 0, "max": 23},
            {"name": "outdoor_temp_c", "type": "numeric", "nullable": True},
        ],
    })  # fmt: skip
    path = tmp_path / "meters.csv"
    path.write_text(
        "ts,hour,outdoor_temp_c,kwh\n"
        "2025-06-01T00:00:00+00:00,3,NaN,1.5\n"
        "2025-06-01T01:00:00+00:00,4,nan,2.5\n"
        "2025-06-01T02:00:00+00:00,5,,3.5\n"
        "2025-06-01T03:00:00+00:00,6,12.5,4.5\n"
    )
    assert ingest_csv(path, spec=spec, sessions=sessions).loaded == 4
    with sessions() as s:
        stored = s.scalars(select(LabelledRow.features).order_by(LabelledRow.id)).all()
    assert [row["outdoor_temp_c"] for row in stored] == [None, None, None, 12.5]


def test_missing_number_markers_are_missing_as_bootstrap_reads_them(tmp_path: Path, sessions) -> None:
    """R writes a missing number as NA, databases' exports as NULL: `bootstrap --csv` (pandas) reads them as
    missing, so ingest must too. It refused every such line ("'NA' is not a number"), so the next export of
    the file v1 was trained on could not be loaded."""
    spec = parse_spec({
        "dataset": "buildings", "target": "kwh", "time_column": "ts",
        "features": [
            {"name": "hour", "type": "integer", "min": 0, "max": 23},
            {"name": "outdoor_temp_c", "type": "numeric", "nullable": True},
        ],
    })  # fmt: skip
    markers = ["NA", "null", "NULL", "N/A", "None", "#N/A"]
    path = tmp_path / "meters.csv"
    path.write_text(
        "ts,hour,outdoor_temp_c,kwh\n"
        + "".join(f"2025-06-01T{i:02d}:00:00+00:00,{i},{m},{i + 1.5}\n" for i, m in enumerate(markers))
        + "2025-06-01T10:00:00+00:00,10,12.5,4.5\n"
    )
    assert read_labelled_csv(path, spec)["outdoor_temp_c"].isna().sum() == len(markers)
    report = ingest_csv(path, spec=spec, sessions=sessions)
    assert (report.loaded, report.rejected) == (len(markers) + 1, [])
    with sessions() as s:
        stored = s.scalars(select(LabelledRow.features).order_by(LabelledRow.id)).all()
    assert [row["outdoor_temp_c"] for row in stored] == [None] * len(markers) + [12.5]


def test_a_number_with_digit_group_underscores_is_refused_as_bootstrap_refuses_it(
    tmp_path: Path, sessions
) -> None:
    """Python's float() reads 1_0.5 as 10.5; pandas, and so `bootstrap --csv`, refuses it. Ingest loaded such
    lines, so a file bootstrap refused was half loaded by ingest, its values read differently."""
    spec = parse_spec({
        "dataset": "buildings", "target": "kwh", "time_column": "ts",
        "features": [{"name": "outdoor_temp_c", "type": "numeric"}],
    })  # fmt: skip
    path = tmp_path / "meters.csv"
    path.write_text(
        "ts,outdoor_temp_c,kwh\n2025-06-01T00:00:00+00:00,1_0.5,4.5\n2025-06-01T01:00:00+00:00,10.5,4_5\n"
    )
    with pytest.raises(DataError):
        read_labelled_csv(path, spec)
    report = ingest_csv(path, spec=spec, sessions=sessions)
    assert report.loaded == 0
    assert report.rejected == [
        (2, ["outdoor_temp_c: '1_0.5' is not a number"]),
        (3, ["kwh: '4_5' is not a number"]),
    ]


def test_a_name_or_category_in_another_unicode_form_says_so(tmp_path: Path, sessions) -> None:
    """macOS writes Korean text decomposed (NFD), most tools composed (NFC): the two print alike, so
    "unknown category '아파트'" or "missing column(s): 유형" beside the same-looking text told nothing. The
    refusal names the other form; nothing is normalized silently (categories are matched as written)."""
    spec = parse_spec({
        "dataset": "homes", "target": "가격",
        "features": [{"name": "유형", "type": "categorical", "categories": ["아파트", "빌라"]}],
    })  # fmt: skip
    nfd = functools.partial(unicodedata.normalize, "NFD")
    header = tmp_path / "header.csv"
    header.write_text(f"{nfd('유형')},가격\n아파트,1.5\n" + "빌라,2.5\n" * 12)
    form = "in another Unicode form: NFD and NFC look alike but differ"
    near = f"column(s): 유형 (the header has '{nfd('유형')}' {form}"
    with pytest.raises(IngestError, match=re.escape(near)):
        ingest_csv(header, spec=spec, sessions=sessions)
    with pytest.raises(DataError, match=re.escape(f"(the header has '{nfd('유형')}' {form}")):
        read_labelled_csv(header, spec)
    value = tmp_path / "value.csv"
    value.write_text(f"유형,가격\n{nfd('아파트')},1.5\n" + "빌라,2.5\n" * 12)
    report = ingest_csv(value, spec=spec, sessions=sessions)
    unknown = f"unknown category '{nfd('아파트')}' (the category '아파트' {form}; write both in one)"
    assert (report.loaded, report.rejected) == (0, [(2, [f"유형: {unknown}"])])
    at_line_2 = f"line 2 ('{nfd('아파트')}' (the category '아파트' {form}"
    with pytest.raises(DataError, match=re.escape(at_line_2)):
        read_labelled_csv(value, spec)


def test_categories_are_read_as_written_as_bootstrap_reads_them(tmp_path: Path, sessions) -> None:
    """Categories "NA" and "01" are as the file writes them, and " office" is not "office": `bootstrap --csv`
    reads the same file so (and /predict takes a value so). Stripped here alone, " office" trained as
    "office" from an import while bootstrap refused it. The refusal names the blanks. Numbers and times
    still allow blanks around them."""
    spec = parse_spec({
        "dataset": "buildings", "target": "kwh", "time_column": "ts",
        "features": [
            {"name": "kind", "type": "categorical", "nullable": True, "categories": ["office", "NA", "01"]},
            {"name": "hour", "type": "integer", "min": 0, "max": 23},
        ],
    })  # fmt: skip
    header = "ts,kind,hour,kwh\n"
    rows = [
        " 2025-06-01T00:00:00+00:00,office, 3 ,1.5\n",
        "2025-06-01T01:00:00+00:00,NA,4, 2.5\n",
        "2025-06-01T02:00:00+00:00,01,5,3.5\n",
        "2025-06-01T03:00:00+00:00,,6,4.5\n",
    ]
    path = tmp_path / "meters.csv"
    path.write_text(header + "".join(rows) + "2025-06-01T04:00:00+00:00, office,7,5.5\n")
    blanks = "' office' (the category 'office' with blanks around it)"
    report = ingest_csv(path, spec=spec, sessions=sessions)
    assert (report.loaded, report.rejected) == (0, [(6, [f"kind: unknown category {blanks}"])])
    with pytest.raises(DataError, match=re.escape(f"line 6 ({blanks})")):
        read_labelled_csv(path, spec)
    path.write_text(header + "".join(rows) + "2025-06-01T04:00:00+00:00,Office,7,5.5\n")
    cased = "'Office' (the category is written 'office')"
    report = ingest_csv(path, spec=spec, sessions=sessions)
    assert (report.loaded, report.rejected) == (0, [(6, [f"kind: unknown category {cased}"])])
    with pytest.raises(DataError, match=re.escape(f"line 6 ({cased})")):
        read_labelled_csv(path, spec)

    path.write_text(header + "".join(rows))
    assert ingest_csv(path, spec=spec, sessions=sessions).loaded == 4
    with sessions() as s:
        stored = s.execute(select(LabelledRow.features, LabelledRow.target).order_by(LabelledRow.id)).all()
    assert [features["kind"] for features, _ in stored] == ["office", "NA", "01", None]
    assert [features["hour"] for features, _ in stored] == [3, 4, 5, 6]
    assert [target for _, target in stored] == [1.5, 2.5, 3.5, 4.5]
    read = read_labelled_csv(path, spec)
    assert [None if pd.isna(k) else k for k in read["kind"]] == ["office", "NA", "01", None]


@pytest.mark.parametrize(
    ("bad_row", "said"),
    [
        ("2025-06-01T05:00:00+00:00,,lots,6.5", "column 'hour' has 1 row(s) with values that are not finite"),
        ("2025-06-01T05:00:00+00:00,,7,x", "target 'kwh' is missing or not a number in 1 row(s)"),
        ("soon,,7,6.5", "column 'ts' has 1 unparsable value(s)"),
        ("2099-01-01T00:00:00+00:00,,7,6.5", "column 'ts' has 1 time(s) more than a day ahead of now"),
    ],
)
def test_a_refusal_names_the_line_that_ingest_names_across_blank_lines_and_quoted_line_breaks(
    tmp_path: Path, sessions, bad_row: str, said: str
) -> None:
    """bootstrap and the backtest counted records from row 2, so after a blank line or a note written over
    two lines they named a line above the one at fault, where ingest named the right one."""
    spec = parse_spec({
        "dataset": "buildings", "target": "kwh", "time_column": "ts",
        "features": [{"name": "hour", "type": "integer", "min": 0, "max": 23}],
    })  # fmt: skip
    path = tmp_path / "meters.csv"
    path.write_text(
        "ts,note,hour,kwh\n2025-06-01T00:00:00+00:00,,3,1.5\n\n"
        '2025-06-01T01:00:00+00:00,"meter swapped,\nread by hand",4,2.5\n\n\n' + bad_row + "\n"
    )
    report = ingest_csv(path, spec=spec, sessions=sessions)
    assert [line for line, _ in report.rejected] == [8]
    with pytest.raises(DataError, match=re.escape(said)) as refused:
        read_labelled_csv(path, spec, now=datetime.now(UTC))  # as bootstrap reads it
    assert "first at line 8 (" in str(refused.value)


METERS = {
    "dataset": "buildings", "target": "kwh",
    "features": [{"name": "hour", "type": "integer", "min": 0, "max": 23}],
}  # fmt: skip


def test_without_a_time_column_a_row_is_dated_when_it_is_ingested(tmp_path: Path, sessions) -> None:
    at = datetime(2025, 6, 1, 9, 30, tzinfo=UTC)
    path = tmp_path / "meters.csv"
    path.write_text("hour,kwh\n3,1.5\n4,2.5\n")
    assert ingest_csv(path, spec=parse_spec(METERS), sessions=sessions, clock=lambda: at).loaded == 2
    with sessions() as s:
        stored = s.execute(select(LabelledRow.event_time, LabelledRow.ingested_at)).all()
    assert stored == [(at, at), (at, at)]


def test_a_blank_line_is_no_row_and_a_last_line_without_a_newline_is_one(tmp_path: Path, sessions) -> None:
    path = tmp_path / "meters.csv"
    path.write_text("hour,kwh\n3,1.5\n\n4,2.5\n5,3.5")
    progress: list[int] = []
    assert inspect_file(path).lines == 4  # lines after the header: an upper bound on the rows
    report = ingest_csv(
        path, spec=parse_spec(METERS), sessions=sessions, chunk_size=2, on_progress=progress.append
    )
    assert (report.loaded, report.rejected) == (3, [])
    assert progress == [2, 1]  # batches of chunk_size rows, the blank line in none


def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path, sessions) -> None:
    path = tmp_path / "meters.csv"
    path.write_text("hour,kwh,hour\n3,1.5,4\n")
    with pytest.raises(IngestError, match=re.escape("header names column(s) more than once: hour")):
        ingest_csv(path, spec=parse_spec(METERS), sessions=sessions)


def test_only_the_first_thousand_bad_lines_are_listed_but_all_are_counted(tmp_path: Path, sessions) -> None:
    path = tmp_path / "meters.csv"
    path.write_text("hour,kwh\n" + "99,1.5\n" * 1003)
    report = ingest_csv(path, spec=parse_spec(METERS), sessions=sessions, chunk_size=400)
    assert (report.good, report.bad, len(report.rejected)) == (0, 1003, 1000)
    assert report.rejected[-1] == (1001, ["hour: must be <= 23"])


def test_a_file_of_bad_lines_only_is_not_recorded_even_when_skipping_them(tmp_path: Path, sessions) -> None:
    """Nothing was loaded from it: run again (say, under a spec that accepts its lines) it loads, rather than
    being taken for a file loaded before."""
    path = tmp_path / "meters.csv"
    path.write_text("hour,kwh\n99,1.5\n")
    report = ingest_csv(path, spec=parse_spec(METERS), sessions=sessions, skip_bad=True)
    assert (report.loaded, report.bad, report.already) == (0, 1, None)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(IngestedFile)) == 0


def test_an_empty_source_is_refused_as_a_blank_one(tmp_path: Path, sessions, spec: FeatureSpec) -> None:
    """`--source "$SRC"` with SRC unset gives '', which was stored as the file's name in silence, while
    '  ' was refused (as the backtest refuses an empty --time-column)."""
    path = tmp_path / "jan.csv"
    generate_transactions(5).to_csv(path, index=False)
    with pytest.raises(IngestError, match=re.escape("source is blank: give --source a name, or leave")):
        ingest_csv(path, spec=spec, sessions=sessions, source="")
    assert ingest_csv(path, spec=spec, sessions=sessions).loaded == 5  # no source given: the file's name
