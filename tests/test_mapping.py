"""Column mapping and row rules, on real Arrow batches through the real DuckDB mapper."""

import datetime as dt
import json

import pyarrow as pa
import pytest

from ingestd.core.errors import PermanentError
from ingestd.core.query import DayWindow
from ingestd.core.schema import EVENTS_SCHEMA, METRICS_SCHEMA, Mapping, RowMapper

DAY = dt.date(2026, 1, 5)
NOW = dt.datetime(2026, 1, 6, tzinfo=dt.UTC)


def events_mapper(**kw) -> RowMapper:
    m = Mapping(ids={"user_id": "uid", "stable_id": "sid"}, timestamp="ts", event_name="ev", event_value="val",
                metadata=["country"], metadata_json="props", **kw)
    m.check("events")
    return RowMapper("events", m, DayWindow.of(DAY), source="web", generation=4, ingested_at=NOW)


def row(**kw):
    base = dict(ts=dt.datetime(2026, 1, 5, 3), uid="u1", sid="s1", ev="click", val="1", country="DE", props=None)
    return {**base, **kw}


def test_event_row_maps_to_the_schema():
    out = events_mapper().map(pa.RecordBatch.from_pylist([row(props='{"plan": "pro", "n": {"x": 1}}')]))
    assert out.rows.schema == EVENTS_SCHEMA
    r = out.rows.to_pylist()[0]
    assert (r["source"], r["day"], r["generation"]) == ("web", DAY, 4)
    assert (r["unit_id"], r["id_type"]) == ("u1", "user_id")
    assert json.loads(r["ids"]) == {"user_id": "u1", "stable_id": "s1"}
    assert json.loads(r["metadata"]) == {"plan": "pro", "n": {"x": 1}, "country": "DE"}
    assert r["timestamp"] == dt.datetime(2026, 1, 5, 3, tzinfo=dt.UTC)


def test_second_id_column_is_used_when_the_first_is_null():
    r = events_mapper().map(pa.RecordBatch.from_pylist([row(uid=None)])).rows.to_pylist()[0]
    assert (r["unit_id"], r["id_type"], json.loads(r["ids"])) == ("s1", "stable_id", {"stable_id": "s1"})


@pytest.mark.parametrize("bad,reason", [
    (dict(ts=None), "missing_timestamp"),
    (dict(ts="yesterday-ish"), "bad_timestamp"),
    (dict(ts="2026-01-06T00:00:00Z"), "timestamp_outside_day"),
    (dict(ts="2026-01-04T23:59:59Z"), "timestamp_outside_day"),
    (dict(ev=None), "missing_event_name"),
    (dict(ev="x" * 129), "event_name_too_long"),
    (dict(val="v" * 129), "event_value_too_long"),
    (dict(uid=None, sid=None), "missing_unit_id"),
    (dict(props="[1, 2]"), "bad_metadata_json"),
    (dict(props="{not json"), "bad_metadata_json"),
])
def test_bad_rows_are_rejected_with_their_reason(bad, reason):
    rows = [row(ts="2026-01-05T01:00:00Z"),
            row(ts="2026-01-05T02:00:00Z", **{k: v for k, v in bad.items() if k != "ts"})]
    if "ts" in bad:
        rows[1]["ts"] = bad["ts"]
    out = events_mapper().map(pa.RecordBatch.from_pylist(rows))
    assert out.rows.num_rows == 1
    assert dict(out.rejects) == {reason: 1}
    assert out.samples[0]["reason"] == reason
    assert out.samples[0]["row"]["uid"] == rows[1]["uid"]


def test_string_and_epoch_timestamps_are_read_as_utc():
    out = events_mapper().map(pa.RecordBatch.from_pylist([
        row(ts="2026-01-05T10:00:00+02:00"), row(ts="2026-01-05 23:59:59")]))
    assert [r["timestamp"].hour for r in out.rows.to_pylist()] == [8, 23]
    epoch = int(dt.datetime(2026, 1, 5, 12, tzinfo=dt.UTC).timestamp())
    out = events_mapper().map(pa.RecordBatch.from_pylist([row(ts=epoch), row(ts=epoch * 1000)]))
    assert [r["timestamp"].hour for r in out.rows.to_pylist()] == [12, 12]


def test_a_mapped_column_missing_from_the_result_is_a_permanent_error():
    with pytest.raises(PermanentError, match="mapping.event_name = 'ev'"):
        events_mapper().map(pa.RecordBatch.from_pylist([{"ts": dt.datetime(2026, 1, 5), "uid": "u", "sid": "s",
                                                          "val": "1", "country": "DE", "props": None}]))


def metrics_mapper() -> RowMapper:
    m = Mapping(ids={"user_id": "uid"}, metric_name="m", metric_value="v", numerator="n", denominator="d", date="ds")
    m.check("metrics")
    return RowMapper("metrics", m, DayWindow.of(DAY), source="kpi", generation=1, ingested_at=NOW)


def test_metrics_value_ratio_and_rules():
    rows = [
        dict(ds=DAY, uid="a", m="revenue", v=10.0, n=None, d=None),
        dict(ds=DAY, uid="a", m="ctr", v=99.0, n=3.0, d=4.0),      # both forms: the ratio wins
        dict(ds=DAY, uid="a", m="ctr", v=None, n=1.0, d=0.0),      # ratio undefined: value null, row kept
        dict(ds=DAY, uid="a", m="ctr", v=None, n=None, d=4.0),     # no value at all
        dict(ds=DAY + dt.timedelta(days=1), uid="a", m="x", v=1.0, n=None, d=None),
        dict(ds=DAY, uid=None, m="x", v=1.0, n=None, d=None),
        dict(ds=DAY, uid="a", m=None, v=1.0, n=None, d=None),
    ]
    out = metrics_mapper().map(pa.RecordBatch.from_pylist(rows))
    assert out.rows.schema == METRICS_SCHEMA
    assert [r["metric_value"] for r in out.rows.to_pylist()] == [10.0, 0.75, None]
    assert dict(out.rejects) == {"missing_value": 1, "date_outside_day": 1, "missing_unit_id": 1,
                                 "missing_metric_name": 1}


def test_mapping_config_rules():
    from ingestd.core.errors import ConfigError
    with pytest.raises(ConfigError, match="required for an events source"):
        Mapping(ids={"u": "u"}, event_name="e").check("events")
    with pytest.raises(ConfigError, match="numerator and denominator go together"):
        Mapping(ids={"u": "u"}, metric_name="m", metric_value="v", numerator="n").check("metrics")
    with pytest.raises(ConfigError, match="at least one id type"):
        Mapping(timestamp="t", event_name="e").check("events")


@pytest.mark.parametrize("unit", [None, "auto"])
def test_epoch_units_are_detected_by_magnitude_at_their_boundaries(unit):
    """Below 1e11 an integer is seconds, below 1e14 milliseconds, below 1e17 microseconds, else
    nanoseconds: 1e11 ms, 1e14 us and 1e17 ns are all 1973-03-03 09:46:40 UTC, while 1e11 - 1
    seconds is the year 5138, a bad timestamp rather than a time outside the day."""
    m = Mapping(ids={"user_id": "uid"}, timestamp="ts", event_name="ev", timestamp_unit=unit)
    m.check("events")
    day = dt.date(1973, 3, 3)
    mapper = RowMapper("events", m, DayWindow.of(day), source="web", generation=1, ingested_at=NOW)
    values = [10**11, 10**14, 10**17, 10**11 - 1, 10**14 - 1, 1_700_000_000]
    batch = pa.RecordBatch.from_pydict({"ts": pa.array(values, pa.int64()), "uid": ["u"] * 6, "ev": ["e"] * 6})
    out = mapper.map(batch)
    boundary = dt.datetime(1973, 3, 3, 9, 46, 40, tzinfo=dt.UTC)
    assert out.rows.column("timestamp").to_pylist() == [boundary] * 3
    # 1e14 - 1 ms is the year 5138 (bad); 1.7e9 s is 2023 (a real time, but not this day)
    assert out.rejects == {"bad_timestamp": 2, "timestamp_outside_day": 1}


@pytest.mark.parametrize("unit, scale", [("s", 1), ("ms", 10**3), ("us", 10**6), ("ns", 10**9)])
def test_an_explicit_epoch_unit_reads_that_unit_and_rejects_other_magnitudes(unit, scale):
    m = Mapping(ids={"user_id": "uid"}, timestamp="ts", event_name="ev", timestamp_unit=unit)
    m.check("events")
    mapper = RowMapper("events", m, DayWindow.of(DAY), source="web", generation=1, ingested_at=NOW)
    start = int(dt.datetime(2026, 1, 5, 12, 30, tzinfo=dt.UTC).timestamp())
    values = [start * scale, -(2**62)] + ([start * scale * 1000] if unit != "ns" else [])  # a larger unit's value
    n = len(values)
    batch = pa.RecordBatch.from_pydict({"ts": pa.array(values, pa.int64()), "uid": ["u"] * n, "ev": ["e"] * n})
    out = mapper.map(batch)
    assert out.rows.column("timestamp").to_pylist() == [dt.datetime(2026, 1, 5, 12, 30, tzinfo=dt.UTC)]
    assert out.rejects == {"bad_timestamp": n - 1}


def test_a_boolean_timestamp_is_a_bad_timestamp_not_a_failed_batch():
    m = Mapping(ids={"user_id": "uid"}, timestamp="ts", event_name="ev")
    m.check("events")
    mapper = RowMapper("events", m, DayWindow.of(DAY), source="web", generation=1, ingested_at=NOW)
    out = mapper.map(pa.RecordBatch.from_pydict({"ts": [True, False], "uid": ["a", "b"], "ev": ["e", "e"]}))
    assert out.rows.num_rows == 0 and out.rejects == {"bad_timestamp": 2}


def test_metadata_is_normalised_and_folded_columns_win():
    """The metadata object is written compactly without null members (at any depth); a folded
    column replaces the member of its name (written last), and a NULL one removes it."""
    out = events_mapper().map(pa.RecordBatch.from_pylist([
        row(props=' \n{"a": null, "b": {"c": null, "d": [1, null]}, "country": "FR", "z": "é\\u0001"}'),
        row(props='{"country": "FR", "k": 1}', country=None),
    ]))
    assert out.rows.column("metadata").to_pylist() == [
        '{"b":{"d":[1,null]},"z":"é\\u0001","country":"DE"}', '{"k":1}']


@pytest.mark.parametrize("props", ["null", '"text"', "3", "[]", ""])
def test_metadata_json_that_is_not_an_object_is_a_bad_row(props):
    out = events_mapper().map(pa.RecordBatch.from_pylist([row(props=props)]))
    assert dict(out.rejects) == {"bad_metadata_json": 1}


def test_ids_object_lists_the_present_ids_in_mapping_order_escaped():
    m = Mapping(ids={"user_id": "uid", "stable_id": "sid", "company id": "cid"}, timestamp="ts", event_name="ev")
    m.check("events")
    mapper = RowMapper("events", m, DayWindow.of(DAY), source="web", generation=1, ingested_at=NOW)
    rows = [row(uid="  ", sid='s"1\\', cid=7), row(uid="u\u00e9", sid=None, cid=None), row(uid="", sid="", cid=0)]
    out = mapper.map(pa.RecordBatch.from_pylist([{k: r[k] for k in ("ts", "uid", "sid", "ev")} | {"cid": r["cid"]}
                                                  for r in rows]))
    assert out.rows.column("ids").to_pylist() == [
        '{"stable_id":"s\\"1\\\\","company id":"7"}', '{"user_id":"ué"}', '{"company id":"0"}']
    assert out.rows.column("id_type").to_pylist() == ["stable_id", "user_id", "company id"]
    assert out.rows.column("unit_id").to_pylist() == ['s"1\\', "ué", "0"]


def test_negative_epochs_before_1970_are_read():
    m = Mapping(ids={"user_id": "uid"}, timestamp="ts", event_name="ev", timestamp_unit="ns")
    m.check("events")
    day = dt.date(1969, 12, 31)
    mapper = RowMapper("events", m, DayWindow.of(day), source="web", generation=1, ingested_at=NOW)
    out = mapper.map(pa.RecordBatch.from_pydict({"ts": pa.array([-1_500, -86_400 * 10**9], pa.int64()),
                                                 "uid": ["u", "u"], "ev": ["e", "e"]}))
    assert out.rows.column("timestamp").to_pylist() == [
        dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC), dt.datetime(1969, 12, 31, tzinfo=dt.UTC)]
