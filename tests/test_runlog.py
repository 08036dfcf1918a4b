"""The run log (gradguard.runlog): the Monitor writes exactly its schema, old and resumed logs load, newer versions
and malformed records are refused with a ReportError naming file, line and field, and fuzzing the loader lets no
other exception out."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard.runlog import (
    FIELDS,
    HEALTH_FLAGS,
    JSONL_NAME,
    SCHEMA_VERSION,
    ReportError,
    decode_number,
    encode_number,
    load_run,
    meta_record,
    record,
)


def write_log(run_dir: Path, records: list[dict[str, Any]], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / JSONL_NAME
    path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def step_rec(i: int, **kw: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"step": i, "time": 1000.0 + i, "loss": 1.0 / (i + 1), "norm": 2.0, "norm_after": 1.0,
                              "threshold": 1.0, "coef": 0.5, "clipped": True, "skipped": False, "lr": 0.1,
                              "steps_seen": i + 1, "clipped_count": i + 1, "skipped_count": 0}
    values.update(kw)
    return record("step", **values)


def valid_log() -> list[dict[str, Any]]:
    """A small log with every record type, as the Monitor writes it."""
    meta = meta_record(torch="2.0", every=1, per_layer_every=2, sinks=["jsonl"])
    return [
        meta, step_rec(0), record("layers", step=0, names=["a.weight", "b"], grad_norm=[1.0, 2.0],
                                  param_norm=[3.0, 4.0], update_ratio=None),
        step_rec(1, loss="nan", norm="inf", clipped=False, skipped=True, reason="nonfinite_loss", clipped_count=1,
                 skipped_count=1),
        record("health", step=1, layer="a.weight", flag="nonfinite", value="inf", message="a.weight: non-finite"),
        record("event", step=1, skipped=True, reason="nonfinite_loss", diagnosis={"stage": "forward"},
               text="non-finite value at stage forward"),
        step_rec(2, clipped_count=2, skipped_count=1, steps_seen=3),
        record("layers", step=2, names=["a.weight", "b"], grad_norm=["nan", 2.0], param_norm=[3.0, 4.0],
               update_ratio=[0.01, 0.0]),
        record("end", steps_seen=3, clipped_count=2, skipped_count=1),
    ]


# ------------------------------------------------------------------------------------------------ the writer
def test_monitor_writes_exactly_the_schema_and_it_reads_back(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gg.Monitor(tmp_path, per_layer_every=1, health=gg.LayerHealth(window=1)) as monitor:
        guard = gg.Guard(model, opt, clipper=gg.NormClip(0.5), monitor=monitor)
        for i in range(6):
            x = torch.randn(16, 3)
            if i == 3:
                x[0, 0] = math.inf
            guard.step(lambda x=x: model(x).pow(2).mean())
    lines = [json.loads(line) for line in (tmp_path / JSONL_NAME).read_text().splitlines()]
    seen = set()
    for rec in lines:
        kind = rec["type"]
        seen.add(kind)
        assert tuple(rec) == FIELDS[kind], kind  # every field of the schema, in order, and nothing else
    assert seen == set(FIELDS)  # every record type was written
    assert lines[0]["schema"] == SCHEMA_VERSION and lines[-1]["type"] == "end"
    run = load_run(tmp_path)
    raw_steps = [r for r in lines if r["type"] == "step"]
    assert len(run.steps) == len(raw_steps)
    for got, raw in zip(run.steps, raw_steps):
        assert set(got) == set(raw)
        for k, v in raw.items():
            if k in ("loss", "norm", "norm_after", "threshold", "coef", "lr", "time"):
                d = decode_number(v)
                assert (got[k] is None and d is None) or got[k] == pytest.approx(d, nan_ok=True)
            else:
                assert got[k] == v, k
    assert run.end == lines[-1]
    assert [h["flag"] for h in run.health] and all(h["flag"] in HEALTH_FLAGS for h in run.health)
    assert run.events and run.events[0]["skipped"] and run.events[0]["text"]


# --------------------------------------------------------------------------------------------- compatibility
# A log as the Monitor wrote it before the meta record carried a version: typed by hand, not generated.
_UNVERSIONED = (
    '{"type":"meta","gradguard":"0.1.0","torch":"2.13.0","created":"2026-01-01T00:00:00+00:00","every":1,'
    '"per_layer_every":2,"sinks":["jsonl"]}\n'
    '{"type":"step","step":0,"time":1767225600.5,"loss":0.5,"norm":3.0,"norm_after":1.0,"threshold":1.0,'
    '"coef":0.3333333333333333,"clipped":true,"skipped":false,"reason":null,"lr":0.05,"steps_seen":1,'
    '"clipped_count":1,"skipped_count":0}\n'
    '{"type":"layers","step":0,"names":["fc.weight","fc.bias"],"grad_norm":[2.5,"inf"],"param_norm":[1.0,0.5],'
    '"update_ratio":null}\n'
    '{"type":"health","step":0,"layer":"fc.bias","flag":"nonfinite","value":"inf","message":"fc.bias: inf"}\n'
    '{"type":"step","step":1,"time":1767225601.0,"loss":"nan","norm":"nan","norm_after":"nan","threshold":1.0,'
    '"coef":1.0,"clipped":false,"skipped":true,"reason":"nonfinite_loss","lr":0.05,"steps_seen":2,'
    '"clipped_count":1,"skipped_count":1}\n'
    '{"type":"event","step":1,"skipped":true,"reason":"nonfinite_loss","diagnosis":null,"text":null}\n'
    '{"type":"end","steps_seen":2,"clipped_count":1,"skipped_count":1}\n'
)


def _check_unversioned(run: Any) -> None:
    assert [s["step"] for s in run.steps] == [0, 1]
    assert run.steps[0]["coef"] == pytest.approx(1 / 3) and run.steps[0]["clipped"] is True
    assert math.isnan(run.steps[1]["loss"]) and run.steps[1]["reason"] == "nonfinite_loss"
    assert run.layers[0]["names"] == ("fc.weight", "fc.bias") and list(run.layers[0]["grad_norm"]) == [2.5, math.inf]
    assert run.layers[0]["update_ratio"] is None
    assert run.health[0]["value"] == math.inf and run.events[0]["reason"] == "nonfinite_loss"
    assert run.end == {"type": "end", "steps_seen": 2, "clipped_count": 1, "skipped_count": 1}


def test_log_of_the_previous_format_without_a_version_still_loads(tmp_path):
    (tmp_path / JSONL_NAME).write_text(_UNVERSIONED)
    _check_unversioned(load_run(tmp_path))
    versioned = _UNVERSIONED.replace('{"type":"meta",', f'{{"type":"meta","schema":{SCHEMA_VERSION},', 1)
    (tmp_path / JSONL_NAME).write_text(versioned)
    _check_unversioned(load_run(tmp_path))


@pytest.mark.parametrize("schema, message", [
    (SCHEMA_VERSION + 1, rf"schema {SCHEMA_VERSION + 1} is not supported.*newer gradguard: upgrade"),
    (0, "schema 0 is not supported.*corrupt or from another tool"),
    ("1", "expected an integer schema version"),
])
def test_unknown_schema_version_fails_with_a_clear_message(tmp_path, schema, message):
    log = valid_log()
    log[0]["schema"] = schema
    path = write_log(tmp_path, log)
    with pytest.raises(ReportError, match=message) as e:
        load_run(tmp_path)
    assert f"{path}:1: meta record, field 'schema'" in str(e.value)


def test_resumed_runs_load_with_their_later_meta_records(tmp_path):
    meta = meta_record(torch="2.0", every=1, per_layer_every=None, sinks=["jsonl"])
    resumed = meta_record(torch="2.0", every=1, per_layer_every=None, sinks=["jsonl"], resumed=True)
    # crashed after step 4 (no end), resumed from a checkpoint at step 3, closed cleanly, then resumed once more
    log = ([meta] + [step_rec(i) for i in range(5)] + [resumed] + [step_rec(i) for i in range(3, 8)]
           + [record("end", steps_seen=8, clipped_count=8, skipped_count=0), resumed, step_rec(8),
              record("end", steps_seen=9, clipped_count=9, skipped_count=0)])
    write_log(tmp_path, log)
    run = load_run(tmp_path)
    assert [s["step"] for s in run.steps] == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8]
    assert run.meta.get("resumed") is None and [r["line"] for r in run.resumes] == [7, 14]
    assert all(r["resumed"] is True for r in run.resumes)
    assert run.end is not None and run.end["steps_seen"] == 9


def test_a_second_run_in_the_same_file_or_records_after_end_are_refused(tmp_path):
    meta = meta_record(torch="2.0", every=1, per_layer_every=None, sinks=["jsonl"])
    path = write_log(tmp_path, [meta, step_rec(0), meta, step_rec(0)])
    with pytest.raises(ReportError, match=rf"{path}:3: meta record, field 'resumed'.*two runs"):
        load_run(tmp_path)
    write_log(tmp_path, [meta, step_rec(0), record("end", steps_seen=1, clipped_count=1, skipped_count=0),
                         step_rec(1)])
    with pytest.raises(ReportError, match=rf"{path}:4: a 'step' record after the 'end' record"):
        load_run(tmp_path)


# ------------------------------------------------------------------------------------------ malformed records
def _set(kind: str, nth: int, field: str, value: Any) -> Any:
    def mutate(log: list[dict[str, Any]]) -> int:
        idx = [i for i, r in enumerate(log) if r["type"] == kind][nth]
        if value is _DELETE:
            del log[idx][field]
        else:
            log[idx][field] = value
        return idx + 1
    return mutate


_DELETE = object()


@pytest.mark.parametrize("mutate, kind, field", [
    (_set("health", 0, "flag", 7), "health", "flag"),
    (_set("health", 0, "flag", "melting"), "health", "flag"),
    (_set("health", 0, "step", "1"), "health", "step"),
    (_set("health", 0, "layer", None), "health", "layer"),
    (_set("end", 0, "steps_seen", _DELETE), "end", "steps_seen"),
    (_set("end", 0, "clipped_count", "2"), "end", "clipped_count"),
    (_set("end", 0, "skipped_count", -1), "end", "skipped_count"),
    (_set("step", 0, "steps_seen", "5"), "step", "steps_seen"),
    (_set("step", 1, "skipped_count", 1.0), "step", "skipped_count"),
    (_set("step", 0, "step", 1.5), "step", "step"),
    (_set("step", 0, "step", True), "step", "step"),
    (_set("step", 0, "step", 2**60), "step", "step"),
    (_set("step", 0, "step", _DELETE), "step", "step"),
    (_set("step", 0, "loss", "NaN"), "step", "loss"),
    (_set("step", 0, "norm", [1.0]), "step", "norm"),
    (_set("step", 0, "time", "inf"), "step", "time"),
    (_set("step", 0, "clipped", "yes"), "step", "clipped"),
    (_set("step", 0, "skipped", None), "step", "skipped"),
    (_set("step", 0, "reason", 5), "step", "reason"),
    (_set("layers", 0, "names", "a.weight"), "layers", "names"),
    (_set("layers", 0, "names", ["a", 1]), "layers", "names"),
    (_set("layers", 0, "grad_norm", [1.0]), "layers", "grad_norm"),
    (_set("layers", 0, "grad_norm", None), "layers", "grad_norm"),
    (_set("layers", 1, "grad_norm", [1.0, "x"]), "layers", "grad_norm[1]"),
    (_set("layers", 1, "update_ratio", [1.0, None]), "layers", "update_ratio[1]"),
    (_set("event", 0, "diagnosis", [1]), "event", "diagnosis"),
    (_set("event", 0, "text", {"a": 1}), "event", "text"),
    (_set("meta", 0, "every", 0), "meta", "every"),
    (_set("meta", 0, "sinks", "jsonl"), "meta", "sinks"),
])
def test_a_malformed_record_names_file_line_and_field(tmp_path, mutate, kind, field):
    log = valid_log()
    line = mutate(log)
    path = write_log(tmp_path, log)
    with pytest.raises(ReportError) as e:
        load_run(tmp_path)
    assert str(e.value).startswith(f"{path}:{line}: {kind} record, field '{field}': "), str(e.value)


@pytest.mark.parametrize("text, message", [
    ('{"type":"meta","schema":1}\n{"type":"step","step":0,"loss":NaN}\n', r":2: not valid JSON.*strict JSON"),
    ('{"type":"meta","schema":1}\n' + "[" * 100_000 + "\n", r":2: not valid JSON"),
    ('{"type":"meta","schema":1}\n{"type":"step","step":' + "9" * 5000 + "}\n", r":2: not valid JSON"),
    ('{"type":"meta","schema":1}\n{"type":7}\n', r":2: not a gradguard record"),
    ('{"type":"meta","schema":1}\n"step"\n', r":2: not a gradguard record"),
    ('{"type":"step","step":0}\n', r":1: the first line must be the 'meta' record"),
    ("\n\n", "is empty"),
])
def test_bad_json_is_a_report_error(tmp_path, text, message):
    (tmp_path / JSONL_NAME).write_text(text)
    with pytest.raises(ReportError, match=message):
        load_run(tmp_path)


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    good = "".join(json.dumps(r) + "\n" for r in valid_log()[:2])
    (tmp_path / JSONL_NAME).write_bytes(good.encode() + b'{"type":"step","reason":"\xff\xfe"}\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:3: not UTF-8 text"):
        load_run(tmp_path)


def test_a_line_cut_short_by_a_crash_is_dropped_with_a_warning(tmp_path):
    write_log(tmp_path, valid_log()[:-1], tail='{"type":"step","step":3,"lo')
    run = load_run(tmp_path)
    assert len(run.steps) == 3 and run.end is None
    assert len(run.warnings) == 1 and ":9: last line cut short" in run.warnings[0]


# ------------------------------------------------------------------------------------------------ the columns
def test_step_table_gives_back_the_records_as_written(tmp_path):
    log = valid_log()
    write_log(tmp_path, log)
    run = load_run(tmp_path)
    raw = [r for r in log if r["type"] == "step"]
    assert len(run.steps) == 3 and run.steps[-1] == run.steps[2]
    assert [s["step"] for s in run.steps[0:2]] == [0, 1] and [s["step"] for s in run.steps[::-1]] == [2, 1, 0]
    for got, want in zip(run.steps, raw):
        assert list(got) == list(FIELDS["step"])
        for k, v in want.items():
            d = decode_number(v) if k in ("loss", "norm", "norm_after", "threshold", "coef", "lr", "time") else v
            assert got[k] == d or (isinstance(d, float) and math.isnan(d) and math.isnan(got[k])), k
    loss, has = run.steps.numbers("loss")
    assert has.tolist() == [True, True, True] and math.isnan(loss[1]) and loss[0] == 1.0
    assert run.steps.ints("skipped").tolist() == [0, 1, 0] and run.steps.ints("clipped").tolist() == [1, 0, 1]
    with pytest.raises(IndexError):
        run.steps[3]
    with pytest.raises(KeyError, match="not a number step field"):
        run.steps.numbers("step")


def test_record_builder_rejects_unknown_fields():
    assert record("step", step=3)["loss"] is None
    with pytest.raises(ValueError, match="step records have no field"):
        record("step", stepp=3)
    with pytest.raises(ValueError, match="kind must be one of"):
        record("steps")


# -------------------------------------------------------------------------------------------------- properties
@given(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_encode_decode_round_trip_through_strict_json(x):
    text = json.dumps(encode_number(x), allow_nan=False)
    back = decode_number(json.loads(text))
    assert (x is None and back is None) or back == x or (math.isnan(x) and math.isnan(back))


@given(st.one_of(st.booleans(), st.text().filter(lambda s: s not in ("nan", "inf", "-inf")), st.lists(st.floats()),
                 st.dictionaries(st.text(), st.integers()), st.integers(min_value=10**309, max_value=10**400)))
def test_decode_number_rejects_everything_else_with_value_error(x):
    with pytest.raises(ValueError):
        decode_number(x)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(["nan", "inf", "-inf", "", "a", "<b>"])
    | st.sampled_from(list(HEALTH_FLAGS) + list(FIELDS)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["type", "step", "a"]), inner,
                                                                  max_size=3),
    max_leaves=6,
)


@st.composite
def mutated_logs(draw: Any) -> str:
    """A valid log with a few fields replaced, deleted or added, records dropped or duplicated, or bytes cut."""
    log = valid_log()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(log) - 1))
        op = draw(st.sampled_from(["set", "del", "add", "drop", "dup"]))
        rec = log[i]
        if op in ("set", "del") and rec:
            key = draw(st.sampled_from(sorted(rec)))
            if op == "set":
                rec[key] = draw(_JSON)
            else:
                del rec[key]
        elif op == "add":
            rec[draw(st.sampled_from(["extra", "resumed", "schema"]))] = draw(_JSON)
        elif op == "drop" and len(log) > 1:
            del log[i]
        else:
            log.insert(i, dict(rec))
    text = "".join(json.dumps(r) + "\n" for r in log)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "\n", "\x00", "}{", "\ud7ff", "NaN"])) + text[cut:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_logs())
def test_fuzzing_the_loader_only_raises_report_error(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("fuzz")
    (d / JSONL_NAME).write_text(text, encoding="utf-8")
    try:
        run = load_run(d)
    except ReportError as e:
        assert str(d / JSONL_NAME) in str(e)
        return
    assert run.meta and len(run.steps) >= 1
