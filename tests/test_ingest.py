from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.generator import generate_transactions
from core.ingest import IngestError, ingest_csv
from core.schema import LabelledRow


def test_ingest_loads_valid_rows_and_reports_each_bad_one(tmp_path: Path, sessions, spec) -> None:
    frame = generate_transactions(50, seed=4)
    frame["contract_date"] = frame["contract_date"].astype(str)
    frame.loc[3, "area_m2"] = -5
    frame.loc[7, "district"] = "Atlantis-gu"
    frame.loc[9, "price_10k_krw"] = None
    frame.loc[11, "contract_date"] = "not a date"
    frame["price_10k_krw"] = frame["price_10k_krw"].astype(float)
    frame.loc[12, "price_10k_krw"] = 1e300  # finite, but its square would overflow the monitor's statistics
    path = tmp_path / "new.csv"
    frame.to_csv(path, index=False)
    report = ingest_csv(path, spec=spec, sessions=sessions, source="molit-2022-01")
    assert report.accepted == 45
    assert report.rejected == [
        (5, ["area_m2: must be >= 5"]),
        (9, ["district: unknown category 'Atlantis-gu'"]),
        (11, ["price_10k_krw: '' is not a number"]),
        (13, ["contract_date: missing or not a date/time"]),
        (14, ["price_10k_krw: must be within ±1e+15"]),
    ]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(LabelledRow)) == 45
        first = s.scalars(select(LabelledRow).order_by(LabelledRow.id)).first()
    assert first.source == "molit-2022-01"
    assert first.features == frame.loc[0, spec.feature_names].to_dict()
    assert first.event_time.isoformat().startswith(str(frame.loc[0, "contract_date"])[:10])


def test_ingest_refuses_a_file_missing_columns(tmp_path: Path, sessions, spec) -> None:
    path = tmp_path / "bad.csv"
    generate_transactions(5).drop(columns=["floor", "price_10k_krw"]).to_csv(path, index=False)
    with pytest.raises(IngestError, match="missing column\\(s\\): floor, price_10k_krw"):
        ingest_csv(path, spec=spec, sessions=sessions)
