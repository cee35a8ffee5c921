from __future__ import annotations

import io
import logging
from pathlib import Path

import orjson
import pytest

from kllm.cli import commands as cli
from kllm.core.errors import ConfigError, PipelineError
from kllm.core.refs import where
from kllm.ops.supervisor import STAGES, tail
from kllm.runtime import logs
from kllm.runtime.settings import STATE_FILE, KafkaSettings, write_state
from topics import ALL, REQUESTS, declared

# --- _parse_replicas -----------------------------------------------------------------------


def test_parse_replicas_accepts() -> None:
    assert cli._parse_replicas(["inference=2"]) == {"inference": 2}
    assert cli._parse_replicas(["inference=2", "retrieval=3", "inference=4"]) == {
        "inference": 4,
        "retrieval": 3,
    }
    assert cli._parse_replicas([]) == {}
    assert {s: 1 for s in STAGES} == cli._parse_replicas([f"{s}=1" for s in STAGES])


@pytest.mark.parametrize(
    "item", ["nope=2", "inference=0", "inference", "inference=", "inference=-1", "inference=x", ""]
)
def test_parse_replicas_rejects(item: str) -> None:
    with pytest.raises(PipelineError, match="STAGE=N") as info:
        cli._parse_replicas([item])
    assert repr(item) in str(info.value)


# --- kllm topics ---------------------------------------------------------------------------


@pytest.mark.usefixtures("restore_root_logging")
def test_main_topics_lists_every_topic(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLLM_BOOTSTRAP_SERVERS", raising=False)
    assert cli.main(["topics"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["topic", "parts"]
    first_column = [line.split()[0] for line in lines[1:]]
    assert first_column == [t.name for t in declared()]
    for t in ALL:
        (line,) = [x for x in lines if x.split()[0] == t.name]
        assert line.split()[1] == str(t.partitions)
        assert line.endswith(f"{t.name}.dlq" if t.has_dlq else "-")


def test_main_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


# --- logs ----------------------------------------------------------------------------------


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("kllm.test")
    return logger.makeRecord(
        "kllm.test", logging.WARNING, __file__, 1, msg, args, None, extra=extra
    )


def test_json_formatter_fields_and_extra() -> None:
    rec = _record("processed %d", 3, request_id="r-1", record=f"{REQUESTS.name}[0]@5", ms=1.25)
    body = orjson.loads(logs.JsonFormatter().format(rec))
    assert body["msg"] == "processed 3"
    assert body["level"] == "WARNING"
    assert body["logger"] == "kllm.test"
    assert body["request_id"] == "r-1"
    assert body["record"] == f"{REQUESTS.name}[0]@5"
    assert body["ms"] == 1.25
    assert isinstance(body["ts"], float)
    # standard LogRecord attributes stay out
    assert not {"args", "lineno", "pathname", "msecs", "levelno", "exc_info"} & set(body)


def test_json_formatter_non_json_extra_and_exception() -> None:
    try:
        raise ValueError("kaput")
    except ValueError:
        import sys

        rec = _record("failed", path=Path("/x/y"), obj={1, 2})
        rec.exc_info = sys.exc_info()
    body = orjson.loads(logs.JsonFormatter().format(rec))
    assert body["path"] == "/x/y"
    assert "ValueError: kaput" in body["exc"]


@pytest.mark.usefixtures("restore_root_logging")
def test_configure_writes_json_lines() -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    logging.getLogger("kllm.x").info("hello", extra={"request_id": "r-2"})
    logging.getLogger("kllm.x").debug("hidden")
    logging.getLogger("quixstreams").info("chatty")
    lines = stream.getvalue().splitlines()
    assert [orjson.loads(x)["msg"] for x in lines] == ["hello"]
    assert orjson.loads(lines[0])["request_id"] == "r-2"


def test_where() -> None:
    assert where(REQUESTS.name, 2, 17) == f"{REQUESTS.name}[2]@17"


# --- settings ------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLLM_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("KLLM_RUN_DIR", raising=False)


@pytest.mark.usefixtures("no_env")
def test_bootstrap_explicit_wins(tmp_path: Path) -> None:
    write_state(tmp_path, "state:1")
    s = KafkaSettings(bootstrap_servers="explicit:9092", run_dir=tmp_path)
    assert s.bootstrap() == "explicit:9092"


@pytest.mark.usefixtures("no_env")
def test_bootstrap_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLLM_BOOTSTRAP_SERVERS", "env:9092")
    write_state(tmp_path, "state:1")
    assert KafkaSettings(run_dir=tmp_path).bootstrap() == "env:9092"


@pytest.mark.usefixtures("no_env")
def test_bootstrap_from_state_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "nested" / "run"
    path = write_state(run_dir, "127.0.0.1:39092")
    assert path == run_dir / STATE_FILE
    state = orjson.loads(path.read_bytes())
    assert state == {"bootstrap_servers": "127.0.0.1:39092"}
    assert KafkaSettings(run_dir=run_dir).bootstrap() == "127.0.0.1:39092"


@pytest.mark.usefixtures("no_env")
def test_bootstrap_missing_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        KafkaSettings(run_dir=tmp_path).bootstrap()
    msg = str(info.value)
    assert "KLLM_BOOTSTRAP_SERVERS" in msg
    assert "kllm up" in msg
    assert str(tmp_path / STATE_FILE) in msg


@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize("content", [b"{not json", b"{}", b'{"other": 1}'])
def test_bootstrap_corrupt_state_is_config_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match="unreadable"):
        KafkaSettings(run_dir=tmp_path).bootstrap()


@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize("content", [b"[]", b'"x"', b"null"])
def test_bootstrap_non_object_state_is_config_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match="unreadable"):
        KafkaSettings(run_dir=tmp_path).bootstrap()


# --- supervisor.tail -----------------------------------------------------------------------


def test_tail(tmp_path: Path) -> None:
    log = tmp_path / "stage.log"
    log.write_text("\n".join(f"line {i}" for i in range(40)) + "\n")
    assert tail(log, 3) == "line 37\nline 38\nline 39"
    assert tail(log).splitlines() == [f"line {i}" for i in range(25, 40)]
    assert tail(tmp_path / "missing.log") == "(no log)"
    log.write_bytes(b"ok\n\xff\xfe bad bytes\n")
    assert tail(log, 1).endswith(" bad bytes")
