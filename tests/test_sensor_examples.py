"""docs/sensors.md runs as written: its YAML blocks are loaded by a real agent against sysfs-like
files, a stand-in ``i2cget`` and MQTT payloads through the private broker, all shaped like the
real devices' (and shown on the page), and the readings the agent derives are checked."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import ConfigError, SensorConfig, config_from_mapping
from agent.localbroker import LocalBroker
from agent.sensors import extract
from agent.sensors.sources import BadReading, parse_payload, read_file, run_command
from tests.conftest import agent_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "sensors.md"

# what the devices give, exactly as the page shows it
W1_SLAVE = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
Z2M = (
    '{"battery":97,"humidity":48.55,"linkquality":120,"power_outage_count":12,'
    '"pressure":1006.3,"temperature":21.43,"voltage":2995}'
)
TASMOTA = (
    '{"Time":"2026-12-04T17:30:00","BME280":{"Temperature":22.6,"Humidity":51.2,'
    '"DewPoint":12.1,"Pressure":1008.4},"PressureUnit":"hPa","TempUnit":"C"}'
)
IIO = "/sys/bus/iio/devices/iio:device0/"
FILES = {
    "/sys/bus/w1/devices/28-3c01d607d4a1/w1_slave": W1_SLAVE,
    "/sys/bus/w1/devices/28-3c01d6071b2f/temperature": "22500\n",
    IIO + "in_temp_input": "21430\n",
    IIO + "in_humidityrelative_input": "48232\n",
    IIO + "in_pressure_input": "100.837890625\n",
}
I2CGET_ARGS, I2CGET_WORD = "-y 1 0x48 0x00 w", "0x601b"  # a TMP102 at 27.375 °C
MQTT = {"zigbee2mqtt/outside": Z2M, "tele/shed-th/SENSOR": TASMOTA}

EXPECTED = {
    "soil_temp": 23.125,
    "water_temp": 22.5,
    "temperature": 21.43,
    "humidity": 48.232,
    "pressure": 1008.37890625,
    "board_temp": 27.375,
    "outside_temp": 21.43,
    "outside_humidity": 48.55,
    "outside_battery": 97.0,
    "outside_link": 120.0,
    "shed_temp": 22.6,
    "shed_humidity": 51.2,
    "shed_pressure": 1008.4,
}


def doc_sensors() -> list[dict[str, Any]]:
    """Every sensor entry of every ```yaml block on the page, in order."""
    blocks = re.findall(r"^```yaml\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.S | re.M)
    sensors = [s for b in blocks for s in yaml.safe_load(b)["sensors"]]
    assert sensors, "docs/sensors.md has no yaml block with sensors"
    return sensors


def on_tmp_root(sensor: dict[str, Any], root: Path) -> dict[str, Any]:
    """The same entry with a file source's path moved under ``root`` (the fake sysfs)."""
    source = dict(sensor["source"])
    if source["type"] == "file":
        source["path"] = str(root / source["path"].lstrip("/"))
    return {**sensor, "source": source}


def fake_sysfs(root: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


@pytest.fixture()
def fake_i2cget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``i2cget`` first on PATH that checks its arguments and prints the file ``word``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "word").write_text(I2CGET_WORD, encoding="utf-8")
    script = bin_dir / "i2cget"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$*" = "{I2CGET_ARGS}" ] || {{ echo "unexpected arguments: $*" >&2; exit 2; }}\n'
        f'cat "{bin_dir / "word"}"; echo\n',
        encoding="utf-8",
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir / "word"


def sensor_cfg(name: str, root: Path) -> SensorConfig:
    """One of the page's sensors, as the agent's config loader builds it."""
    entry = next(s for s in doc_sensors() if s["name"] == name)
    cfg = config_from_mapping({"device_id": "doc", "sensors": [on_tmp_root(entry, root)]}, env={})
    return cfg.sensors[0]


# ---------------------------------------------------------------- the page and its samples


def test_every_example_on_the_page_is_checked_and_its_samples_are_shown() -> None:
    names = [s["name"] for s in doc_sensors()]
    assert len(names) == len(set(names)), f"a sensor name is used twice on the page: {names}"
    assert set(names) == set(EXPECTED), (
        f"examples without a checked reading: {sorted(set(names) - set(EXPECTED))}; "
        f"checked but no longer on the page: {sorted(set(EXPECTED) - set(names))}"
    )
    text = DOC.read_text(encoding="utf-8")
    shown = [*W1_SLAVE.splitlines(), Z2M, TASMOTA, I2CGET_WORD, "21430", "48232", "100.837890625"]
    missing = [s for s in shown if s not in text]
    assert not missing, f"samples the test feeds but the page does not show: {missing}"


# ---------------------------------------------------------------- a real agent reads them all


def test_the_agent_derives_each_documented_reading(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, tmp_path: Path, fake_i2cget: Path
) -> None:
    root = tmp_path / "root"
    fake_sysfs(root, FILES)
    sensors = [on_tmp_root(s, root) for s in doc_sensors()]
    ra = start_agent(agent_config(broker.url, tiny_pack_path, sensors=sensors), broker)
    with ra.client() as c:
        for topic, payload in MQTT.items():
            c.publish(topic, payload)
        got = {name: read_until_present(c, name) for name in EXPECTED}
    assert got == pytest.approx(EXPECTED), got
    summary = {s["sensor"]: s for s in ra.agent.hub.summary()}
    assert all(summary[n]["rejected"] == 0 for n in EXPECTED), summary


def read_until_present(client: Any, sensor: str, timeout_s: float = 20.0) -> float | None:
    """The sensor's last value once it has one (pollers and MQTT deliver in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.request("read", {"sensor": sensor}, 10)
        assert r["type"] == "final", r
        if r["value"] is not None or time.monotonic() > deadline:
            return r["value"]  # type: ignore[no-any-return]
        time.sleep(0.1)


# ---------------------------------------------------------------- what must not become a reading


def test_a_failed_ds18b20_crc_is_refused_not_read(tmp_path: Path) -> None:
    fake_sysfs(tmp_path, {p: t.replace("YES", "NO") for p, t in FILES.items() if p.endswith("w1_slave")})
    with pytest.raises(BadReading) as exc:
        read_file(sensor_cfg("soil_temp", tmp_path))
    assert exc.value.reason == "no_match"
    fake_sysfs(tmp_path, FILES)
    assert read_file(sensor_cfg("soil_temp", tmp_path)) == pytest.approx(23.125)


def test_a_negative_i2c_temperature_keeps_its_sign(tmp_path: Path, fake_i2cget: Path) -> None:
    fake_i2cget.write_text("0x00f6", encoding="utf-8")  # -10 °C: 0xF60 in 12 bits
    assert run_command(sensor_cfg("board_temp", tmp_path)) == pytest.approx(-10.0)
    # garbage from the bus: sh's arithmetic fails and it exits non-zero
    fake_i2cget.write_text("Error: Read failed", encoding="utf-8")
    with pytest.raises(BadReading):
        run_command(sensor_cfg("board_temp", tmp_path))


def test_a_payload_without_the_field_is_refused_as_no_field(tmp_path: Path) -> None:
    cfg = sensor_cfg("outside_humidity", tmp_path)
    with pytest.raises(BadReading) as exc:
        parse_payload(b'{"battery":96,"linkquality":87}', cfg)
    assert exc.value.reason == "no_field"
    shed = sensor_cfg("shed_temp", tmp_path)
    with pytest.raises(BadReading) as exc:
        parse_payload(b'{"Time":"2026-12-04T17:35:00","BME280":{"Temperature":"n/a"}}', shed)
    assert exc.value.reason == "not_a_number"


# ---------------------------------------------------------------- extraction and its config


def test_extract_numbers_paths_and_patterns() -> None:
    assert extract.number("0x1b") == 27.0 and extract.number(" -5.5\n") == -5.5
    assert extract.pick({"sensors": [{"value": 3}]}, "sensors.0.value") == 3
    assert extract.text_number('{"a": {"b": 2.5}}', json_path="a.b") == 2.5
    assert extract.text_number("temp1: +41.2 C", pattern=r"\+?(-?[\d.]+) C") == 41.2
    assert extract.text_number("value 7", pattern=r"\d+") == 7.0  # no group: the whole match
    for text, kwargs, reason in [
        ("", {}, "not_a_number"),
        ("abc", {}, "not_a_number"),
        ("x", {"pattern": r"(\d+)"}, "no_match"),
        ("{}", {"json_path": "a"}, "no_field"),
        ('{"a": [1]}', {"json_path": "a.1"}, "no_field"),
        ('{"a": true}', {"json_path": "a"}, "not_a_number"),
        ("not json", {"json_path": "a"}, "not_a_number"),
    ]:
        with pytest.raises(extract.NoNumber) as exc:
            extract.text_number(text, **kwargs)
        assert exc.value.reason == reason, (text, kwargs)


def test_bad_patterns_and_paths_are_refused_at_load_with_their_key() -> None:
    sensors = [
        {"name": "a", "source": {"type": "file", "path": "/x", "pattern": "t=(\\d+"}},
        {"name": "b", "source": {"type": "file", "path": "/x", "pattern": "(a)(b)"}},
        {"name": "c", "source": {"type": "mqtt", "pattern": "(\\d+)"}},
        {"name": "d", "source": {"type": "mqtt", "json_path": "BME280..Temperature"}},
    ]
    with pytest.raises(ConfigError) as exc:
        config_from_mapping({"device_id": "x", "sensors": sensors}, env={})
    for key in ("sensors[0].source.pattern", "sensors[1].source.pattern", "sensors[2].source.pattern"):
        assert key in str(exc.value), str(exc.value)
    assert "sensors[3].source.json_path" in str(exc.value)


def test_a_field_may_carry_its_own_unit_and_time() -> None:
    cfg = config_from_mapping(
        {"device_id": "x", "sensors": [{"name": "t", "unit": "°C", "source": {"json_path": "probe"}}]}, env={}
    ).sensors[0]
    now = time.time()
    body = b'{"probe": {"value": 70.0, "unit": "\\u00b0F", "ts": %.1f}, "other": 1}' % (now - 30)
    reading = parse_payload(body, cfg, now)
    assert reading.value == pytest.approx(21.111, abs=1e-3) and reading.age_s == pytest.approx(30, abs=0.2)
